"""The reference daemon's upstream policy (gforward.proto.allow): what is dialled, not how
it is spelled."""

from __future__ import annotations

import pytest

from gforward.proto.allow import allowed, compile_pattern, normalise_path


@pytest.mark.parametrize(("path", "normalised"), [
    ("/run/guest.sock", "/run/guest.sock"),
    ("/srv/../var/run/docker.sock", "/var/run/docker.sock"),
    ("/srv/./a//b.sock", "/srv/a/b.sock"),
    ("//srv/a.sock", "/srv/a.sock"),
    ("/../../etc/x.sock", "/etc/x.sock"),
])
def test_unix_paths_are_normalised(path: str, normalised: str) -> None:
    assert normalise_path(path) == normalised


@pytest.mark.parametrize(("pattern", "target", "matches"), [
    ("[::1]:*", "[::1]:80", True),
    ("[::1]:*", "1:80", False),  # brackets are not a glob class of ':' and '1'
    ("[::1]:*", ":80", False),
    ("[0:0::1]:80", "[::1]:80", True),  # the same address, spelled differently
    ("[FE80::1]:*", "[fe80::1]:22", True),
    ("[*]:*", "[2001:db8::1]:22", True),
    ("[*]:*", "192.0.2.1:22", False),
    ("10.0.0.*:*", "10.0.0.5:22", True),
    ("10.0.0.*:*", "110.0.0.5:22", False),
    ("127.0.0.?:80", "127.0.0.5:80", True),
    ("127.0.0.?:80", "127.0.0.15:80", False),
    ("unix:/srv/*", "unix:/srv/a.sock", True),
    ("unix:/srv/*", "unix:/srvx/a.sock", False),
    ("unix://srv/./x/../*", "unix:/srv/a.sock", True),
    ("*", "unix:/anything", True),
])
def test_patterns_with_literal_brackets(pattern: str, target: str, matches: bool) -> None:
    assert bool(compile_pattern(pattern).fullmatch(target)) is matches


def test_every_address_of_a_name_must_be_allowed() -> None:
    patterns = [compile_pattern("127.0.0.1:*")]
    assert allowed(["127.0.0.1:80"], patterns)
    assert not allowed(["127.0.0.1:80", "[::1]:80"], patterns)
    assert not allowed([], patterns)  # a name without addresses
