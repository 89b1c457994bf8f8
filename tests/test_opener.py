"""The event-driven dial (gforward.opener) with real sockets: a tunnel opened through the
reference daemon, and each way a dial ends otherwise, as its caller sees it.

Each Opener runs in this thread's hub; daemons that misbehave on purpose are
the fake daemon's scripts, in threads of their own.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from typing import Any

import gevent
import pytest
from gevent.event import AsyncResult

import gforward.daemon
import gforward.opener
from gforward import dial
from gforward.opener import CONNECT_RETRY, Opener
from gforward.options import Options, settle
from gforward.proto import frames, handshake
from tests.peers.fake_daemon import FakeDaemon, Peer, Script, answer_then_wait, silent
from tests.support import (
    IO_TIMEOUT,
    MARGIN,
    HubErrors,
    blackhole,
    bug,
    closed_port,
    wait_until,
)

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


def at(fake: FakeDaemon) -> dial.Address:
    return (socket.AF_INET, ("127.0.0.1", fake.port))


def upgrade_then(frame: bytes) -> Script:
    """A fake daemon's script: a valid 101 with `frame` in the same send."""

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.accept(then=frame)
        peer.wait_eof()

    return script


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


@pytest.mark.parametrize("flag", ["SOCK_NONBLOCK", "without"])
def test_the_dialled_socket_never_blocks(flag: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where socket() takes no SOCK_NONBLOCK flag (macOS), the socket is made non-blocking
    by a call of its own: a blocking one would stop the hub while it waits."""
    if flag == "without":
        monkeypatch.setattr(gforward.opener, "_NONBLOCK", 0)
    with FakeDaemon(upgrade_then(b"")) as fake:
        (sock, _), _ = Dial(at(fake)).outcome()
        with contextlib.closing(sock):
            assert not sock.getblocking()


def test_frames_read_with_the_101_are_handed_over() -> None:
    frame = frames.encode_frame(frames.OP_BINARY, b"early", mask=False)
    with FakeDaemon(upgrade_then(frame)) as fake:
        (sock, trailing), _ = Dial(at(fake)).outcome()
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
        listener.settimeout(IO_TIMEOUT)
        server = threading.Thread(target=lambda: upgrade_then(b"")(Peer(listener.accept()[0])))
        server.start()
        (sock, trailing), _ = opening.outcome()
        sock.close()
        server.join(IO_TIMEOUT)
    assert trailing == b""


# Ended otherwise -----------------------------------------------------------------------


def test_a_closed_port_is_unreachable() -> None:
    exc = Dial((socket.AF_INET, ("127.0.0.1", closed_port()))).error()
    assert isinstance(exc, dial.DialError)
    assert exc.cause == "unreachable"
    assert str(exc) == f"cannot reach {WHERE}: [Errno 111] Connection refused"


@pytest.mark.parametrize("daemon", ["silent", "blackholed"])
def test_no_answer_in_time_is_a_timeout(daemon: str) -> None:
    with blackhole() as port, FakeDaemon(silent) as fake:
        address = at(fake) if daemon == "silent" else (socket.AF_INET, ("127.0.0.1", port))
        opening = Dial(address, timeout=0.5)
        exc, took = opening.outcome()
    assert isinstance(exc, dial.DialError)
    assert (exc.cause, str(exc)) == ("timeout", f"no answer from {WHERE} within 0.5 s")
    assert 0.5 <= took < 0.5 + MARGIN
    assert opening.calls == 1 and opening.opener.sockets() == []


def test_a_refusal_waits_a_moment_for_its_body_not_the_whole_timeout() -> None:
    head = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nno entry"  # 92 never come
    with FakeDaemon(answer_then_wait(head)) as fake:
        exc, took = Dial(at(fake), timeout=IO_TIMEOUT).outcome()
    assert isinstance(exc, handshake.HandshakeError)
    assert (exc.cause, str(exc)) == ("http 403", "upgrade refused: HTTP/1.1 403 Forbidden no entry")
    assert took < dial.REFUSAL_BODY_WAIT + MARGIN


def test_a_daemon_that_closes_before_answering() -> None:
    def half_an_answer(peer: Peer) -> None:
        peer.read_request()
        peer.send(b"HTTP/1.1 1")  # and the connection ends with the script

    with FakeDaemon(half_an_answer) as fake:
        exc = Dial(at(fake)).error()
    assert isinstance(exc, handshake.HandshakeError)
    assert str(exc) == "daemon closed the connection before answering: HTTP/1.1 1"


def test_an_abort_ends_it_once_and_closes_its_socket() -> None:
    aborted = threading.Event()

    def late_answer(peer: Peer) -> None:
        peer.read_request()
        aborted.wait(IO_TIMEOUT)
        with contextlib.suppress(OSError):  # the Opener's socket is closed by now
            peer.send(b"HTTP/1.1 101 late\r\n\r\n")
        peer.wait_eof()

    with FakeDaemon(late_answer) as fake:
        opening = Dial(at(fake))
        assert wait_until(lambda: fake.peers and fake.peers[0].request, IO_TIMEOUT,
                          sleep=gevent.sleep)
        opening.opener.abort("closed with its listener")
        exc = opening.error()
        assert isinstance(exc, dial.DialError) and str(exc) == "closed with its listener"
        aborted.set()
        peer = fake.peers[0]
        assert peer.request is not None
        assert peer.request.request_line == "GET /vm/vm1/forward HTTP/1.1"
        assert peer.eof.wait(IO_TIMEOUT)  # the request, then the end
        opening.opener.abort("again")
        gevent.sleep(0.1)  # the late answer, had anything still watched for it
    assert opening.calls == 1 and opening.opener.sockets() == []


@pytest.mark.parametrize("where", ["missing unix socket", "closed port", "no answer"])
def test_a_bug_in_making_the_error_ends_it_once_with_that_bug(
    where: str, short_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dial's error cannot be made (a bug, injected here), whether the dial ends at once
    (inside start), from a watcher or from its timer: it ends once, with the bug, its
    socket closed, and no timer is left to end it again."""
    monkeypatch.setattr(gforward.opener, "failure", bug("no error today"))
    monkeypatch.setattr(gforward.opener, "timed_out", bug("no error today"))
    with HubErrors() as hub, blackhole() as port:
        address = {
            "missing unix socket": (socket.AF_UNIX, os.path.join(short_tmp, "nobody.sock")),
            "closed port": (socket.AF_INET, ("127.0.0.1", closed_port())),
            "no answer": (socket.AF_INET, ("127.0.0.1", port)),
        }[where]
        opening = Dial(address, timeout=0.3)
        exc = opening.error()
        gevent.sleep(0.3 + 0.2)  # past the timeout: a timer left running would end it again
    assert isinstance(exc, RuntimeError) and str(exc) == "no error today"
    assert opening.calls == 1 and opening.opener.sockets() == []
    assert not hub.errors, hub.errors
