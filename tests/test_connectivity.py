"""Reaching the daemon where users run it: TLS options, HTTP proxies, IPv6, path prefixes.

The proxy is a real one, proxy.py from PyPI (the `test` extra), run as its own
process on 127.0.0.1 with a port of its choosing and its files in a temporary
directory: one that requires Basic credentials and one that requires none.
In front of it, where a test must know whether a tunnel went through the
proxy, sits a relay (a FakeDaemon that records the CONNECT request and then
pipes the bytes on), so "used the proxy" is counted rather than assumed.
Certificates come from trustme.  Everything stays on loopback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import gevent.ssl
import pytest
import trustme

import gforward
import gforward.daemon
from tests.peers.fake_daemon import (
    FakeDaemon,
    Peer,
    Script,
    accept_tcp_only,
    answer_then_wait,
    silent,
)
from tests.peers.guest import Guest, echo_until_eof
from tests.peers.programs import Programs, clean_env
from tests.support import (
    IO_TIMEOUT,
    MARGIN,
    assert_cli_serves,
    assert_closed_within,
    assert_logged,
    assert_secret_not_logged,
    connect,
    echo_once,
    forward,
    gforward_cli,
    ipv6_loopback,
    local_address,
    read_to_eof,
    refused_then_echo_works,
    tls_daemon,
    tls_script,
    wait_until,
    warnings_of,
)

TOKEN = "s3cret-Token-9f8e7d"
PROXY_USER = "gf-user"
PROXY_PASSWORD = "Pr0xy:s3cret/@%"  # every character that needs percent-encoding in a URL
PAYLOAD = os.urandom(1 << 20)
needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no ::1")


# A real HTTP proxy ------------------------------------------------------------------


def _start_proxy(workdir: Path, *flags: str) -> Iterator[tuple[str, int]]:
    """proxy.py on 127.0.0.1, yielding its address once it accepts; stopped, group and all.

    It runs in a session of its own, so that its acceptor processes go with it;
    HOME points into `workdir` because proxy.py keeps a cache under ~/.proxy.
    """
    workdir.mkdir()
    port_file = workdir / "port"
    with open(workdir / "proxy.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", "0",
             "--port-file", str(port_file), "--num-acceptors", "1", "--num-workers", "1",
             "--log-level", "WARNING", "--data-dir", str(workdir), *flags],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            env=clean_env(HOME=str(workdir)),
        )
    try:
        yield "127.0.0.1", _wait_for_port(proc, port_file)
    finally:
        # The whole group, signalled while its leader is not yet reaped: the id is still ours
        # (unless the leader died early, and then its group has no one left to signal).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(IO_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(IO_TIMEOUT)


def _wait_for_port(proc: subprocess.Popen[bytes], port_file: Path) -> int:
    deadline = time.monotonic() + IO_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"proxy.py exited {proc.returncode}"
        text = port_file.read_text().strip() if port_file.exists() else ""
        if text:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", int(text)), timeout=1):
                return int(text)
        time.sleep(0.05)
    pytest.fail("proxy.py did not start listening")


@pytest.fixture(scope="module")
def auth_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A proxy that answers 407 unless it gets PROXY_USER and PROXY_PASSWORD."""
    yield from _start_proxy(tmp_path_factory.mktemp("proxy") / "auth",
                            "--basic-auth", f"{PROXY_USER}:{PROXY_PASSWORD}")


@pytest.fixture(scope="module")
def open_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A proxy that lets anyone through."""
    yield from _start_proxy(tmp_path_factory.mktemp("proxy") / "open")


def _relay_to(address: tuple[str, int]) -> Script:
    """A FakeDaemon script: record the CONNECT request (peer.request), then pipe on."""

    def relay(peer: Peer) -> None:
        request = peer.read_request()
        peer.buffer[:0] = request.head
        peer.proxy(address)

    return relay


def _fake_connect_proxy(peer: Peer) -> None:
    """A minimal CONNECT proxy, for IPv6 targets only.

    proxy.py 2.4.10 keeps the brackets of `CONNECT [::1]:port` (the form RFC
    9110 requires) in the host it resolves, and answers 502.
    """
    request = peer.read_request()
    host, _, port = request.target.rpartition(":")
    peer.send(b"HTTP/1.1 200 Connection established\r\n\r\n")
    peer.proxy((host.strip("[]"), int(port)))


@pytest.fixture
def relay(auth_proxy: tuple[str, int]) -> Iterator[FakeDaemon]:
    """The credentialed proxy behind a relay that counts and records the tunnels."""
    with FakeDaemon(_relay_to(auth_proxy)) as fake:
        yield fake


def proxy_url(port: int, user: str | None = PROXY_USER, password: str = PROXY_PASSWORD) -> str:
    """http://user:password@127.0.0.1:port, both percent-encoded; no credentials for None."""
    if user is None:
        return f"http://127.0.0.1:{port}"
    return f"http://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only each test's own proxy variables count, whatever the machine has set."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "no_proxy", "all_proxy"):
            monkeypatch.delenv(name)


def assert_nothing_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    for secret in (TOKEN, PROXY_PASSWORD, quote(PROXY_PASSWORD, safe="")):
        assert_secret_not_logged(caplog, secret)


# TLS -------------------------------------------------------------------------------


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """`ca`'s certificate as a PEM file; the system store (SSL_CERT_FILE) does not have it."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def _daemon_over(scheme: str, ca: trustme.CA, tmp_path: Path) -> gforward.daemon.Daemon:
    """The reference daemon in this process, over http, or over https with a certificate
    of `ca` for 127.0.0.1."""
    return tls_daemon(ca, tmp_path, "127.0.0.1") if scheme == "https" else gforward.daemon.start()


def test_ca_file_trusts_that_ca(ca: trustme.CA, ca_file: str, tmp_path: Path,
                                echo_server: str) -> None:
    with tls_daemon(ca, tmp_path, "127.0.0.1") as daemon, forward(
        daemon.url, echo_server, ca_file=ca_file
    ) as fwd:
        assert echo_once(local_address(fwd), PAYLOAD) == PAYLOAD


@pytest.mark.parametrize(
    ("problem", "reason"),
    [
        ("unknown CA", "unable to get local issuer certificate; trust its CA with ca_file"),
        ("wrong host name", "Hostname mismatch, certificate is not valid for 'localhost'; "
                            "the URL must name a host the certificate lists"),
    ],
)
def test_certificate_problems_are_logged_with_the_reason(
    problem: str, reason: str, ca: trustme.CA, ca_file: str, tmp_path: Path,
    echo_server: str, gflog: pytest.LogCaptureFixture,
) -> None:
    issuer = trustme.CA() if problem == "unknown CA" else ca
    names = ("localhost",) if problem == "unknown CA" else ("daemon.example",)
    with tls_daemon(issuer, tmp_path, *names) as daemon:
        url = daemon.url.replace("127.0.0.1", "localhost")
        with forward(url, echo_server, ca_file=ca_file, token=TOKEN) as fwd:
            for _ in range(2):  # the listener survives it
                with connect(fwd) as sock:
                    sock.sendall(b"must not arrive")
                    assert_closed_within(sock, IO_TIMEOUT)
        assert_logged(gflog, f"TLS certificate of {url} not accepted",
                      "CERTIFICATE_VERIFY_FAILED", reason)
    assert_nothing_secret_logged(gflog)


def test_insecure_accepts_any_certificate_and_warns_at_each_start(
    tmp_path: Path, echo_server: str, gflog: pytest.LogCaptureFixture,
) -> None:
    with tls_daemon(trustme.CA(), tmp_path, "daemon.example") as daemon:
        for starts in (1, 2):
            with forward(daemon.url, echo_server, insecure=True) as fwd:
                assert echo_once(local_address(fwd), b"unverified") == b"unverified"
            warned = [m for m in warnings_of(gflog) if "insecure=True" in m]
            assert len(warned) == starts, warned
    assert f"certificate of {daemon.url} is not checked" in warned[0]


def test_insecure_with_plain_http_has_nothing_to_warn_about(
    daemon: gforward.daemon.Daemon, echo_server: str, gflog: pytest.LogCaptureFixture,
) -> None:
    with forward(daemon.url, echo_server, insecure=True) as fwd:
        assert echo_once(local_address(fwd), b"plain") == b"plain"
    assert warnings_of(gflog) == []


@pytest.mark.parametrize("kind", ["stdlib", "gevent"])
def test_ssl_context_is_used_as_given(kind: str, ca: trustme.CA, ca_file: str, tmp_path: Path,
                                      echo_server: str) -> None:
    """Full control: this context skips the host-name check, and so must the tunnel."""
    context_class = ssl.SSLContext if kind == "stdlib" else gevent.ssl.SSLContext
    context = context_class(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=ca_file)
    context.check_hostname = False
    with tls_daemon(ca, tmp_path, "daemon.example") as daemon, forward(
        daemon.url, echo_server, ssl_context=context
    ) as fwd:
        assert echo_once(local_address(fwd), PAYLOAD) == PAYLOAD


def test_stdlib_ssl_context_does_not_block_the_hub(ca: trustme.CA, ca_file: str,
                                                   gflog: pytest.LogCaptureFixture) -> None:
    """A stalled TLS handshake must leave other tunnels and the dial timeout working.

    The stdlib context would make a blocking SSLSocket: the first tunnel would
    hold the forwarder's only thread in its handshake, the second could not
    start, and no timer could cut the first.
    """
    names: list[str | None] = []
    with FakeDaemon(accept_tcp_only, tls_script(ca, names)) as fake, forward(
        f"https://localhost:{fake.port}", ssl_context=ssl.create_default_context(cafile=ca_file),
        dial_timeout=4,
    ) as fwd, connect(fwd) as stalled:
        # The first tunnel is now in its TLS handshake.
        assert wait_until(lambda: fake.peers, IO_TIMEOUT)
        # Well before the first tunnel's dial timeout:
        assert echo_once(local_address(fwd), b"meanwhile", timeout=3) == b"meanwhile"
        assert_closed_within(stalled, 4 + MARGIN)
    assert_logged(gflog, f"no answer from https://localhost:{fake.port} within 4 s")
    assert names == ["localhost"]


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"ca_file": "/ca.pem", "insecure": True}, "ca_file and insecure exclude each other"),
        ({"ssl_context": ssl.create_default_context(), "insecure": True},
         "ssl_context and insecure exclude each other"),
        ({"ssl_context": ssl.create_default_context(), "ca_file": "/ca.pem"},
         "ssl_context and ca_file exclude each other"),
        ({"ca_file": "/nonexistent/ca.pem"}, "cannot load ca_file '/nonexistent/ca.pem'"),
        ({"ca_file": __file__}, "cannot load ca_file"),  # not PEM
        ({"ssl_context": "verify"}, "must be an ssl.SSLContext"),
    ],
    ids=["ca_file+insecure", "context+insecure", "context+ca_file", "missing ca_file",
         "not PEM", "not a context"],
)
def test_tls_options_checked_before_anything_is_bound(fields: dict[str, Any], problem: str,
                                                      short_tmp: str) -> None:
    local = os.path.join(short_tmp, "never.sock")
    with pytest.raises(ValueError, match=problem):
        forward("https://127.0.0.1:1", specs=[f"{local}:127.0.0.1:9"], **fields)
    assert not os.path.exists(local)


def test_a_context_subclass_is_used_as_given(ca: trustme.CA, tmp_path: Path,
                                             echo_server: str) -> None:
    """A subclass of the standard library's context (truststore's, say) is honoured:
    tunnels take their TLS objects from its own wrap_bio, which never blocks a hub."""
    made: list[str | None] = []

    class Custom(ssl.SSLContext):
        def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
            made.append(kwargs.get("server_hostname"))
            return super().wrap_bio(*args, **kwargs)

    context = Custom(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca.cert_pem.bytes().decode())
    with tls_daemon(ca, tmp_path, "localhost") as daemon:
        url = daemon.url.replace("127.0.0.1", "localhost")
        with forward(url, echo_server, ssl_context=context) as fwd:
            assert echo_once(local_address(fwd), PAYLOAD) == PAYLOAD
    assert made == ["localhost"]


# Proxies ---------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_daemon_through_a_real_proxy(scheme: str, relay: FakeDaemon, ca: trustme.CA,
                                     ca_file: str, tmp_path: Path, echo_server: str,
                                     gflog: pytest.LogCaptureFixture) -> None:
    tls = {"ca_file": ca_file} if scheme == "https" else {}
    with _daemon_over(scheme, ca, tmp_path) as daemon, forward(
        daemon.url, echo_server, token=TOKEN, proxy=proxy_url(relay.port), **tls
    ) as fwd:
        for _ in range(2):
            assert echo_once(local_address(fwd), PAYLOAD) == PAYLOAD
    port = daemon.url.rsplit(":", 1)[1]
    assert len(relay.peers) == 2
    connect_request = relay.peers[0].request
    assert connect_request is not None
    assert connect_request.request_line == f"CONNECT 127.0.0.1:{port} HTTP/1.1"
    assert connect_request.get("Authorization") is None, "the daemon's token went to the proxy"
    assert_nothing_secret_logged(gflog)


def test_tls_through_the_proxy_names_the_daemon_and_keeps_the_prefix(
    relay: FakeDaemon, ca: trustme.CA, ca_file: str,
) -> None:
    """SNI and the certificate check are for the daemon's name, never the proxy's."""
    names: list[str | None] = []
    with FakeDaemon(tls_script(ca, names)) as fake, forward(
        f"https://localhost:{fake.port}/slicer", ca_file=ca_file, proxy=proxy_url(relay.port)
    ) as fwd:
        assert echo_once(local_address(fwd), b"over TLS, via proxy") == b"over TLS, via proxy"
    assert names == ["localhost"]
    connect_request, upgrade = relay.peers[0].request, fake.peers[0].request
    assert connect_request is not None and upgrade is not None
    assert connect_request.request_line == f"CONNECT localhost:{fake.port} HTTP/1.1"
    assert connect_request.get("Host") == f"localhost:{fake.port}"
    assert connect_request.get("User-Agent") == f"gforward/{gforward.__version__}"
    assert upgrade.request_line == "GET /slicer/vm/sbox-1/forward HTTP/1.1"
    assert upgrade.get("Host") == f"localhost:{fake.port}"


@pytest.mark.parametrize(("user", "hint"), [
    (None, "it wants credentials"),
    (PROXY_USER, "it did not accept the user name and password"),
], ids=["no credentials", "wrong password"])
def test_407_fails_that_tunnel_only(user: str | None, hint: str, auth_proxy: tuple[str, int],
                                    open_proxy: tuple[str, int],
                                    daemon: gforward.daemon.Daemon, echo_server: str,
                                    gflog: pytest.LogCaptureFixture) -> None:
    """The strict proxy first, then an open one behind the same address."""
    with FakeDaemon(_relay_to(auth_proxy), _relay_to(open_proxy)) as switch, forward(
        daemon.url, echo_server, token=TOKEN, proxy=proxy_url(switch.port, user, "wrong-pw")
    ) as fwd:
        refused_then_echo_works(fwd, gflog, "407 Proxy Authentication Required", hint,
                                f"through proxy http://127.0.0.1:{switch.port}", secret=TOKEN)
    assert_secret_not_logged(gflog, "wrong-pw")


@pytest.mark.parametrize("case", [str.upper, str.lower], ids=["UPPER", "lower"])
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_environment_proxy_follows_the_daemons_scheme(
    scheme: str, case: Callable[[str], str], relay: FakeDaemon, upstream_hole: socket.socket,
    ca: trustme.CA, ca_file: str, tmp_path: Path, echo_server: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dead = f"http://127.0.0.1:{upstream_hole.getsockname()[1]}"  # refuses every connection
    other = "https" if scheme == "http" else "http"
    monkeypatch.setenv(case(f"{scheme}_proxy"), proxy_url(relay.port))
    monkeypatch.setenv(case(f"{other}_proxy"), dead)
    with _daemon_over(scheme, ca, tmp_path) as daemon, forward(
        daemon.url, echo_server, ca_file=ca_file if scheme == "https" else None
    ) as fwd:
        assert echo_once(local_address(fwd), b"via env") == b"via env"
    assert len(relay.peers) == 1


@pytest.mark.parametrize(("variable", "value"), [
    ("NO_PROXY", "127.0.0.1"),
    ("no_proxy", "other.example, 127.0.0.0/8"),
    ("NO_PROXY", "127.0.0.1:{port}"),
    ("no_proxy", "*"),
])
def test_no_proxy_bypasses_the_environment_proxy(
    variable: str, value: str, upstream_hole: socket.socket, daemon: gforward.daemon.Daemon,
    echo_server: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = daemon.url.rsplit(":", 1)[1]
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{upstream_hole.getsockname()[1]}")
    monkeypatch.setenv(variable, value.format(port=port))
    with forward(daemon.url, echo_server) as fwd:
        assert echo_once(local_address(fwd), b"direct") == b"direct"


def test_options_proxy_overrides_the_environment(
    relay: FakeDaemon, upstream_hole: socket.socket, daemon: gforward.daemon.Daemon,
    echo_server: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{upstream_hole.getsockname()[1]}")
    monkeypatch.setenv("NO_PROXY", "*")  # applies to the environment's proxy only
    with forward(daemon.url, echo_server, proxy=proxy_url(relay.port)) as fwd:
        assert echo_once(local_address(fwd), b"explicit") == b"explicit"
    assert len(relay.peers) == 1

    monkeypatch.setenv("HTTP_PROXY", proxy_url(relay.port))
    monkeypatch.delenv("NO_PROXY")
    with forward(daemon.url, echo_server, proxy="") as fwd:
        assert echo_once(local_address(fwd), b"none") == b"none"
    assert len(relay.peers) == 1, "proxy='' still went through the proxy"


def test_unix_daemon_never_uses_a_proxy(upstream_hole: socket.socket, short_tmp: str,
                                        echo_server: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    dead = f"http://127.0.0.1:{upstream_hole.getsockname()[1]}"
    monkeypatch.setenv("HTTP_PROXY", dead)
    monkeypatch.setenv("HTTPS_PROXY", dead)
    path = os.path.join(short_tmp, "daemon.sock")
    with gforward.daemon.start(listen=(), unix=[path]) as daemon:
        for explicit in (None, dead):
            with forward(daemon.url, echo_server, proxy=explicit) as fwd:
                assert echo_once(local_address(fwd), b"local") == b"local"


# A proxy that opens the tunnel, behind which nobody ever speaks.
_connect_then_silence = answer_then_wait(b"HTTP/1.1 200 Connection established\r\n\r\n")


@pytest.mark.parametrize("script", [accept_tcp_only, silent, _connect_then_silence],
                         ids=["never reads", "never answers CONNECT", "silent tunnel"])
def test_dial_timeout_covers_the_proxy(script: Script,
                                       gflog: pytest.LogCaptureFixture) -> None:
    with FakeDaemon(script) as fake, forward(
        "https://localhost:1/p", proxy=f"http://127.0.0.1:{fake.port}", dial_timeout=1,
        token=TOKEN,
    ) as fwd:
        with connect(fwd) as sock:
            assert_closed_within(sock, 1 + MARGIN)
        assert_logged(gflog, "no answer from https://localhost:1/p via proxy "
                             f"http://127.0.0.1:{fake.port} (from Options.proxy) within 1 s")
    assert_nothing_secret_logged(gflog)


def test_proxy_down_is_logged(upstream_hole: socket.socket, daemon: gforward.daemon.Daemon,
                              gflog: pytest.LogCaptureFixture,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    port = upstream_hole.getsockname()[1]
    monkeypatch.setenv("http_proxy", proxy_url(port))
    with forward(daemon.url, dial_timeout=2) as fwd, connect(fwd) as sock:
        assert_closed_within(sock, 2 + MARGIN)
    assert_logged(gflog, f"cannot reach proxy http://127.0.0.1:{port} (from HTTP_PROXY)")
    assert_nothing_secret_logged(gflog)


@pytest.mark.parametrize("where", ["option", "environment"])
def test_unusable_proxy_url_fails_start(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    url = "socks5://user:hunter2@127.0.0.1:1080"
    fields: dict[str, Any] = {"proxy": url} if where == "option" else {}
    if where == "environment":
        monkeypatch.setenv("HTTPS_PROXY", url)
    with pytest.raises(ValueError, match="only http:// proxies") as caught:
        forward("https://daemon.invalid", **fields)
    assert "hunter2" not in str(caught.value)


# IPv6 ------------------------------------------------------------------------------


@needs_ipv6
@pytest.mark.parametrize("route", ["direct", "proxy"])
def test_ipv6_daemon_listener_and_upstream(route: str) -> None:
    """http://[::1]:port, a listener on [::1] and an upstream [::1]:port, end to end."""
    with Guest(echo_until_eof, host="::1") as guest_v6, \
            FakeDaemon(_fake_connect_proxy) as relay_v6, \
            gforward.daemon.start(listen=["[::1]:0"]) as daemon:
        assert daemon.url.startswith("http://[::1]:")
        with forward(daemon.url, specs=[f"[::1]:0:[::1]:{guest_v6.port}"],
                     proxy=proxy_url(relay_v6.port, None) if route == "proxy" else "") as fwd:
            listener = fwd.listeners[0]
            assert (listener.local, listener.remote) == (f"[::1]:{listener.port}",
                                                         f"[::1]:{guest_v6.port}")
            with socket.create_connection(("::1", listener.port), timeout=IO_TIMEOUT) as sock:
                sock.sendall(PAYLOAD)
                sock.shutdown(socket.SHUT_WR)
                assert read_to_eof(sock) == PAYLOAD
    if route == "proxy":
        connect_request = relay_v6.peers[0].request
        assert connect_request is not None
        assert connect_request.request_line == \
            f"CONNECT {daemon.url.split('//', 1)[1]} HTTP/1.1"
    else:
        assert relay_v6.peers == []


# The command line ------------------------------------------------------------------


def test_cli_ca_file(programs: Programs, ca: trustme.CA, ca_file: str,
                     tmp_path: Path, http_guest: str) -> None:
    with tls_daemon(ca, tmp_path, "127.0.0.1") as daemon:
        program = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}", "--url", daemon.url,
                               "--ca-file", ca_file)
        assert_cli_serves(program, "/tls")
        assert program.stop() == 0


def test_cli_insecure_warns(programs: Programs, tmp_path: Path,
                            http_guest: str) -> None:
    with tls_daemon(trustme.CA(), tmp_path, "daemon.example") as daemon:
        program = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}", "--url", daemon.url,
                               "--insecure")
        assert_cli_serves(program, "/any-cert")
        assert program.stop() == 0
    assert "TLS verification is off (insecure=True)" in program.stderr


def test_cli_proxy_flag_over_environment(programs: Programs, relay: FakeDaemon,
                                         upstream_hole: socket.socket,
                                         daemon: gforward.daemon.Daemon,
                                         http_guest: str) -> None:
    dead = f"http://127.0.0.1:{upstream_hole.getsockname()[1]}"
    for flag, expected in ((proxy_url(relay.port), 1), ("", 1)):
        program = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}", "--url", daemon.url,
                               "--proxy", flag, env={"HTTP_PROXY": dead})
        assert_cli_serves(program, "/p")
        assert program.stop() == 0
        assert len(relay.peers) == expected
        assert PROXY_PASSWORD not in program.stderr + program.stdout
        assert quote(PROXY_PASSWORD, safe="") not in program.stderr + program.stdout


@pytest.mark.parametrize(("args", "problem"), [
    (["--ca-file", "ca.pem", "--insecure"], "not allowed with argument"),
    (["--ca-file", "/nonexistent/ca.pem"], "cannot load ca_file"),
    (["--proxy", "socks5://u:hunter2@127.0.0.1:1080"], "only http:// proxies"),
])
def test_cli_bad_connectivity_arguments_exit_2(programs: Programs,
                                               args: list[str], problem: str) -> None:
    program = gforward_cli(programs, "sbox-1", "127.0.0.1:0:127.0.0.1:9", "--url",
                           "https://daemon.invalid", *args)
    assert program.finish() == 2
    assert problem in program.stderr
    assert "hunter2" not in program.stderr
