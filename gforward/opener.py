"""The usual tunnel's dial and upgrade, driven by the hub's watchers as the pump is.

A daemon at an IP address or a unix path, with neither TLS nor a proxy, is
reached without a greenlet or a gevent socket: a non-blocking connect, the
upgrade request written and its answer read when the kernel says so, in
callbacks the hub calls without a switch, under one timer.  That is most of
a tunnel's setup cost saved for one connection per request.  Everything
else (names to look up, Happy Eyeballs, TLS, proxies) takes `dial`'s
greenlet path; both end in the same errors, made by `dial`.
"""

from __future__ import annotations

import _socket
import errno
import os
from typing import Any, Callable

import gevent

from .dial import REFUSAL_BODY_WAIT, Address, DialError, failure, set_nodelay, timed_out
from .proto.handshake import Accepted, ClientHandshake
from .queues import READ, WRITE
from .tls import RECV_SIZE

_PENDING = (errno.EINPROGRESS, errno.EALREADY)  # TCP: the answer comes as writability
_Callbacks = tuple[Callable[[Any, bytes], None], Callable[[BaseException], None]]
CONNECT_RETRY = 0.01  # seconds before connecting again to a unix socket whose backlog is full
_NONBLOCK = getattr(_socket, "SOCK_NONBLOCK", 0)  # Linux and the BSDs: one system call less


class Opener:
    """Opens one WebSocket to the daemon from the hub's callbacks; then calls
    `on_open(socket, trailing)` (a non-blocking standard socket, the frames read
    with the 101) or `on_fail(error)`, exactly once either way."""

    __slots__ = ("_address", "_callbacks", "_deadline", "_handshake", "_out", "_sock",
                 "_timeout", "_timer", "_waiting", "_where")

    def __init__(self, address: Address, handshake: ClientHandshake, timeout: float,
                 where: Callable[[], str], on_open: Callable[[Any, bytes], None],
                 on_fail: Callable[[BaseException], None]) -> None:
        self._address = address
        self._handshake = handshake
        self._timeout = timeout
        self._where = where  # the daemon's description, wanted only for an error
        self._callbacks: _Callbacks | None = (on_open, on_fail)
        self._out = handshake.request  # what is left to send of it
        self._sock: Any = None
        self._timer: Any = None
        self._deadline = 0.0  # on the loop's clock
        self._waiting: Any = None  # the one watcher the dial waits on

    def start(self) -> None:
        """Begin, in the hub's thread.  It raises nothing of its own: a dial that ends at
        once (a unix socket that is not there) has called on_fail by the time it returns."""
        self._step(self._begin)

    def sockets(self) -> list[Any]:
        """The socket it dials, until the pump has it (for a forked child to let go of)."""
        return [] if self._sock is None else [self._sock]

    def abort(self, reason: str) -> None:
        """End the dial now, from the hub's thread (the forwarder closes)."""
        self._fail(DialError(reason))

    # Steps, each in a hub callback ----------------------------------------------

    def _step(self, step: Callable[[], Accepted | None]) -> None:
        """Run one step; whatever it raises ends the dial with that error, so that a bug
        too ends it once (a timer left running would end it again).  The callbacks run
        outside: what they raise is theirs, for the hub to report."""
        try:
            try:
                accepted = step()
            except OSError as exc:  # told as the dial's error, as dial's greenlet path does;
                raise failure(exc, self._where()) from exc  # a bug in that lands below too
        except Exception as exc:  # that, a refusal, the time running out, or a bug
            self._fail(exc)
        else:
            if accepted is not None:
                self._open(accepted.trailing)

    def _begin(self) -> None:
        """The first step: the timer is armed inside the guard, like everything else."""
        loop = gevent.get_hub().loop
        loop.update_now()  # its clock may be a loop iteration old: the timer would come early
        self._deadline = loop.now() + self._timeout
        self._arm(self._timeout)
        self._connect()

    def _connect(self) -> None:
        family, sockaddr = self._address
        if self._sock is None:
            self._sock = _socket.socket(family, _socket.SOCK_STREAM | _NONBLOCK)
            if not _NONBLOCK:
                self._sock.setblocking(False)
            if family != _socket.AF_UNIX:  # a unix socket has no Nagle to turn off
                set_nodelay(self._sock)
        code = self._sock.connect_ex(sockaddr)
        if code in (0, errno.EISCONN):
            self._send()
        elif code in _PENDING:
            self._wait(WRITE, self._connected)
        elif code == errno.EAGAIN and family == _socket.AF_UNIX:  # its backlog is full, and
            # no event says when it has room
            self._wait_timer(CONNECT_RETRY, self._connect)
        else:
            raise OSError(code, os.strerror(code))

    def _connected(self) -> None:
        """A TCP connect ended: SO_ERROR says how."""
        code = self._sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR)
        if code:
            raise OSError(code, os.strerror(code))
        self._send()

    def _send(self) -> None:
        try:
            sent = self._sock.send(self._out)
        except BlockingIOError:
            sent = 0
        self._out = self._out[sent:]
        if self._out:
            self._wait(WRITE, self._send)
        else:
            self._wait(READ, self._receive)

    def _receive(self) -> Accepted | None:
        try:
            data = self._sock.recv(RECV_SIZE)
        except BlockingIOError:
            return None
        handshake = self._handshake
        refused = handshake.refused
        accepted = handshake.receive(data)
        if accepted is None and handshake.refused and not refused:
            # A refusal's body is only wanted for the log: a moment for it, not the rest
            # of the timeout.
            left = self._deadline - gevent.get_hub().loop.now()
            self._arm(max(min(REFUSAL_BODY_WAIT, left), 0.0))
        return accepted

    def _arm(self, seconds: float) -> None:
        """(Re)start the one timer that bounds the dial."""
        if self._timer is not None:
            self._timer.close()
        self._timer = gevent.get_hub().loop.timer(seconds)
        self._timer.start(self._step, self._time_out)

    def _time_out(self) -> None:
        """A step of the timer: raised, so that a bug in making this error ends it too."""
        raise timed_out(self._handshake, self._where(), self._timeout)

    # Watchers ---------------------------------------------------------------------

    def _wait(self, events: int, step: Callable[[], Accepted | None]) -> None:
        self._stop_waiting()
        self._waiting = gevent.get_hub().loop.io(self._sock.fileno(), events)
        self._waiting.start(self._step, step)

    def _wait_timer(self, seconds: float, step: Callable[[], Accepted | None]) -> None:
        self._stop_waiting()
        self._waiting = gevent.get_hub().loop.timer(seconds)
        self._waiting.start(self._step, step)

    def _stop_waiting(self) -> None:
        if self._waiting is not None:
            self._waiting.close()
            self._waiting = None

    # The end --------------------------------------------------------------------

    def _open(self, trailing: bytes) -> None:
        callbacks = self._end()
        try:
            if callbacks is not None:
                callbacks[0](self._sock, trailing)
        finally:  # the socket is on_open's now, even if it raised
            self._sock = None  # listed until then, so that a fork meanwhile finds it

    def _fail(self, exc: BaseException) -> None:
        callbacks = self._end()
        if callbacks is not None:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            callbacks[1](exc)

    def _end(self) -> _Callbacks | None:
        """Stop every watcher and let go of the callbacks (which hold what holds this
        opener: no cycle is left to a garbage collector, which may run in another thread),
        once: the callbacks to call, None if it ended before."""
        callbacks, self._callbacks = self._callbacks, None
        self._stop_waiting()
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        return callbacks
