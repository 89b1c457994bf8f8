"""The reference daemon as users run it (`python -m gforward.daemon`) and as they import it.

Loopback only: refused upstreams use documentation and private addresses
that the daemon must turn down before it dials anything, and the names a
daemon looks up are answered by a hosts-style file the test writes
(tests/resolver.py), never by a DNS server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import gforward
import gforward.daemon
import gforward.hub
from tests.peers.guest import Guest, echo_until_eof
from tests.peers.programs import READ_TIMEOUT, Programs
from tests.resolver import Scripted
from tests.support import (
    cert_files,
    closed_port,
    echo_once,
    forward,
    local_address,
    refused,
    resolver_env,
    wait_until,
)

TOKEN = "daemon-token-7c1e"


# Talking to a daemon ------------------------------------------------------


def upgrade(url: str, upstream: str, *, token: str | None = None,
            path: str = "/vm/sbox-1/forward") -> tuple[int, str]:
    """One upgrade request written by hand: the answer's status code and body."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    lines = [
        f"GET {path} HTTP/1.1", f"Host: {parts.netloc}", "Upgrade: websocket",
        "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13", f"X-Inlets-Upstream: {upstream}",
        "X-Inlets-Mode: local", "X-Inlets-Client-ID: test",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 101:  # a refusal ends with the connection
            while data := sock.recv(4096):
                body += data
    return status, body.decode("utf-8", "replace")


def forward_echo(base_url: str, upstream: str, *, token: str = "",
                 payload: bytes = b"ping " * 2000) -> bytes:
    """Send `payload` through gforward (in-process) and the daemon to `upstream`."""
    with forward(base_url, upstream, token=token) as fwd:
        return echo_once(local_address(fwd), payload)


def tunnel_fails(base_url: str, upstream: str, *, token: str = "") -> bool:
    """Whether gforward closes the local connection without echoing (a failed tunnel)."""
    with forward(base_url, upstream, token=token) as fwd:
        return refused(fwd, b"lost")


# The command line ---------------------------------------------------------


def test_prints_real_url_then_forwards(programs: Programs, echo_server: str) -> None:
    _, [url] = programs.daemon("--listen", "127.0.0.1:0")
    parts = urlsplit(url)
    assert (parts.scheme, parts.hostname) == ("http", "127.0.0.1")
    assert parts.port not in (None, 0)
    assert forward_echo(url, echo_server) == b"ping " * 2000


@pytest.mark.parametrize("prefix", ["/api", "/some/deeper/prefix/"])
def test_serves_under_any_path_prefix(programs: Programs, echo_server: str, prefix: str) -> None:
    _, [url] = programs.daemon("--listen", "127.0.0.1:0")
    assert forward_echo(url + prefix, echo_server, payload=b"prefixed") == b"prefixed"
    assert upgrade(url, echo_server, path=f"{prefix.rstrip('/')}/vm/x/forward")[0] == 101
    assert upgrade(url, echo_server, path="/vm/x/elsewhere")[0] == 404


@pytest.mark.parametrize("how", ["--token", "--token-file"])
def test_bearer_token_is_required(programs: Programs, echo_server: str, tmp_path: Path,
                                  how: str) -> None:
    if how == "--token":
        value = TOKEN
    else:
        value = str(tmp_path / "token")
        Path(value).write_text(f"  {TOKEN}\n\n")
    _, [url] = programs.daemon("--listen", "127.0.0.1:0", how, value)
    assert upgrade(url, echo_server)[0] == 401
    assert upgrade(url, echo_server, token=TOKEN + "x")[0] == 401
    assert upgrade(url, echo_server, token="")[0] == 401
    assert forward_echo(url, echo_server, token=TOKEN, payload=b"authorised") == b"authorised"
    assert tunnel_fails(url, echo_server, token="wrong")


def test_502_with_a_reason_when_the_upstream_cannot_be_dialled(programs: Programs) -> None:
    _, [url] = programs.daemon("--listen", "127.0.0.1:0")
    port = closed_port()
    status, body = upgrade(url, f"127.0.0.1:{port}")
    assert status == 502
    assert f"127.0.0.1:{port}" in body and "refused" in body.lower()
    assert len(body) < 300


@pytest.mark.parametrize("upstream", ["10.0.0.1:80", "192.0.2.1:22", "[2001:db8::1]:80",
                                      "slicer.invalid:80"])
def test_non_loopback_upstreams_are_refused_before_any_dial(programs: Programs, tmp_path: Path,
                                                            upstream: str) -> None:
    _, [url] = programs.daemon("--listen", "127.0.0.1:0", env=resolver_env(tmp_path, ""))
    began = time.monotonic()
    status, body = upgrade(url, upstream)
    assert status == 403, body
    assert time.monotonic() - began < 5  # a dial to a dead address would take DIAL_TIMEOUT


def test_loopback_and_unix_upstreams_are_allowed_by_default(
    programs: Programs, echo_server: str, unix_echo_server: str
) -> None:
    _, [url] = programs.daemon("--listen", "127.0.0.1:0")
    port = echo_server.rsplit(":", 1)[1]
    assert upgrade(url, f"localhost:{port}")[0] in (101, 502)  # allowed; 502 if ::1 tried only
    assert upgrade(url, f"127.0.0.2:{closed_port()}")[0] == 502  # allowed, dialled, refused
    assert forward_echo(url, unix_echo_server, payload=b"via unix") == b"via unix"


def test_allow_patterns_replace_the_default(
    programs: Programs, echo_server: str, unix_echo_server: str, tmp_path: Path
) -> None:
    env = resolver_env(tmp_path, "127.0.0.1 localhost\n::1 localhost\n")
    _, [url] = programs.daemon("--listen", "127.0.0.1:0", "--allow", "127.0.0.1:*", env=env)
    port = echo_server.rsplit(":", 1)[1]
    assert forward_echo(url, echo_server, payload=b"allowed") == b"allowed"
    assert upgrade(url, f"localhost:{port}")[0] == 403  # ::1, one of its addresses, is not
    assert upgrade(url, f"unix:{unix_echo_server}")[0] == 403
    assert upgrade(url, "10.0.0.1:80")[0] == 403


def test_allow_can_open_a_non_loopback_pattern_only(programs: Programs) -> None:
    _, [url] = programs.daemon("--listen", "127.0.0.1:0", "--allow", "192.0.2.7:9")
    assert upgrade(url, "192.0.2.8:9")[0] == 403
    assert upgrade(url, "127.0.0.1:9")[0] == 403


# --allow: what is dialled, not how it is spelled ---------------------------


@pytest.mark.parametrize("pattern", ["localhost:*", "db.internal:5432", "*.example.com:*",
                                     "8080", ":80"])
def test_a_pattern_that_names_a_host_is_a_usage_error(programs: Programs, pattern: str) -> None:
    daemon = programs.run(sys.executable, "-m", "gforward.daemon", "--listen", "127.0.0.1:0",
                          "--allow", pattern)
    assert daemon.finish() == 2
    assert "--allow pattern" in daemon.stderr.strip().splitlines()[-1], daemon.stderr
    with pytest.raises(ValueError, match="names are matched through their addresses"):
        gforward.daemon.start(allow=[pattern])


@dataclass
class Patterned:
    """A daemon with --allow 10.0.0.*:*, [::1]:*, unix:INSIDE/* and ECHO (an echo guest's
    "127.0.0.1:port"), whose lookups know only 10.0.0.attacker.example, 1 and guest.test,
    all 127.0.0.1; a unix echo guest in INSIDE and another beside it."""

    url: str
    inside: str
    echo: str


@pytest.fixture(scope="module")
def patterned() -> Iterator[Patterned]:
    with tempfile.TemporaryDirectory(prefix="gf-", dir="/tmp") as name:  # short: socket paths
        directory = Path(name)
        inside = str(directory / "allowed")
        os.mkdir(inside)
        env = resolver_env(directory, "127.0.0.1 10.0.0.attacker.example 1 guest.test\n")
        programs = Programs()
        try:
            with Guest(echo_until_eof) as echo, Guest(echo_until_eof, f"{inside}/guest.sock"), \
                    Guest(echo_until_eof, str(directory / "secret.sock")):
                _, [url] = programs.daemon("--listen", "127.0.0.1:0", "--allow", "10.0.0.*:*",
                                           "--allow", "[::1]:*", "--allow", f"unix:{inside}/*",
                                           "--allow", echo.target, env=env)
                yield Patterned(url, inside, echo.target)
        finally:
            programs.close()


@pytest.mark.parametrize("bypass", [
    pytest.param("10.0.0.attacker.example:{hole}", id="a name spelled like allowed addresses"),
    pytest.param("1:{hole}", id="brackets read as a glob class"),
    pytest.param("unix:{inside}/../secret.sock", id="dot-dot out of an allowed directory"),
])
def test_allow_is_not_bypassed(patterned: Patterned, bypass: str) -> None:
    """Each is refused before any dial (the names resolve to 127.0.0.1, which no pattern
    allows on that port)."""
    upstream = bypass.format(hole=closed_port(), inside=patterned.inside)
    status, body = upgrade(patterned.url, upstream)
    assert status == 403, body


def test_allow_still_allows_what_it_names(patterned: Patterned) -> None:
    status, body = upgrade(patterned.url, f"[::1]:{closed_port()}")
    assert status == 502 and "[::1]" in body  # allowed and dialled: nothing listens there
    assert upgrade(patterned.url, f"unix:{patterned.inside}/guest.sock")[0] == 101
    assert upgrade(patterned.url, f"unix:{patterned.inside}//sub/../guest.sock")[0] == 101
    assert upgrade(patterned.url, patterned.echo)[0] == 101
    port = patterned.echo.rsplit(":", 1)[1]  # a name, allowed through its address
    assert forward_echo(patterned.url, f"guest.test:{port}", payload=b"by address") == \
        b"by address"


def test_the_loopback_default_trusts_names_through_their_addresses_only(
    programs: Programs, echo_server: str, tmp_path: Path
) -> None:
    env = resolver_env(tmp_path, "0.0.0.0 localhost\n127.0.0.1 guest.test mixed.test\n"
                          "0.0.0.0 mixed.test\n")
    _, [url] = programs.daemon("--listen", "127.0.0.1:0", env=env)
    port = echo_server.rsplit(":", 1)[1]
    status, body = upgrade(url, f"localhost:{port}")  # here, localhost is 0.0.0.0
    assert status == 403 and "0.0.0.0" in body, body
    assert upgrade(url, f"mixed.test:{port}")[0] == 403  # one address of two is not loopback
    assert upgrade(url, f"unknown.test:{port}")[0] == 403  # no address at all
    assert forward_echo(url, f"guest.test:{port}", payload=b"loopback") == b"loopback"


def test_the_checked_addresses_are_dialled_with_no_second_lookup(
    echo_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name that would resolve elsewhere the second time (DNS rebinding) is dialled where
    it resolved when it was checked."""
    rebinding = Scripted("127.0.0.1", "0.0.0.0")
    monkeypatch.setattr(gforward.hub.HubThread.shared().hub, "resolver", rebinding)
    with gforward.daemon.start() as daemon:  # in that hub's thread
        port = echo_server.rsplit(":", 1)[1]
        assert forward_echo(daemon.url, f"rebind.test:{port}", payload=b"once") == b"once"
    assert rebinding.lookups == 1


@pytest.mark.parametrize("as_url", [False, True])
def test_unix_socket_listener(programs: Programs, echo_server: str, short_tmp: str,
                              as_url: bool) -> None:
    path = os.path.join(short_tmp, "daemon.sock")
    daemon, urls = programs.daemon("--listen", "127.0.0.1:0", "--unix", path, listeners=2)
    assert urls[0].startswith("http://127.0.0.1:")
    assert urls[1] == f"unix://{path}"
    base_url = urls[1] if as_url else path
    assert forward_echo(base_url, echo_server, payload=b"over unix") == b"over unix"
    assert daemon.stop(signal.SIGTERM) == 0
    assert not os.path.exists(path)


def test_tls(programs: Programs, echo_server: str, tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert_path, key_path = cert_files(ca, tmp_path, "127.0.0.1", "localhost")
    ca_path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_path))
    _, [url] = programs.daemon("--listen", "127.0.0.1:0", "--tls-cert", str(cert_path),
                               "--tls-key", str(key_path))
    assert url.startswith("https://127.0.0.1:")
    monkeypatch.setenv("SSL_CERT_FILE", os.devnull)  # no CA trusted: the certificate is checked
    assert tunnel_fails(url, echo_server)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_path))
    assert forward_echo(url, echo_server, payload=b"over tls") == b"over tls"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_exits_0_on_signal(programs: Programs, echo_server: str, sig: int) -> None:
    daemon, [url] = programs.daemon("--listen", "127.0.0.1:0")
    spec = f"127.0.0.1:0:{echo_server}"
    with gforward.start(base_url=url, vm_name="sbox-1", specs=[spec]) as fwd:
        local = ("127.0.0.1", fwd.listeners[0].port)
        with socket.create_connection(local, timeout=READ_TIMEOUT) as live:
            live.sendall(b"x")
            assert live.recv(1) == b"x"  # a tunnel is open when the signal arrives
            assert daemon.stop(sig) == 0
            # the daemon ended it on the way out (gforward resets a stream cut short)
            with contextlib.suppress(ConnectionResetError):
                assert live.recv(1) == b""
    assert "Traceback" not in daemon.stderr
    port = urlsplit(url).port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT).close()


@pytest.mark.parametrize("args", [
    [],
    ["--bogus"],
    ["--listen", "127.0.0.1:0", "--tls-cert", "cert.pem"],
    ["--listen", "127.0.0.1:0", "--token", "a", "--token-file", "b"],
    ["--listen", "127.0.0.1:0", "--token-file", "/nonexistent/token"],
])
def test_exits_2_for_bad_arguments(programs: Programs, args: list[str]) -> None:
    daemon = programs.run(sys.executable, "-m", "gforward.daemon", *args)
    assert daemon.finish() == 2
    assert daemon.stdout == ""
    assert "error:" in daemon.stderr.strip().splitlines()[-1]


def test_exits_2_for_a_malformed_listen_address(programs: Programs) -> None:
    daemon = programs.run(sys.executable, "-m", "gforward.daemon", "--listen", "nonsense")
    assert daemon.finish() == 2
    assert "127.0.0.1:1" not in daemon.stderr


def test_empty_token_file_is_an_error(programs: Programs, tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text(" \n")
    daemon = programs.run(sys.executable, "-m", "gforward.daemon",
                          "--listen", "127.0.0.1:0", "--token-file", str(empty))
    try:
        line = daemon.readline()
    except AssertionError:  # exited without serving, as it should
        assert daemon.finish() == 2
        return
    pytest.fail(f"the daemon serves without authentication: {line}")


# The importable API -------------------------------------------------------


def test_start_in_process_and_close_frees_the_port(echo_server: str) -> None:
    daemon = gforward.daemon.start(token=TOKEN)
    try:
        assert daemon.urls == [daemon.url]
        assert forward_echo(daemon.url, echo_server, token=TOKEN, payload=b"api") == b"api"
        port = urlsplit(daemon.url).port
        assert port
    finally:
        daemon.close()
    assert daemon.closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT).close()
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))
        again.listen()
    daemon.close()  # idempotent


def test_start_as_context_manager_with_unix_socket(echo_server: str, short_tmp: str) -> None:
    path = os.path.join(short_tmp, "d.sock")
    with gforward.daemon.start(listen=(), unix=[path]) as daemon:
        assert daemon.url == f"unix://{path}"
        assert forward_echo(path, echo_server, payload=b"ctx") == b"ctx"
    assert not os.path.exists(path)


def test_a_malformed_request_never_echoes_its_token(daemon: gforward.daemon.Daemon,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """h11 quotes an illegal header line in its error; the daemon must not pass a token
    on to its log or to the 400 it answers."""
    secret = "s3cr3t-n0t-f0r-l0gs"
    parts = urlsplit(daemon.url)
    assert parts.hostname is not None and parts.port is not None
    caplog.set_level(logging.DEBUG, logger="gforward.daemon")
    request = (f"GET /vm/v/forward HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {secret}\x01\r\n\r\n").encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        while data := sock.recv(4096):
            answer += data
    assert answer.startswith(b"HTTP/1.1 400")
    assert secret.encode() not in answer
    assert wait_until(
        lambda: any("not a WebSocket upgrade" in r.getMessage() for r in caplog.records),
        READ_TIMEOUT)
    assert not any(secret in r.getMessage() for r in caplog.records)
