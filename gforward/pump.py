"""One tunnel: bytes between a plain socket and a WebSocket, both ways.

Theory of operation
-------------------
The "plain" socket is the local connection (client role, in the forwarder)
or the upstream inside the guest (server role, in the daemon).  Two
greenlets move bytes, one per direction; the caller's greenlet runs
WebSocket -> plain and a second one runs plain -> WebSocket.  Each blocks
in `recv` or `sendall`, so a slow reader holds back its writer through TCP
itself: a tunnel never holds more than one read per direction.

A blocked greenlet costs about 8 KiB, and tunnels often sit idle (pools of
connections opened ahead of use), so the second greenlet is only spawned,
by an io watcher's callback, once plain has something to say.

Closing follows RFC 6455 section 7 with half-closes carried across:

* plain EOF: send Close(1000) and stop reading plain; frames still arriving
  go on to plain until the peer's Close (that is how a reply reaches a
  client that half-closed).
* peer Close: shut plain for writing at once, so its user sees EOF, and go
  on sending what plain still says; our Close, the answer (API.md step 5),
  follows plain's EOF.  Nothing plain sends is dropped on the floor: a peer
  that hangs up after its Close cuts the tunnel, and plain sees a reset.
  Both roles behave alike; the client role only masks its frames.
* Once one direction is done, the other gets `linger` seconds of silence
  before the tunnel is cut, so no tunnel outlives a peer that went quiet.
* Anything abnormal (a socket error, the WebSocket lost without a Close, a
  protocol error, a Close with an error code) ends both sides at once, the
  plain one with a reset so that its user knows the stream was cut short.
"""

from __future__ import annotations

import contextlib
import struct
import time
from typing import Any, Callable

import gevent
from gevent import socket, ssl
from gevent.event import Event
from gevent.lock import Semaphore

from . import frames
from .frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, Buffer

CHUNK = 256 * 1024
LINGER = 5.0
_CLEAN_CODES = (frames.CLOSE_NORMAL, frames.CLOSE_GOING_AWAY, 1005)


class TunnelCut(Exception):
    """Ends a tunnel abnormally; the message is the reason logged."""


class Pump:
    """Moves one tunnel's bytes until both sides are done; see the module doc."""

    def __init__(
        self,
        plain: socket.socket,
        ws: socket.socket,
        *,
        client: bool,
        trailing: bytes = b"",
        linger: float = LINGER,
        ping_interval: float = 0.0,
        ping_timeout: float = 0.0,
    ) -> None:
        self.plain = plain
        self.ws = ws
        self.client = client
        self.linger = linger
        self.ping_interval = ping_interval  # 0: no keepalive
        self.ping_timeout = ping_timeout
        self.sent = 0  # payload bytes plain -> WebSocket
        self.received = 0  # payload bytes WebSocket -> plain
        self.reason = ""  # why the tunnel ended; set once
        self.failed = False
        self._trailing = trailing
        self._write_lock = Semaphore()
        self._close_sent = False
        self._close_received = False
        self._finished = 0  # directions that ended well
        self._both_finished = Event()  # ...or the tunnel was cut
        # Last progress of each direction, for the linger and keepalive rules.
        self._to_ws_at = self._to_plain_at = time.monotonic()
        self._plain_readable: Any = None  # io watcher that starts plain -> WebSocket
        self._plain_to_ws_greenlet: gevent.Greenlet | None = None
        self._keepalive: Any = None  # timer watcher, while pings are on
        self._ping_sent_at: float | None = None

    def run(self) -> None:
        """Pump both directions; returns once the tunnel is over and both sockets closed."""
        self._plain_readable = gevent.get_hub().loop.io(self.plain.fileno(), 1)
        self._plain_readable.start(self._start_plain_to_ws)
        if self.ping_interval > 0:
            self._schedule_keepalive(self.ping_interval)
        try:
            self._direction(self._ws_to_plain, to_plain=True)
        finally:
            if self._plain_to_ws_greenlet is not None:
                self._plain_to_ws_greenlet.join()
            self._cut("", reset=False)

    def _start_plain_to_ws(self) -> None:
        """The watcher's callback, in the hub: plain spoke (or closed), so give it a greenlet.

        Also called once WebSocket -> plain is done: the tunnel's end then waits on
        plain, and a greenlet blocked in recv is what a close() or the linger can end.
        """
        if self._plain_to_ws_greenlet is None:
            self._plain_readable.close()  # done with: its memory counts, per idle tunnel
            self._plain_to_ws_greenlet = gevent.spawn(self._direction, self._plain_to_ws,
                                                      to_plain=False)

    # Each direction --------------------------------------------------------

    # A loop below never keeps its last read in a variable while it waits for the
    # next: an idle tunnel would otherwise hold up to CHUNK bytes per direction.

    def _plain_to_ws(self) -> None:
        while self._forward(self.plain.recv(CHUNK)):
            pass
        try:
            self._send_close(frames.CLOSE_NORMAL, "")
        except OSError:
            if not self._close_received:
                raise
            # The peer hung up right after its own Close, as some daemons do: nothing lost.

    def _forward(self, data: bytes) -> bool:
        """One read from plain goes out as one binary frame; False at plain's EOF."""
        if not data:
            return False
        self._to_ws_at = time.monotonic()
        if self._send(OP_BINARY, data):
            self.sent += len(data)
        return True

    def _ws_to_plain(self) -> None:
        reader = frames.FrameReader(masked=not self.client)
        trailing, self._trailing = self._trailing, b""
        if self._on_frames(reader, trailing):
            return
        del trailing
        while not self._on_frames(reader, self._read_ws()):
            pass

    def _read_ws(self) -> bytes:
        data: bytes = self.ws.recv(CHUNK)
        if not data:
            raise TunnelCut("WebSocket lost without a Close frame")
        self._to_plain_at = time.monotonic()
        return data

    def _on_frames(self, reader: frames.FrameReader, data: Buffer) -> bool:
        """Act on what one read holds; True once the peer's Close came.

        A read may end one frame and start the next: one vectored send for both.
        """
        pieces: list[Buffer] = []
        try:
            for event in reader.feed(data):
                if type(event) is frames.Data:
                    pieces.append(event.payload)
                elif isinstance(event, frames.Ping):
                    self._send(OP_PONG, event.payload)
                elif isinstance(event, frames.Close):
                    self._deliver(pieces)
                    self._on_close(event)
                    return True
        except frames.ProtocolError:
            self._deliver(pieces)  # what came before the bad frame is good
            raise
        self._deliver(pieces)
        return False

    def _deliver(self, pieces: list[Buffer]) -> None:
        if pieces:
            self.received += sum(map(len, pieces))
            send_buffers(self.plain, pieces)
            self._to_plain_at = time.monotonic()

    def _on_close(self, close: frames.Close) -> None:
        """The peer is done sending: carry its half-close to plain."""
        self._close_received = True
        if close.code not in _CLEAN_CODES:
            raise TunnelCut(f"peer closed with code {close.code} {close.reason!r}".rstrip())
        self.plain.shutdown(socket.SHUT_WR)

    # Keepalive -------------------------------------------------------------

    def _schedule_keepalive(self, delay: float) -> None:
        if self._keepalive is not None:
            self._keepalive.close()
        self._keepalive = gevent.get_hub().loop.timer(max(delay, 0.0))
        self._keepalive.start(self._check_alive)

    def _check_alive(self) -> None:
        """Timer callback, in the hub: a peer silent for ping_interval gets a Ping; one
        silent for ping_timeout more is taken for dead (load balancers drop idle flows
        without a word), and the tunnel is cut, local client included."""
        if self._close_sent or self._close_received:
            return  # closing: the linger rules bound what is left
        now = time.monotonic()
        heard = self._to_plain_at  # any bytes from the peer prove it alive
        if self._ping_sent_at is not None and heard < self._ping_sent_at:
            if now - self._ping_sent_at >= self.ping_timeout:
                self._cut(f"no answer to a ping within {self.ping_timeout:g} s")
                return
            self._schedule_keepalive(self._ping_sent_at + self.ping_timeout - now)
        elif now - heard >= self.ping_interval:
            self._ping_sent_at = now
            gevent.spawn(self._ping)
            self._schedule_keepalive(self.ping_timeout)
        else:
            self._ping_sent_at = None
            self._schedule_keepalive(heard + self.ping_interval - now)

    def _ping(self) -> None:
        with contextlib.suppress(OSError):  # the tunnel may end meanwhile
            self._send(OP_PING, b"")

    # Supervision -----------------------------------------------------------

    def _direction(self, loop: Callable[[], None], *, to_plain: bool) -> None:
        """Run one direction; when it ends well, give the other `linger` idle seconds."""
        try:
            loop()
        except frames.ProtocolError as exc:
            # Best effort: the peer may be stuck too.
            with gevent.Timeout(1.0, False), contextlib.suppress(OSError):
                self._send_close(exc.code, exc.reason)
            self._cut(f"protocol error: {exc.reason}")
            return
        except (TunnelCut, OSError) as exc:
            self._cut(str(exc))
            return
        self._finished += 1
        if self._finished == 2:
            self._both_finished.set()
        elif to_plain:
            self._start_plain_to_ws()
        while not self._both_finished.wait(self.linger):
            other_at = self._to_ws_at if to_plain else self._to_plain_at
            if time.monotonic() - other_at >= self.linger:
                self._cut(f"no data for {self.linger:g} s after the other side finished",
                          reset=False)
                return

    def _cut(self, reason: str, *, reset: bool = True) -> None:
        """End the tunnel now (idempotent); the first reason given is the one kept."""
        if not self.reason:
            clean = self._close_sent and self._close_received
            self.reason = reason if reason and not clean else "closed"
            self.failed = reset and not clean
        if self.failed:
            _reset(self.plain)
        if self._keepalive is not None:
            self._keepalive.close()
        if self._plain_readable is not None:
            self._plain_readable.close()  # before its fd is closed, and maybe reused
        self.plain.close()
        self.ws.close()
        self._both_finished.set()  # nothing left to linger for

    # Writing frames --------------------------------------------------------

    def _send_close(self, code: int, reason: str) -> None:
        self._send(OP_CLOSE, frames.close_payload(code, reason))

    def _send(self, opcode: int, payload: Buffer) -> bool:
        """Write one frame, serialised: a pong must not land inside a data frame.

        Returns False, sending nothing, once our Close is out: the peer takes no more.
        """
        header, body = frames.frame_parts(opcode, payload, mask=self.client)
        with self._write_lock:
            if self._close_sent:
                return False
            self._close_sent = opcode == OP_CLOSE
            send_buffers(self.ws, [header, body])
        return True


def send_buffers(sock: socket.socket, buffers: list[Buffer]) -> None:
    """sendall() of several buffers without joining them: sendmsg, then what is left.
    Consumes `buffers`.

    Also spares gevent's sendall, which asks the kernel for SO_SNDBUF on every call.
    """
    if isinstance(sock, ssl.SSLSocket):  # TLS sockets have no sendmsg
        sock.sendall(b"".join(buffers))
        return
    while True:
        sent = sock.sendmsg(buffers)
        while buffers and sent >= len(buffers[0]):
            sent -= len(buffers[0])
            del buffers[0]
        if not buffers:
            return
        buffers[0] = memoryview(buffers[0])[sent:]


def _reset(sock: socket.socket) -> None:
    """Make the coming close() send RST: the plain side's user must see a cut, not an end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
