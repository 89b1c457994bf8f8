"""The event-driven driver of one tunnel: the hub's watchers feed its Tunnel, and
what the Tunnel queues is written without ever blocking.

No greenlet waits here: a socket is read only when the kernel says it is
readable (so no recv ends in EAGAIN), in a callback the hub calls without a
switch.  A send that does not take everything leaves the rest queued and
waits for a write watcher; meanwhile the side that feeds that queue is not
read (the Tunnel's flow control).  An idle tunnel is two read watchers and
its state.  The rules live in `proto.tunnel`; this module moves bytes and
watchers, and counts bytes for the stats.  `tls.TLSPump` is the same driver
with its WebSocket in TLS.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
import time
from typing import Any, Callable

import gevent

from .proto.records import Counters
from .proto.tunnel import Tunnel
from .queues import CHUNK, IOV_MAX, READ, WRITE, describe, give_buffer, send_queue, take_buffer

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_monotonic = time.monotonic
LINGER_STALL = 10.0  # seconds a local side that still sends may acknowledge nothing at the end
# Seconds between looks at what it has not acknowledged: the first, and the longest (each
# look waits twice as long as the one before, progress or not: closing late costs nothing).
LINGER_STEPS = (0.02, 0.5)


def _reading(watcher: Any, on: bool, callback: Callable[[], None], want: bool) -> bool:
    """A read watcher started or stopped as wanted; whether it now runs."""
    if want != on:
        if want:
            watcher.start(callback)
        else:
            watcher.stop()
    return want


def _retransmitting(sock: socket.socket) -> bool:
    """Whether TCP is retransmitting to a peer that acknowledges nothing (TCP_INFO's
    tcpi_retransmits, Linux): a peer gone, as opposed to one that is merely slow."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except (OSError, AttributeError):  # a unix socket; no TCP_INFO here
        return False
    return len(info) > 2 and info[2] > 0


def _gone(sock: socket.socket) -> bool:
    """Whether the peer reset the connection: what it has not acknowledged, it never will."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
    except OSError:
        return True


def _unsent(sock: socket.socket) -> int:
    """Bytes the kernel still holds for the peer (SIOCOUTQ, Linux): a peer that leaves
    them there is held back by flow control, and would not see a Ping behind them."""
    if not hasattr(termios, "TIOCOUTQ"):
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    count: int = struct.unpack("i", raw)[0]
    return count


class Pump:
    """Moves one tunnel's bytes from the hub's callbacks until it is over, then calls
    `on_end(pump)` once and closes both sockets.  `counts` (a listener's and its
    forwarder's) see payload bytes as they move."""

    __slots__ = ("_counts", "_loop", "_on_end", "_plain", "_plain_buf", "_plain_eof",
                 "_plain_on", "_plain_r", "_plain_shut", "_plain_w", "_timer", "_ws", "_ws_buf",
                 "_ws_on", "_ws_r", "_ws_w", "exception", "on_closed", "tunnel")

    def __init__(self, plain: socket.socket, ws: socket.socket, tunnel: Tunnel,
                 on_end: Callable[[Pump], None], counts: tuple[Counters, Counters]) -> None:
        self.tunnel = tunnel
        self.exception: BaseException | None = None  # a bug that ended the tunnel
        self._plain = plain  # non-blocking sockets of the standard library's kind
        self._ws = ws
        self._on_end: Callable[[Pump], None] | None = on_end
        # Called once both sockets are closed, which may come after on_end (see _linger).
        self.on_closed: Callable[[], None] | None = None
        self._counts = counts
        self._loop: Any = None
        self._plain_r: Any = None
        self._ws_r: Any = None
        self._plain_w: Any = None  # write watchers exist only while a send waits
        self._ws_w: Any = None
        self._timer: Any = None
        self._plain_on = self._ws_on = False  # whether each read watcher runs
        self._plain_shut = False
        self._plain_eof = False  # the local side has sent its last byte
        # A read buffer whose bytes a queue still holds (to_ws, to_plain), until it empties.
        self._plain_buf: bytearray | None = None
        self._ws_buf: bytearray | None = None

    def start(self, trailing: bytes = b"") -> None:
        """Begin, in the hub's thread; `trailing` holds frames read with the upgrade."""
        self._loop = loop = gevent.get_hub().loop
        self._plain_r = loop.io(self._plain.fileno(), READ)
        self._ws_r = loop.io(self._ws.fileno(), READ)
        deadline = self.tunnel.timer(_monotonic(), held=False)
        if deadline is not None:
            self._timer = loop.timer(deadline - _monotonic())
            self._timer.start(self._timer_fired)
        if trailing:
            self._guarded(lambda: self._count_down(self.tunnel.ws_data(trailing, _monotonic())))
        else:
            self._after()

    def sockets(self) -> list[socket.socket]:
        """The two sockets it drives (for a forked child to let go of)."""
        return [self._plain, self._ws]

    def abort(self, reason: str) -> None:
        """End the tunnel now, from the hub's thread (the forwarder closes); one that ended
        and waits for its local side's acknowledgements closes now."""
        if self._on_end is not None:
            self.tunnel.abort(reason)
            self._finish()
        elif self._timer is not None:  # lingering
            self._drop_timer()
            self._close_plain()

    # Callbacks, in the hub ----------------------------------------------------

    def _plain_readable(self) -> None:
        self._read(plain=True)

    def _ws_readable(self) -> None:
        self._read(plain=False)

    def _read(self, *, plain: bool) -> None:
        """One read into a pooled buffer, from plain or the WebSocket, fed to the tunnel.
        The buffer stays out of the pool while the queue it fed may still point into it."""
        buf = take_buffer()
        try:
            if plain:
                self._take_plain(buf)
            else:
                self._take_ws(buf)
        except BlockingIOError:
            give_buffer(buf)
            return
        except OSError as exc:  # ssl.SSLError included
            if plain:
                self._plain_failed(exc)
            else:
                self._ws_failed(exc)
        except Exception as exc:  # a bug: end this tunnel, not the hub
            self._crash(exc)
            give_buffer(buf)
            return
        self._after()
        tunnel = self.tunnel
        if (tunnel.to_ws if plain else tunnel.to_plain) and self._on_end is not None:
            if plain:  # back to the pool once that queue is sent
                self._plain_buf = buf
            else:
                self._ws_buf = buf
        else:
            give_buffer(buf)

    def _take_plain(self, buf: bytearray) -> None:
        """Read what the local side has into `buf`, and give it to the tunnel."""
        count = self._plain.recv_into(buf, CHUNK)
        if count:
            self.tunnel.plain_data(memoryview(buf)[:count])
            mine, everyone = self._counts
            mine.up += count
            everyone.up += count
        else:
            self._plain_eof = True
            self.tunnel.plain_eof()

    def _plain_failed(self, exc: OSError) -> None:
        self.tunnel.error(f"local side: {describe(exc)}")

    def _ws_failed(self, exc: OSError) -> None:
        self.tunnel.ws_lost(f"WebSocket: {describe(exc)}")

    def _take_ws(self, buf: bytearray) -> None:
        """Read what the WebSocket has into `buf`, and give it to the tunnel."""
        count = self._ws.recv_into(buf, CHUNK)
        if count:
            self._count_down(self.tunnel.ws_data(memoryview(buf)[:count], _monotonic()))
        else:
            self.tunnel.ws_lost("WebSocket lost without a Close frame")

    def _count_down(self, count: int) -> None:
        """Payload from the daemon for plain: counted as it is queued, so that a client who
        has read it never sees stats without it."""
        mine, everyone = self._counts
        mine.down += count
        everyone.down += count

    def _plain_writable(self) -> None:
        self._plain_w.close()
        self._plain_w = None
        self._guarded(self._flush_plain)

    def _ws_writable(self) -> None:
        self._ws_w.close()
        self._ws_w = None
        self._guarded(self._flush_ws)

    def _timer_fired(self) -> None:
        self._drop_timer()
        tunnel = self.tunnel
        try:
            backlog = self._ws_backlog()
            acking = not _retransmitting(self._ws)
            held = acking and bool(tunnel.to_plain or tunnel.to_ws or backlog
                                   or _unsent(self._ws))
            deadline = tunnel.timer(_monotonic(), held=held, acking=acking, backlog=backlog)
            if deadline is not None:
                self._timer = self._loop.timer(max(deadline - _monotonic(), 0.0))
                self._timer.start(self._timer_fired)
        except Exception as exc:
            self._crash(exc)
            return
        self._after()

    def _drop_timer(self) -> None:
        """Close the one timer (it fired, or is not wanted any more)."""
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:
            self._crash(exc)
            return
        self._after()

    # After every event ------------------------------------------------------------

    def _after(self) -> None:
        """Write what the tunnel queued, then set the watchers to what it wants now."""
        tunnel = self.tunnel
        try:
            if tunnel.to_ws and self._ws_w is None:
                self._flush_ws()
            if tunnel.to_plain and self._plain_w is None:
                self._flush_plain()
            if (self._plain_on and self._ws_on and tunnel.reading_plain and not (
                    tunnel.to_ws or tunnel.to_plain or tunnel.outcome or tunnel.shut_plain)):
                return  # the usual state, both sides read and nothing waits: no change
            self._settle()
        except Exception as exc:  # a bug: end this tunnel, not the hub
            self._crash(exc)

    def _settle(self) -> None:
        """The rest of `_after`: half-close, the end, and which sides to read."""
        tunnel = self.tunnel
        if tunnel.shut_plain and not (tunnel.to_plain or tunnel.outcome or self._plain_shut):
            self._plain_shut = True
            try:
                self._plain.shutdown(socket.SHUT_WR)
            except OSError as exc:
                self._plain_failed(exc)
        if tunnel.outcome or (tunnel.finished and self._ws_w is None):
            self._finish()
            return
        self._plain_on = _reading(self._plain_r, self._plain_on, self._plain_readable,
                                  tunnel.reading_plain and not tunnel.to_ws and self._ws_w is None)
        self._ws_on = _reading(self._ws_r, self._ws_on, self._ws_readable, tunnel.reading_ws)

    # Writing ----------------------------------------------------------------------

    def _flush_plain(self) -> None:
        out = self.tunnel.to_plain
        try:
            send_queue(self._plain, out)
        except OSError as exc:
            self._plain_failed(exc)
            return
        if out:
            self._plain_w = self._wait_writable(self._plain, self._plain_writable)
        elif self._ws_buf is not None:
            give_buffer(self._ws_buf)
            self._ws_buf = None

    def _flush_ws(self) -> None:
        tunnel = self.tunnel
        try:
            send_queue(self._ws, tunnel.to_ws)
        except OSError as exc:
            self._ws_failed(exc)
            return
        if tunnel.to_ws:
            self._ws_w = self._wait_writable(self._ws, self._ws_writable)
        else:
            self._ws_sent()

    def _ws_sent(self) -> None:
        """All that was queued for the WebSocket is out: plain's read buffer is free."""
        if self._plain_buf is not None:
            give_buffer(self._plain_buf)
            self._plain_buf = None

    def _wait_writable(self, sock: socket.socket, callback: Callable[[], None]) -> Any:
        watcher = self._loop.io(sock.fileno(), WRITE)
        watcher.start(callback)
        return watcher

    def _ws_backlog(self) -> bool:
        """Bytes for the WebSocket held below the Tunnel's queue (TLS records)."""
        return False

    # The end ------------------------------------------------------------------------

    def _crash(self, exc: Exception) -> None:
        self.exception = exc
        self.tunnel.error(f"internal error: {exc!r}", "internal")
        self._finish()

    def _finish(self) -> None:
        """Close everything once: last words best effort, plain reset unless the tunnel
        finished (a close or a drain's deadline cuts too, though it is not a failure)."""
        on_end, self._on_end = self._on_end, None
        if on_end is None:
            return
        for watcher in (self._plain_r, self._ws_r, self._plain_w, self._ws_w, self._timer):
            if watcher is not None:
                watcher.close()  # before the descriptors close and their numbers are reused
        self._plain_r = self._ws_r = self._plain_w = self._ws_w = self._timer = None
        tunnel = self.tunnel
        cut = bool(tunnel.outcome)
        if cut:  # failed or aborted: what can go out at once, goes
            with contextlib.suppress(OSError):
                if tunnel.to_plain:
                    self._plain.sendmsg(tunnel.to_plain[:IOV_MAX])
                self._last_words()
            tunnel.to_plain.clear()
            tunnel.to_ws.clear()
        else:
            tunnel.outcome = "closed"
            self._last_words()
        try:  # before the sockets close: whoever sees the end then sees it counted
            on_end(self)
        except Exception as exc:  # the hub would print it and go on; keep it for the log
            self.exception = self.exception or exc
        if cut:  # failed, or ended from outside before both sides finished: not an EOF
            with contextlib.suppress(OSError):
                self._plain.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self._ws.close()
        for buf in (self._plain_buf, self._ws_buf):
            if buf is not None:
                give_buffer(buf)
        self._plain_buf = self._ws_buf = None
        if cut or self._plain_eof or self._plain.family == socket.AF_UNIX:
            self._close_plain()
        else:
            self._linger(-1, 0.0, LINGER_STEPS[0])

    def _linger(self, left: int, since: float, step: float) -> None:
        """A clean end while the local side still sends (the daemon closed first): close
        plain once it has acknowledged every byte sent to it (our FIN may wait for a delayed
        ACK: it carries no data).  Closed with unread bytes, a TCP socket is reset at once
        and what its kernel had not sent yet is dropped, the end of a reply included; so the
        reset (its upload was cut) comes after the whole reply.  A side gone meanwhile, or
        one that acknowledges nothing for LINGER_STALL seconds, is closed then.  A unix
        socket's peer already holds what was sent: it closes at once."""
        self._drop_timer()
        now, unsent = _monotonic(), _unsent(self._plain)
        if unsent != left:  # progress; the looks go on backing off (closing late is free)
            since = now
        if unsent <= self._plain_shut or now - since >= LINGER_STALL or _gone(self._plain):
            self._close_plain()
            return
        self._timer = self._loop.timer(step)
        self._timer.start(self._linger, unsent, since, min(step * 2, LINGER_STEPS[1]))

    def _close_plain(self) -> None:
        """The last step: plain closed, and whoever keeps the tunnel told so."""
        self._plain.close()
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed()

    def _last_words(self) -> None:
        """Best effort before the WebSocket closes: what is queued for it."""
        with contextlib.suppress(OSError):
            if self.tunnel.to_ws:
                self._ws.sendmsg(self.tunnel.to_ws[:IOV_MAX])
