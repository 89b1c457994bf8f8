"""Base URL parsing: every documented form, Host header values, and the rejects."""

from __future__ import annotations

from pathlib import Path

import pytest

from gforward.proto.endpoint import Endpoint, parse_base_url

# fmt: off
TCP_CASES = [
    # url, scheme, host, port, prefix, host_header, describe()
    ("http://127.0.0.1:8080", "http", "127.0.0.1", 8080, "", "127.0.0.1:8080",
     "http://127.0.0.1:8080"),
    ("http://127.0.0.1", "http", "127.0.0.1", 80, "", "127.0.0.1", "http://127.0.0.1"),
    ("http://localhost:80/", "http", "localhost", 80, "", "localhost", "http://localhost"),
    ("https://slicer.example.com", "https", "slicer.example.com", 443, "",
     "slicer.example.com", "https://slicer.example.com"),
    ("https://slicer.example.com:8443", "https", "slicer.example.com", 8443, "",
     "slicer.example.com:8443", "https://slicer.example.com:8443"),
    ("HTTPS://Slicer.Example.COM:443/", "https", "slicer.example.com", 443, "",
     "slicer.example.com", "https://slicer.example.com"),
    ("http://[::1]:8080", "http", "::1", 8080, "", "[::1]:8080", "http://[::1]:8080"),
    ("http://[::1]", "http", "::1", 80, "", "[::1]", "http://[::1]"),
    ("https://h/slicer", "https", "h", 443, "/slicer", "h", "https://h/slicer"),
    ("https://h/slicer/", "https", "h", 443, "/slicer", "h", "https://h/slicer"),
    ("http://h:8080/a/b/", "http", "h", 8080, "/a/b", "h:8080", "http://h:8080/a/b"),
    ("http://h:", "http", "h", 80, "", "h", "http://h"),
]
# fmt: on


@pytest.mark.parametrize("case", TCP_CASES, ids=[case[0] for case in TCP_CASES])
def test_tcp_forms(case: tuple[str, str, str, int, str, str, str]) -> None:
    url, scheme, host, port, prefix, host_header, described = case
    endpoint = parse_base_url(url)
    assert endpoint == Endpoint(scheme, host, port, "", prefix)
    assert endpoint.tls == (scheme == "https")
    assert endpoint.host_header == host_header
    assert endpoint.describe() == described
    assert endpoint.request_target("sbox-1") == f"{prefix}/vm/sbox-1/forward"


def test_prefix_is_kept_in_request_target() -> None:
    for url in ("https://h/slicer", "https://h/slicer/"):
        assert parse_base_url(url).request_target("sbox-1") == "/slicer/vm/sbox-1/forward"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("unix:///run/slicer.sock", "/run/slicer.sock"),
        ("unix:/run/slicer.sock", "/run/slicer.sock"),
        ("unix:///run/my%20dir/slicer.sock", "/run/my dir/slicer.sock"),
        ("/run/slicer.sock", "/run/slicer.sock"),
        ("/run/slicer", "/run/slicer"),
        ("./slicer.sock", "{cwd}/slicer.sock"),
        ("../slicer.sock", "{parent}/slicer.sock"),
        ("~/slicer.sock", "{home}/slicer.sock"),
        ("slicer.sock", "{cwd}/slicer.sock"),
        ("run/slicer.sock", "{cwd}/run/slicer.sock"),
        ("/tmp/a:b/slicer.sock", "/tmp/a:b/slicer.sock"),
    ],
)
def test_unix_forms(
    url: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = expected.format(cwd=cwd, parent=tmp_path, home=tmp_path / "home")
    endpoint = parse_base_url(url)
    assert endpoint == Endpoint("unix", "", 0, path, "")
    assert not endpoint.tls
    assert endpoint.host_header == "localhost"
    assert endpoint.describe() == "unix:" + path
    assert endpoint.request_target("sbox-1") == "/vm/sbox-1/forward"


@pytest.mark.parametrize(
    ("vm_name", "segment"),
    [
        ("sbox-1", "sbox-1"),
        ("a b/c?d", "a%20b%2Fc%3Fd"),
        ("x.y_z~", "x.y_z~"),
        ("%", "%25"),
        ("\u00e9", "%C3%A9"),
        ("..", ".."),
    ],
)
def test_vm_name_is_one_encoded_segment(vm_name: str, segment: str) -> None:
    endpoint = parse_base_url("http://h")
    assert endpoint.request_target(vm_name) == f"/vm/{segment}/forward"


def test_empty_vm_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="vm_name"):
        parse_base_url("http://h").request_target("")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("", "empty"),
        (" http://h", "whitespace"),
        ("http://h\n", "whitespace"),
        ("ftp://h", "expected http"),
        ("ws://h:8080", "expected http"),
        ("h:8080", "expected http"),
        ("localhost", "expected http"),
        ("http://", "no host"),
        ("http:///slicer", "no host"),
        ("http://:8080", "no host"),
        ("http://h/?a=b", "query"),
        ("http://h/#x", "fragment"),
        ("http://h?", "query"),
        ("http://h:99999", "out of range"),
        ("http://h:0", "out of range"),
        ("http://h:x", "invalid port"),
        ("http://h:+80", "invalid port"),
        ("http://h:\u0668\u0660", "ASCII"),
        ("http://h:8080:90", "brackets"),
        ("http://::1:8080", "brackets"),
        ("http://[::1", "IPv6|unclosed"),
        ("http://[1.2.3.4]:80", "IPv[46]"),  # urlsplit's words differ by version
        ("http://[::1]x:80", "after IPv6"),
        ("http://h b/", "ASCII"),
        ("http://h\x00/", "control"),
        ("http://h_\u00e9/", "ASCII"),
        ("http://h!/", "invalid host"),
        ("unix://host/run/slicer.sock", "no host"),
        ("unix:run/slicer.sock", "absolute"),
        ("unix:", "absolute"),
        ("unix:///run/s.sock?x", "query"),
        ("/run/s\x01.sock", "control"),
        ("~no-such-user-gforward/s.sock", "expand"),
        ("/" + "s" * 200 + ".sock", "107"),
    ],
)
def test_bad_base_url(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        parse_base_url(url)
    assert repr(url) in str(info.value)


@pytest.mark.parametrize("url", ["http://user:secret@h/x", "https://secret@h:8443"])
def test_credentials_are_rejected_and_masked(url: str) -> None:
    with pytest.raises(ValueError, match="token") as info:
        parse_base_url(url)
    assert "secret" not in str(info.value)
    assert repr(url.replace(url[url.index("//") + 2 : url.index("@") + 1], "***@")) in str(
        info.value
    )
