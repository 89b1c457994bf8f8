"""Wire-level tests: what gforward sends a daemon, and how it behaves when the daemon answers.

The daemon side is spoken by code other than gforward's own wherever the
point is interoperability: gevent-websocket over gevent.pywsgi (a process of
its own, see tests/peers/gws.py) and a raw-socket fake daemon whose exact bytes
each test states.  The reference daemon (gforward.daemon) carries the big
transfers, TLS and unix sockets, which gevent-websocket cannot serve well.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

import gforward
import gforward.daemon
from tests.peers.fake_daemon import (
    FakeDaemon,
    Peer,
    Script,
    accept_tcp_only,
    accept_then_close,
    accept_then_echo,
    answer_then_wait,
    silent,
)
from tests.peers.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Frame, encode_frame
from tests.peers.guest import Guest
from tests.peers.programs import announced
from tests.support import (
    IO_TIMEOUT,
    MARGIN,
    assert_closed_within,
    assert_logged,
    assert_secret_not_logged,
    connect,
    echo_once,
    forward,
    ipv6_loopback,
    local_address,
    read_exact,
    read_to_eof,
    refused_then_echo_works,
    tls_daemon,
    tls_script,
    warnings_of,
)

PROMPT = 2.5  # seconds within which a guest's end reaches the client
TOKEN = "s3cret-Token-9f8e7d"


# Helpers -----------------------------------------------------------------------


def _addr(url: str) -> tuple[str, int]:
    """(host, port) of an http:// URL."""
    host, port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


def _trust(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`ca` becomes the system store (SSL_CERT_FILE); before start(): its context loads it."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))


def _reply_after_eof(sock: socket.socket) -> None:
    """A guest that answers only once the request is complete (its EOF)."""
    request = read_to_eof(sock)
    body = hashlib.sha256(request).digest() * 32768  # 1 MiB
    sock.sendall(b"%d %s\n" % (len(request), hashlib.sha256(request).hexdigest().encode()) + body)


# The gevent-websocket peer -----------------------------------------------------------


@pytest.fixture(scope="module")
def gws_root() -> Iterator[str]:
    """`http://127.0.0.1:PORT` of the gevent-websocket peer, serving under /slicer."""
    with announced(["-m", "tests.peers.gws", "--prefix", "/slicer"],
                   timeout=IO_TIMEOUT) as (_, line):
        assert line.startswith("listening on "), f"peer said {line!r}"
        yield line.split()[-1]


@pytest.fixture
def gws_url(gws_root: str) -> str:
    return gws_root + "/slicer"


# 1. The upgrade request, byte for byte ----------------------------------------------


ALLOWED_HEADERS = {
    "host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
    "authorization", "x-inlets-client-id", "x-inlets-mode", "x-inlets-upstream", "user-agent",
}


def test_upgrade_request_line_and_default_headers() -> None:
    with FakeDaemon(accept_then_echo) as fake:
        port = fake.port
        with forward(f"http://127.0.0.1:{port}/slicer", "127.0.0.1:5432", vm_name="a b/c") as fwd:
            for payload in (b"first", b"second"):
                assert echo_once(local_address(fwd), payload) == payload
    first, second = (peer.request for peer in fake.peers)
    assert first is not None and second is not None
    assert first.request_line == "GET /slicer/vm/a%20b%2Fc/forward HTTP/1.1"
    assert first.get("Host") == f"127.0.0.1:{port}"
    assert first.get("Upgrade").lower() == "websocket"
    assert "upgrade" in [t.strip().lower() for t in first.get("Connection").split(",")]
    assert first.get("Sec-WebSocket-Version") == "13"
    assert len(base64.b64decode(first.get("Sec-WebSocket-Key"), validate=True)) == 16
    assert first.get("Sec-WebSocket-Key") != second.get("Sec-WebSocket-Key"), "key reused"
    assert first.get("Authorization") is None, "Authorization sent without a token"
    assert first.get("X-Inlets-Client-ID") == socket.gethostname()
    assert first.get("X-Inlets-Mode") == "local"
    assert first.get("X-Inlets-Upstream") == "127.0.0.1:5432"
    assert first.get("User-Agent") == f"gforward/{gforward.__version__}"
    assert not first.names & {"sec-websocket-protocol", "sec-websocket-extensions"}
    assert first.names <= ALLOWED_HEADERS, f"unexpected headers {first.names - ALLOWED_HEADERS}"


@pytest.mark.parametrize(
    ("host", "url_host", "path", "target"),
    [
        ("127.0.0.1", "127.0.0.1", "", "/vm/sbox-1/forward"),
        ("127.0.0.1", "127.0.0.1", "/", "/vm/sbox-1/forward"),
        ("127.0.0.1", "localhost", "/slicer/", "/slicer/vm/sbox-1/forward"),
        pytest.param("::1", "[::1]", "/a/b", "/a/b/vm/sbox-1/forward",
                     marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback")),
    ],
    ids=["no prefix", "slash", "localhost, prefix/", "ipv6, deep prefix"],
)
def test_base_url_host_and_prefix(host: str, url_host: str, path: str, target: str) -> None:
    with FakeDaemon(accept_then_close, host=host) as fake, forward(
        f"http://{url_host}:{fake.port}{path}"
    ) as fwd, connect(fwd) as sock:
        assert read_to_eof(sock) == b""
    request = fake.peers[0].request
    assert request is not None
    assert request.request_line == f"GET {target} HTTP/1.1"
    assert request.get("Host") == f"{url_host}:{fake.port}"


def test_token_client_id_and_user_agent_options(gflog: pytest.LogCaptureFixture) -> None:
    with FakeDaemon(accept_then_echo) as fake, forward(
        fake.url, token=TOKEN, client_id="ci-runner-7", user_agent="my-app/2.0 (tests)"
    ) as fwd:
        assert echo_once(local_address(fwd), b"x") == b"x"
    request = fake.peers[0].request
    assert request is not None
    assert request.request_line == "GET /vm/sbox-1/forward HTTP/1.1"
    assert request.get("Authorization") == f"Bearer {TOKEN}"
    assert request.get("X-Inlets-Client-ID") == "ci-runner-7"
    assert request.get("User-Agent") == "my-app/2.0 (tests)"
    assert_secret_not_logged(gflog, TOKEN)


@pytest.mark.parametrize(
    ("remote", "upstream"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("[::1]:80", "[::1]:80"),
        ("/var/run/docker.sock", "unix:/var/run/docker.sock"),
    ],
    ids=["tcp", "ipv6", "unix"],
)
@pytest.mark.parametrize("listen", ["tcp", "unix"])
def test_upstream_header(remote: str, upstream: str, listen: str, short_tmp: str) -> None:
    local = "127.0.0.1:0" if listen == "tcp" else os.path.join(short_tmp, "local.sock")
    with FakeDaemon(accept_then_close) as fake, forward(
        fake.url, specs=[f"{local}:{remote}"]
    ) as fwd:
        assert fwd.listeners[0].remote == upstream
        with connect(fwd) as sock:
            assert read_to_eof(sock) == b""
    request = fake.peers[0].request
    assert request is not None and request.get("X-Inlets-Upstream") == upstream


def test_unix_daemon_gets_host_localhost_and_no_prefix(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "fake-daemon.sock")
    with FakeDaemon(accept_then_echo, unix_path=path) as fake, forward(
        f"unix://{path}", vm_name="vm1"
    ) as fwd:
        assert echo_once(local_address(fwd), b"over unix") == b"over unix"
    request = fake.peers[0].request
    assert request is not None
    assert request.request_line == "GET /vm/vm1/forward HTTP/1.1"
    assert request.get("Host") == "localhost"


def test_gevent_websocket_accepts_our_upgrade_and_sees_our_headers(gws_url: str) -> None:
    with forward(gws_url, "[::1]:80", vm_name="headers", token=TOKEN) as fwd, connect(fwd) as sock:
        seen = json.loads(read_to_eof(sock))
    assert seen["request_line"] == "GET /slicer/vm/headers/forward HTTP/1.1"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["x-inlets-mode"] == "local"
    assert headers["x-inlets-upstream"] == "[::1]:80"
    assert headers["sec-websocket-version"] == "13"
    assert "sec-websocket-protocol" not in headers


# 2. Every base URL form reaches a real daemon ------------------------------------------


def test_http_base_url_with_prefix(gws_url: str) -> None:
    """The gevent-websocket peer serves only under /slicer: the prefix must be kept."""
    payload = os.urandom(200_000)  # small: gevent-websocket unmasks at a few MB/s
    with forward(gws_url, vm_name="echo") as fwd:
        for _ in range(3):
            assert echo_once(local_address(fwd), payload) == payload


def test_http_base_url_reference_daemon(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    assert daemon.url.startswith("http://")
    with forward(daemon.url + "/any/prefix", echo_server) as fwd:
        assert echo_once(local_address(fwd), b"plain http") == b"plain http"


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_https_base_url(host: str, ca: trustme.CA, tmp_path: Path, echo_server: str,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    _trust(ca, tmp_path, monkeypatch)
    with tls_daemon(ca, tmp_path, "127.0.0.1", "localhost") as daemon:
        port = daemon.url.rsplit(":", 1)[1]
        assert daemon.url.startswith("https://")
        with forward(f"https://{host}:{port}", echo_server) as fwd:
            payload = os.urandom(1 << 20)
            assert echo_once(local_address(fwd), payload) == payload


def test_https_sends_sni_and_host(ca: trustme.CA, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw TLS fake daemon: the name asked for in the handshake is the URL's host."""
    _trust(ca, tmp_path, monkeypatch)
    names: list[str | None] = []
    with FakeDaemon(tls_script(ca, names)) as fake, forward(
        f"https://localhost:{fake.port}/p"
    ) as fwd:
        assert echo_once(local_address(fwd), b"over TLS") == b"over TLS"
    assert names == ["localhost"]
    request = fake.peers[0].request
    assert request is not None
    assert request.request_line == "GET /p/vm/sbox-1/forward HTTP/1.1"
    assert request.get("Host") == f"localhost:{fake.port}"


@pytest.mark.parametrize("problem", ["untrusted CA", "wrong host name"])
def test_https_certificate_is_verified(problem: str, ca: trustme.CA, tmp_path: Path,
                                       echo_server: str, gflog: pytest.LogCaptureFixture,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if problem == "untrusted CA":
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the system store lacks our CA
        names: tuple[str, ...] = ("127.0.0.1",)
    else:
        _trust(ca, tmp_path, monkeypatch)
        names = ("daemon.example",)
    with tls_daemon(ca, tmp_path, *names) as daemon, forward(
        daemon.url, echo_server, token=TOKEN
    ) as fwd:
        with connect(fwd) as sock:
            sock.sendall(b"must not arrive")
            assert_closed_within(sock, IO_TIMEOUT)
        assert_logged(gflog, "CERTIFICATE_VERIFY_FAILED")
    assert_secret_not_logged(gflog, TOKEN)


@pytest.mark.parametrize("form", ["/abs", "unix:///abs", "./rel", "../rel", "x.sock", "~/x"])
def test_unix_socket_base_url(form: str, short_tmp: str, unix_echo_server: str,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(short_tmp, "daemon.sock")
    subdir = os.path.join(short_tmp, "sub")
    os.mkdir(subdir)
    base_url = {
        "/abs": path,
        "unix:///abs": "unix://" + path,
        "./rel": "./daemon.sock",
        "../rel": "../daemon.sock",
        "x.sock": "daemon.sock",
        "~/x": "~/daemon.sock",
    }[form]
    monkeypatch.chdir(subdir if form == "../rel" else short_tmp)
    monkeypatch.setenv("HOME", short_tmp)
    with gforward.daemon.start(listen=(), unix=[path]) as daemon:
        assert daemon.urls == [f"unix://{path}"]
        with forward(base_url, unix_echo_server) as fwd:
            monkeypatch.chdir("/")  # resolved at start(), not per connection
            assert echo_once(local_address(fwd), b"via " + form.encode()) == b"via " + form.encode()


# 3. Refusals: one tunnel fails, loudly, and the listener goes on ------------------------


def test_401_wrong_token(echo_server: str, gflog: pytest.LogCaptureFixture) -> None:
    """The daemon behind the same address is the strict one first, then an open one."""
    with gforward.daemon.start(token="the-right-one") as strict, gforward.daemon.start() as open_:
        switch = [lambda p: p.proxy(_addr(strict.url)), lambda p: p.proxy(_addr(open_.url))]
        with FakeDaemon(*switch) as fake, forward(fake.url, echo_server, token=TOKEN) as fwd:
            refused_then_echo_works(fwd, gflog, "HTTP/1.1 401 Unauthorized",
                                    "missing or wrong bearer token", secret=TOKEN)


def test_404_wrong_path_prefix(gws_root: str, daemon: gforward.daemon.Daemon, echo_server: str,
                               gflog: pytest.LogCaptureFixture) -> None:
    """gevent-websocket serves /slicer only; the next connection lands on a daemon that fits."""
    switch = [lambda p: p.proxy(_addr(gws_root)), lambda p: p.proxy(_addr(daemon.url))]
    with FakeDaemon(*switch) as fake, forward(fake.url + "/wrong", echo_server,
                                              vm_name="echo", token=TOKEN) as fwd:
        refused_then_echo_works(fwd, gflog, "404 Not Found",
                                "no such endpoint /wrong/vm/echo/forward", secret=TOKEN)


def test_502_upstream_port_closed(daemon: gforward.daemon.Daemon,
                                  upstream_hole: socket.socket,
                                  gflog: pytest.LogCaptureFixture) -> None:
    port = upstream_hole.getsockname()[1]
    with forward(daemon.url, f"127.0.0.1:{port}", token=TOKEN) as fwd:
        with connect(fwd) as sock:
            assert_closed_within(sock, IO_TIMEOUT)
        assert_logged(gflog, "502 Bad Gateway", f"cannot dial 127.0.0.1:{port}")
        # The guest comes up: the same listener now reaches it.
        upstream_hole.listen(1)
        upstream_hole.settimeout(IO_TIMEOUT)
        with connect(fwd) as sock:
            sock.sendall(b"ping")
            sock.shutdown(socket.SHUT_WR)
            guest, _ = upstream_hole.accept()
            with guest:
                guest.settimeout(IO_TIMEOUT)
                assert read_to_eof(guest) == b"ping"
                guest.sendall(b"pong")
            assert read_to_eof(sock) == b"pong"
    assert_secret_not_logged(gflog, TOKEN)


def _bad_accept(peer: Peer) -> None:
    peer.read_request()
    peer.accept(accept=base64.b64encode(hashlib.sha1(b"not the key").digest()).decode())
    peer.wait_eof()


def test_bad_sec_websocket_accept_fails_only_that_tunnel(gflog: pytest.LogCaptureFixture) -> None:
    with FakeDaemon(accept_then_echo, _bad_accept, accept_then_echo) as fake, forward(
        fake.url, token=TOKEN
    ) as fwd, connect(fwd) as established:
        established.sendall(b"1")
        assert read_exact(established, 1) == b"1"
        refused_then_echo_works(fwd, gflog, "HTTP/1.1 101 Switching Protocols", secret=TOKEN)
        established.sendall(b"2")  # other tunnels go on
        assert read_exact(established, 1) == b"2"
        established.shutdown(socket.SHUT_WR)
        assert read_to_eof(established) == b""


REFUSALS = {
    "403 with body": (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: 24\r\n\r\n"
        b"upstream is not allowed\n",
        ["HTTP/1.1 403 Forbidden", "upstream is not allowed"],
    ),
    "503 chunked": (
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"9\r\nvm is not\r\n9\r\n running\n\r\n0\r\n\r\n",
        ["HTTP/1.1 503 Service Unavailable", "vm is not running"],
    ),
    "200 instead of 101": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n<html></html>",
        ["HTTP/1.1 200 OK", "<html></html>"],
    ),
    "404 without body, kept alive": (
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        ["HTTP/1.1 404 Not Found"],
    ),
    "500 with a long body": (
        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100000\r\n\r\n"
        + b"traceback: " + b"x" * 99989,
        ["HTTP/1.1 500 Internal Server Error", "traceback: xxx"],
    ),
    "101 without Upgrade": (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
        ["HTTP/1.1 101 Switching Protocols"],
    ),
}


@pytest.mark.parametrize("answer", list(REFUSALS))
def test_non_101_answer_is_logged_with_status_and_body(answer: str,
                                                       gflog: pytest.LogCaptureFixture) -> None:
    raw, logged = REFUSALS[answer]
    refuse = answer_then_wait(raw)  # stays connected: the answer alone must end the tunnel
    with FakeDaemon(refuse, accept_then_echo) as fake, forward(
        fake.url, token=TOKEN, dial_timeout=5
    ) as fwd:
        refused_then_echo_works(fwd, gflog, *logged, secret=TOKEN)
    assert all(len(m) < 1000 for m in warnings_of(gflog)), "a whole body went into the log"


def test_refusal_with_unending_body_still_logs_its_status_line(
    gflog: pytest.LogCaptureFixture,
) -> None:
    refuse = answer_then_wait(b"HTTP/1.1 503 Service Unavailable\r\n\r\nvm is starting")
    with FakeDaemon(refuse) as fake, forward(fake.url, dial_timeout=1) as fwd, connect(fwd) as sock:
        assert_closed_within(sock, 1 + MARGIN)
    assert_logged(gflog, "HTTP/1.1 503 Service Unavailable")


# 4. A daemon that does not answer, or is not there -------------------------------------


_half_status_line = answer_then_wait(b"HTTP/1.1 101 Swi")


@pytest.mark.parametrize("script", [silent, _half_status_line, accept_tcp_only],
                         ids=["never answers", "half a status line", "never reads"])
def test_daemon_that_stalls_is_cut_at_dial_timeout(script: Script,
                                                    gflog: pytest.LogCaptureFixture) -> None:
    with FakeDaemon(script) as fake, forward(fake.url, dial_timeout=1, token=TOKEN) as fwd:
        with connect(fwd) as sock:
            assert_closed_within(sock, 1 + MARGIN)
        assert_logged(gflog, f"127.0.0.1:{fake.port}")
    assert_secret_not_logged(gflog, TOKEN)


_refuse_kept_alive = answer_then_wait(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize("script", [_bad_accept, _refuse_kept_alive, silent],
                         ids=["bad accept", "404 kept alive", "never answers"])
def test_failed_upgrade_closes_the_daemon_connection(script: Script,
                                                     gflog: pytest.LogCaptureFixture) -> None:
    """A daemon must not be left holding a connection its client has given up on.

    gflog keeps the log records, and with them the error's traceback: the socket
    must be closed on purpose, not left to the garbage collector.
    """
    with FakeDaemon(script) as fake, forward(fake.url, dial_timeout=1) as fwd:
        with connect(fwd) as sock:
            assert_closed_within(sock, 1 + MARGIN)
        assert fake.peers[0].eof.wait(MARGIN), "the daemon connection was left open"


def test_daemon_hangs_up_after_half_a_status_line(gflog: pytest.LogCaptureFixture) -> None:
    def half_then_close(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 101 Swi")

    with FakeDaemon(half_then_close) as fake, forward(fake.url) as fwd, connect(fwd) as sock:
        assert_closed_within(sock, IO_TIMEOUT)
    assert_logged(gflog, "HTTP/1.1 101 Swi")


@pytest.mark.parametrize("where", ["tcp", "unix"])
def test_daemon_down(where: str, upstream_hole: socket.socket, short_tmp: str,
                     gflog: pytest.LogCaptureFixture) -> None:
    if where == "tcp":
        port = upstream_hole.getsockname()[1]  # bound, not listening: refused
        base_url, shown = f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"
    else:
        base_url = shown = os.path.join(short_tmp, "no-daemon.sock")
    with forward(base_url, dial_timeout=1, token=TOKEN) as fwd:
        for _ in range(2):  # the listener survives it
            with connect(fwd) as sock:
                assert_closed_within(sock, 1 + MARGIN)
        assert_logged(gflog, shown)
    assert_secret_not_logged(gflog, TOKEN)


# 5. Data -----------------------------------------------------------------------------

BIG = 64 << 20


def test_64_mib_each_way_concurrently(daemon: gforward.daemon.Daemon) -> None:
    up, down = os.urandom(BIG), os.urandom(BIG)
    at_guest: dict[str, str] = {}

    def source_and_sink(sock: socket.socket) -> None:
        sender = threading.Thread(target=sock.sendall, args=(down,), daemon=True)
        sender.start()
        digest = hashlib.sha256()
        size = 0
        while data := sock.recv(1 << 20):
            digest.update(data)
            size += len(data)
        sender.join(IO_TIMEOUT * 3)
        at_guest.update(sha=digest.hexdigest(), size=str(size))

    failure: list[BaseException] = []

    def upload(sock: socket.socket) -> None:
        try:
            sock.sendall(up)
            sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:
            failure.append(exc)

    with Guest(source_and_sink) as guest, forward(daemon.url, guest.target) as fwd, connect(
        fwd, timeout=IO_TIMEOUT * 3
    ) as sock:
        uploader = threading.Thread(target=upload, args=(sock,), daemon=True)
        uploader.start()
        digest, size = hashlib.sha256(), 0
        while data := sock.recv(1 << 20):
            digest.update(data)
            size += len(data)
        uploader.join(IO_TIMEOUT)
        assert not failure, failure
    assert (size, digest.hexdigest()) == (BIG, hashlib.sha256(down).hexdigest())
    assert at_guest == {"size": str(BIG), "sha": hashlib.sha256(up).hexdigest()}


def test_small_payload_through_gevent_websocket(gws_url: str) -> None:
    payloads = [b"", b"\x00", os.urandom(125), os.urandom(126), os.urandom(65536),
                os.urandom(65537)]
    with forward(gws_url, vm_name="echo") as fwd, connect(fwd) as sock:
        for payload in payloads:
            if payload:
                sock.sendall(payload)
                assert read_exact(sock, len(payload)) == payload
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""


def test_local_bytes_go_as_masked_binary_frames_with_fresh_keys() -> None:
    frames: list[Frame] = []

    def record(peer: Peer) -> None:
        peer.read_request()
        peer.accept()
        while True:
            frame = peer.read_frame()
            frames.append(frame)
            if frame.opcode == OP_CLOSE:
                peer.close_ws()
                return
            peer.send_frame(OP_BINARY, frame.payload)

    with FakeDaemon(record) as fake, forward(fake.url) as fwd, connect(fwd) as sock:
        for i in range(4):  # one round trip each, so each is a frame of its own
            sock.sendall(b"chunk %d" % i)
            assert read_exact(sock, 7) == b"chunk %d" % i
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""
    data, close = frames[:-1], frames[-1]
    assert [f.payload for f in data] == [b"chunk %d" % i for i in range(4)]
    assert all(f.opcode == OP_BINARY and f.fin and f.masked for f in data)
    assert len({f.key for f in data}) == 4, "mask key reused"
    assert close.opcode == OP_CLOSE and close.masked
    assert struct.unpack("!H", close.payload[:2]) == (1000,)


# 6. Half-close and close ---------------------------------------------------------------


def test_half_close_request_then_full_reply(daemon: gforward.daemon.Daemon) -> None:
    request = os.urandom(300_000)
    with Guest(_reply_after_eof) as guest, forward(daemon.url, guest.target) as fwd, connect(
        fwd
    ) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        reply = read_to_eof(sock)
    digest = hashlib.sha256(request)
    assert reply == (b"%d %s\n" % (len(request), digest.hexdigest().encode())
                     + digest.digest() * 32768)


def test_daemon_data_after_our_close_frame_still_arrives() -> None:
    """Local EOF sends Close(1000); the daemon's reply frames, text ones too, still get through."""
    got: list[bytes] = []

    def reply_after_close(peer: Peer) -> None:
        peer.read_request()
        peer.accept()
        while (frame := peer.read_frame()).opcode != OP_CLOSE:
            got.append(frame.payload)
        got.append(frame.payload)
        peer.send_frame(OP_BINARY, b"reply, ")
        peer.send_frame(OP_TEXT, b"in two frames")
        peer.close_ws()
        peer.wait_eof()

    with FakeDaemon(reply_after_close) as fake, forward(fake.url) as fwd, connect(fwd) as sock:
        sock.sendall(b"request")
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b"reply, in two frames"
        assert fake.peers[0].eof.wait(IO_TIMEOUT)
    assert got == [b"request", struct.pack("!H", 1000)]


def test_guest_closes_first_local_sees_eof_promptly(daemon: gforward.daemon.Daemon) -> None:
    def banner_then_close(sock: socket.socket) -> None:
        sock.sendall(b"SSH-2.0-guest\r\n")

    with Guest(banner_then_close) as guest, forward(daemon.url, guest.target) as fwd, connect(
        fwd, timeout=PROMPT
    ) as sock:
        assert read_to_eof(sock) == b"SSH-2.0-guest\r\n"


def test_gevent_websocket_closes_first_local_sees_eof_promptly(gws_url: str) -> None:
    with forward(gws_url, vm_name="bye") as fwd, connect(fwd, timeout=PROMPT) as sock:
        assert read_to_eof(sock) == b"bye"


# 7. Pings ------------------------------------------------------------------------------


def test_gevent_websocket_ping_is_answered(gws_url: str) -> None:
    with forward(gws_url, vm_name="ping") as fwd, connect(fwd) as sock:
        first = b""
        while not first.endswith(b"}"):
            chunk = sock.recv(4096)
            assert chunk, f"EOF before the peer's report: {first!r}"
            first += chunk
        report = json.loads(first)
        assert report["pong"] == report["ping"] and report["ping"].startswith("gws-ping-")
        sock.sendall(b"still echoing")
        assert read_exact(sock, 13) == b"still echoing"


def _daemon_sends(frames: bytes, expected: bytes, *, with_101: bool = False) -> list[Frame]:
    """A fake daemon upgrades and sends `frames` (in the 101's own packet when `with_101`);
    the client reads `expected` from them, then half-closes and sees EOF, and the daemon
    sees the forwarder close its connection.  Returns the control frames the daemon got:
    the first (a pong), then those up to and with the client's Close."""
    control: list[Frame] = []

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.accept(then=frames, apart=not with_101)
        control.append(peer.read_frame())
        control.extend(peer.echo())
        peer.wait_eof()

    with FakeDaemon(script) as fake, forward(fake.url) as fwd, connect(fwd) as sock:
        assert read_exact(sock, len(expected)) == expected
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""
        assert fake.peers[0].eof.wait(IO_TIMEOUT)
    return control


@pytest.mark.parametrize("payload", [b"", b"\x00\xff\r\n binary", bytes(range(125))],
                         ids=["empty", "binary", "125 bytes"])
def test_ping_between_data_frames_is_answered_with_same_payload(payload: bytes) -> None:
    frames = (encode_frame(OP_BINARY, b"before ") + encode_frame(OP_PING, payload)
              + encode_frame(OP_BINARY, b"after"))
    control = _daemon_sends(frames, b"before after")
    pong = control[0]
    assert (pong.opcode, pong.fin, pong.masked, pong.payload) == (OP_PONG, True, True, payload)
    assert [f.opcode for f in control[1:]] == [OP_CLOSE]


def test_ping_in_the_same_packet_as_the_101() -> None:
    """Frames read along with the upgrade answer are not lost: the ping is still answered."""
    frames = encode_frame(OP_PING, b"early") + encode_frame(OP_BINARY, b"hello")
    control = _daemon_sends(frames, b"hello", with_101=True)
    assert (control[0].opcode, control[0].payload) == (OP_PONG, b"early")


def test_fragmented_message_with_a_ping_inside() -> None:
    """RFC 6455 5.4: control frames may come between the fragments of a message."""
    frames = (encode_frame(OP_TEXT, b"frag", fin=False) + encode_frame(OP_PING, b"mid")
              + encode_frame(0x0, b"men", fin=False) + encode_frame(0x0, b"ted", fin=True))
    control = _daemon_sends(frames, b"fragmented")
    assert (control[0].opcode, control[0].payload) == (OP_PONG, b"mid")
