"""The event-driven dial (gforward.opener) with real sockets: a tunnel opened through the
reference daemon, and each way a dial ends otherwise, as its caller sees it.

Each Opener runs in this thread's hub; daemons that misbehave on purpose are
plain sockets served from a thread of their own.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import pytest
from gevent.event import AsyncResult

import gforward.daemon
from gforward import dial
from gforward.opener import CONNECT_RETRY, Opener
from gforward.options import Options, settle
from gforward.proto import frames, handshake
from tests.support import IO_TIMEOUT, MARGIN, blackhole, closed_port

WHERE = "the daemon"


class Dial:
    """One Opener in this thread's hub, and how it ended."""

    def __init__(self, address: dial.Address, upgrade: handshake.ClientHandshake | None = None,
                 timeout: float = IO_TIMEOUT) -> None:
        self.ended: AsyncResult = AsyncResult()
        self.calls = 0
        self.opener = Opener(address, upgrade or plain_upgrade().handshake(), timeout,
                             lambda: WHERE, self._opened, self._failed)
        self.began = time.monotonic()
        self.opener.start()

    def _opened(self, sock: Any, trailing: bytes) -> None:
        self.calls += 1
        self.ended.set((sock, trailing))

    def _failed(self, exc: BaseException) -> None:
        self.calls += 1
        self.ended.set(exc)

    def outcome(self) -> tuple[Any, float]:
        """What it ended with (the socket and trailing bytes, or the error), and when."""
        value = self.ended.get(timeout=IO_TIMEOUT + MARGIN)
        return value, time.monotonic() - self.began

    def error(self) -> BaseException:
        value, _ = self.outcome()
        assert isinstance(value, BaseException), value
        return value


def plain_upgrade(upstream: str = "127.0.0.1:9") -> handshake.Upgrade:
    return handshake.Upgrade(host="localhost", target="/vm/vm1/forward", headers=[
        ("X-Inlets-Upstream", upstream)])


@contextmanager
def answering(listener: socket.socket, answer: Callable[[bytes], bytes],
              hold: bool = True) -> Iterator[None]:
    """Serve one connection on `listener` from a thread: read the upgrade request, write
    `answer(request head)`, then hold the connection until the test is over (or close
    it, unless `hold`).  The test waits for the Opener inside: its hub must run."""
    held: list[socket.socket] = []

    def serve() -> None:
        sock, _ = listener.accept()
        held.append(sock)
        sock.settimeout(IO_TIMEOUT)
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = sock.recv(4096)
            if not chunk:
                return
            request += chunk
        sock.sendall(answer(request))
        if not hold:
            sock.close()

    listener.settimeout(IO_TIMEOUT)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join(IO_TIMEOUT)
        for sock in held:
            sock.close()


def accept_101(request: bytes) -> bytes:
    """A valid 101 to `request`, by the reference daemon's own handshake code."""
    server = handshake.ServerHandshake()
    assert server.receive(request) is not None
    return server.accept()


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


def v4(listener: socket.socket) -> dial.Address:
    return (socket.AF_INET, listener.getsockname())


# Opened --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_a_tunnel_opened_through_the_reference_daemon_carries_bytes(
        kind: str, echo_server: str, short_tmp: str) -> None:
    unix = [os.path.join(short_tmp, "daemon.sock")] if kind == "unix" else []
    with gforward.daemon.start(listen=[] if unix else ["127.0.0.1:0"], unix=unix) as daemon:
        mappings, settings = settle(Options(base_url=daemon.url, vm_name="vm1",
                                            specs=[f"127.0.0.1:0:{echo_server}"]))
        address = dial.known_address(settings.endpoint)
        assert address is not None
        upgrade = settings.upgrade(mappings[0].remote_target()).handshake()
        (sock, trailing), _ = Dial(address, upgrade).outcome()
        with socket.socket(fileno=sock.detach()) as stream:
            assert trailing == b""
            if kind == "tcp":
                assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            stream.setblocking(True)
            stream.settimeout(IO_TIMEOUT)
            stream.sendall(frames.encode_frame(frames.OP_BINARY, b"hello", mask=True))
            echoed = b""
            while len(echoed) < 7:
                echoed += stream.recv(64)
            assert echoed == frames.encode_frame(frames.OP_BINARY, b"hello", mask=False)


def test_frames_read_with_the_101_are_handed_over(tcp_listener: socket.socket) -> None:
    frame = frames.encode_frame(frames.OP_BINARY, b"early", mask=False)
    with answering(tcp_listener, lambda request: accept_101(request) + frame):
        (sock, trailing), _ = Dial(v4(tcp_listener)).outcome()
        sock.close()
    assert trailing == frame


def test_a_unix_daemon_whose_backlog_is_full_is_tried_again(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "full.sock")
    with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as first:
        listener.bind(path)
        listener.listen(0)
        first.connect(path)  # the backlog holds one: it is full now
        with socket.socket(socket.AF_UNIX) as probe:
            probe.setblocking(False)
            assert probe.connect_ex(path) == errno.EAGAIN  # what the Opener sees too
        opening = Dial((socket.AF_UNIX, path))
        gevent.sleep(CONNECT_RETRY * 10)  # a few tries
        assert not opening.ended.ready()
        listener.accept()[0].close()  # room in the backlog for the Opener's next try
        with answering(listener, accept_101):
            (sock, trailing), _ = opening.outcome()
            sock.close()
    assert trailing == b""


# Ended otherwise -----------------------------------------------------------------------


def test_a_closed_port_is_unreachable() -> None:
    exc = Dial((socket.AF_INET, ("127.0.0.1", closed_port()))).error()
    assert isinstance(exc, dial.DialError)
    assert exc.cause == "unreachable"
    assert str(exc) == f"cannot reach {WHERE}: [Errno 111] Connection refused"


@pytest.mark.parametrize("daemon", ["silent", "blackholed"])
def test_no_answer_in_time_is_a_timeout(daemon: str, tcp_listener: socket.socket) -> None:
    with blackhole() as port:
        address = v4(tcp_listener) if daemon == "silent" else (socket.AF_INET,
                                                               ("127.0.0.1", port))
        opening = Dial(address, timeout=0.5)
        exc, took = opening.outcome()
    assert isinstance(exc, dial.DialError)
    assert (exc.cause, str(exc)) == ("timeout", f"no answer from {WHERE} within 0.5 s")
    assert 0.5 <= took < 0.5 + MARGIN
    assert opening.calls == 1 and opening.opener.sockets() == []


def test_a_refusal_waits_a_moment_for_its_body_not_the_whole_timeout(
        tcp_listener: socket.socket) -> None:
    head = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nno entry"  # 92 never come
    with answering(tcp_listener, lambda request: head):
        exc, took = Dial(v4(tcp_listener), timeout=IO_TIMEOUT).outcome()
    assert isinstance(exc, handshake.HandshakeError)
    assert (exc.cause, str(exc)) == ("http 403", "upgrade refused: HTTP/1.1 403 Forbidden no entry")
    assert took < dial.REFUSAL_BODY_WAIT + MARGIN


def test_a_daemon_that_closes_before_answering(tcp_listener: socket.socket) -> None:
    with answering(tcp_listener, lambda request: b"HTTP/1.1 1", hold=False):
        exc = Dial(v4(tcp_listener)).error()
    assert isinstance(exc, handshake.HandshakeError)
    assert str(exc) == "daemon closed the connection before answering: HTTP/1.1 1"


def test_an_abort_ends_it_once_and_closes_its_socket(tcp_listener: socket.socket) -> None:
    opening = Dial(v4(tcp_listener))
    tcp_listener.settimeout(IO_TIMEOUT)
    dialled, _ = tcp_listener.accept()
    with dialled:
        assert wait_for(lambda: bool(select.select([dialled], [], [], 0)[0]))  # the request
        opening.opener.abort("closed with its listener")
        exc = opening.error()
        assert isinstance(exc, dial.DialError) and str(exc) == "closed with its listener"
        dialled.settimeout(IO_TIMEOUT)
        request = b""
        while chunk := dialled.recv(4096):  # the request, then the end
            request += chunk
        assert request.startswith(b"GET /vm/vm1/forward HTTP/1.1\r\n")
        dialled.sendall(b"HTTP/1.1 101 late\r\n\r\n")
    opening.opener.abort("again")
    gevent.sleep(0.1)  # the late answer, had anything still watched for it
    assert opening.calls == 1 and opening.opener.sockets() == []


def wait_for(condition: Callable[[], bool]) -> bool:
    """`condition()` turned true while this thread's hub ran, within IO_TIMEOUT."""
    deadline = time.monotonic() + IO_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            return False
        gevent.sleep(0.01)
    return True
