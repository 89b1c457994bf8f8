"""Spec parsing: every documented format, the rejects, and a round-trip property."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gforward.errors import ForwardError, SpecError
from gforward.proto.mapping import AddressMapping, parse_address_mapping

# spec, listen_addr, listen_port, listen_unix_path, remote_host, remote_port,
# remote_unix_path, remote_target(), listen_address(); "{cwd}" is the test's cwd.
# fmt: off
TABLE = [
    ("127.0.0.1:9000", "127.0.0.1", 9000, "", "127.0.0.1", 9000, "",
     "127.0.0.1:9000", "127.0.0.1:9000"),
    ("9001:127.0.0.1:9000", "0.0.0.0", 9001, "", "127.0.0.1", 9000, "",
     "127.0.0.1:9000", "0.0.0.0:9001"),
    ("0:127.0.0.1:9000", "0.0.0.0", 0, "", "127.0.0.1", 9000, "",
     "127.0.0.1:9000", "0.0.0.0:0"),
    ("0.0.0.0:9000:127.0.0.1:9000", "0.0.0.0", 9000, "", "127.0.0.1", 9000, "",
     "127.0.0.1:9000", "0.0.0.0:9000"),
    ("127.0.0.1:9000:/var/run/docker.sock", "127.0.0.1", 9000, "", "", 0,
     "/var/run/docker.sock", "unix:/var/run/docker.sock", "127.0.0.1:9000"),
    ("9000:/var/run/docker.sock", "0.0.0.0", 9000, "", "", 0,
     "/var/run/docker.sock", "unix:/var/run/docker.sock", "0.0.0.0:9000"),
    ("/tmp/docker.sock:/var/run/docker.sock", "", 0, "/tmp/docker.sock", "", 0,
     "/var/run/docker.sock", "unix:/var/run/docker.sock", "/tmp/docker.sock"),
    ("./docker.sock:/var/run/docker.sock", "", 0, "{cwd}/docker.sock", "", 0,
     "/var/run/docker.sock", "unix:/var/run/docker.sock", "{cwd}/docker.sock"),
    ("/tmp/web.sock:127.0.0.1:8080", "", 0, "/tmp/web.sock", "127.0.0.1", 8080, "",
     "127.0.0.1:8080", "/tmp/web.sock"),
    # Beyond the table: IPv6, relative unix listener to TCP, host names.
    ("[::1]:8080:[::1]:80", "::1", 8080, "", "::1", 80, "", "[::1]:80", "[::1]:8080"),
    ("[::1]:80", "::1", 80, "", "::1", 80, "", "[::1]:80", "[::1]:80"),
    ("8080:[fe80::1]:80", "0.0.0.0", 8080, "", "fe80::1", 80, "", "[fe80::1]:80",
     "0.0.0.0:8080"),
    ("../web.sock:localhost:65535", "", 0, "{parent}/web.sock", "localhost", 65535, "",
     "localhost:65535", "{parent}/web.sock"),
    ("localhost:0:my-vm.internal:443", "localhost", 0, "", "my-vm.internal", 443, "",
     "my-vm.internal:443", "localhost:0"),
]
# fmt: on

GOOD_SPECS = [row[0] for row in TABLE] + [
    "~/x.sock:/run/y.sock",
    "/tmp/a/../b.sock:/run/y.sock",
    "08080:127.0.0.1:080",
    "[::ffff:1.2.3.4]:1:/r",
]

BAD_SPECS = [
    "",
    "  ",
    " 127.0.0.1:80",
    "127.0.0.1:80\n",
    "abc",
    "80",
    "1:2:3:4:5",
    "99999:127.0.0.1:80",
    "-1:127.0.0.1:80",
    "+1:127.0.0.1:80",
    "127.0.0.1:0",
    "127.0.0.1:65536",
    "127.0.0.1:",
    ":127.0.0.1:80",
    "x:127.0.0.1:80",
    "127.0.0.1:\u0668\u0660",
    "\u0669\u0660\u0660\u0660:127.0.0.1:80",
    "::1:80:1.2.3.4:80",
    "::1:80",
    "[::1:80",
    "[::1]x:80",
    "[1.2.3.4]:80",
    "[]:80",
    "[::1%a b]:80",
    "a b:80",
    "h\u00e9:80",
    "127.0.0.1:80\r\nX: y",
    "9000:relative/path.sock",
    "9000:~/x.sock",
    "relative/path.sock:/var/run/docker.sock",
    "/var/run/docker.sock",
    "9000:/var/run/doc ker.sock",
    "9000:/var/run/d\u00f6cker.sock",
    "/tmp/a\x00b:/run/x",
    "/tmp/a\nb:/run/x",
    "~no-such-user-gforward/x.sock:/run/x",
    "/" + "a" * 107 + ":/run/x",
    "1.2.3.4:80:5.6.7.8:90:/x",
    "h:80:",
]


def _expect(value: str, cwd: Path) -> str:
    return value.format(cwd=cwd, parent=cwd.parent)


@pytest.mark.parametrize("row", TABLE, ids=[row[0] for row in TABLE])
def test_spec_table(
    row: tuple[str, str, int, str, str, int, str, str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    spec, laddr, lport, lpath, rhost, rport, rpath, target, local = row
    mapping = parse_address_mapping(spec)
    assert mapping == AddressMapping(
        raw_spec=spec,
        listen_addr=laddr,
        listen_port=lport,
        listen_unix_path=_expect(lpath, tmp_path),
        remote_host=rhost,
        remote_port=rport,
        remote_unix_path=rpath,
    )
    assert mapping.remote_target() == target
    assert mapping.listen_address() == _expect(local, tmp_path)
    assert mapping.listen_unix() == bool(lpath)
    assert mapping.remote_unix() == bool(rpath)


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    mapping = parse_address_mapping("~/docker.sock:/var/run/docker.sock")
    assert mapping.listen_unix_path == str(tmp_path / "docker.sock")
    assert mapping.listen_address() == str(tmp_path / "docker.sock")


def test_canonical_spec_examples() -> None:
    assert parse_address_mapping("9001:127.0.0.1:9000").canonical_spec() == (
        "0.0.0.0:9001:127.0.0.1:9000"
    )
    assert parse_address_mapping("[::1]:80").canonical_spec() == "[::1]:80:[::1]:80"
    assert parse_address_mapping("/tmp/d.sock:/run/x").canonical_spec() == "/tmp/d.sock:/run/x"


@pytest.mark.parametrize("spec", GOOD_SPECS)
def test_canonical_spec_round_trip(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    mapping = parse_address_mapping(spec)
    canonical = mapping.canonical_spec()
    assert parse_address_mapping(canonical) == dataclasses.replace(mapping, raw_spec=canonical)


@pytest.mark.parametrize("spec", BAD_SPECS)
def test_bad_spec(spec: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_address_mapping(spec)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, ForwardError)
    assert repr(spec) in str(info.value)


def test_colon_from_working_directory_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    odd = tmp_path / "a:b"
    odd.mkdir()
    monkeypatch.chdir(odd)
    with pytest.raises(SpecError, match="contains ':'"):
        parse_address_mapping("./x.sock:/run/x")


def test_long_path_message_names_the_limit() -> None:
    with pytest.raises(SpecError, match="107"):
        parse_address_mapping("/" + "a" * 120 + ":/run/x")
    assert len(os.fsencode(parse_address_mapping("/" + "a" * 106 + ":/r").listen_unix_path)) == 107


_FRAGMENTS = st.sampled_from(
    [
        "",
        "0",
        "80",
        "080",
        "65535",
        "65536",
        "99999",
        "-1",
        "\u0668\u0660",
        "127.0.0.1",
        "0.0.0.0",
        "localhost",
        "h-1.example",
        "[::1]",
        "[fe80::1%eth0]",
        "::1",
        "[::1",
        "]",
        "[",
        "a b",
        "h\r\nX",
        "/var/run/docker.sock",
        "/tmp/x.sock",
        "./x.sock",
        "../x.sock",
        "~/x.sock",
        "~",
        "relative/x.sock",
        "/a b",
        "/\u00e9",
        "\x00",
    ]
)
_NEAR_VALID = st.lists(_FRAGMENTS, min_size=1, max_size=5).map(":".join)


def _check(spec: str) -> None:
    try:
        mapping = parse_address_mapping(spec)
    except SpecError as exc:
        assert repr(spec) in str(exc)
        return
    canonical = mapping.canonical_spec()
    assert parse_address_mapping(canonical) == dataclasses.replace(mapping, raw_spec=canonical)
    for text in (mapping.remote_target(), mapping.remote_host, mapping.remote_unix_path):
        assert all(0x21 <= ord(c) <= 0x7E for c in text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_parses_or_raises_spec_error(spec: str) -> None:
    _check(spec)


@settings(max_examples=300, deadline=None)
@given(_NEAR_VALID)
def test_near_valid_specs_round_trip(spec: str) -> None:
    _check(spec)
