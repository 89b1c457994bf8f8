"""The event-driven driver of one tunnel: the hub's watchers feed its Tunnel, and
what the Tunnel queues is written without ever blocking.

No greenlet waits here: a socket is read only when the kernel says it is
readable (so no recv ends in EAGAIN), in a callback the hub calls without a
switch.  A send that does not take everything leaves the rest queued and
waits for a write watcher; meanwhile the side that feeds that queue is not
read (the Tunnel's flow control).  An idle tunnel is two read watchers and
its state.  The rules themselves live in `tunnel.py`; this module only moves
bytes and watchers.

`TLSPump` is the same driver with the WebSocket side in TLS through
`ssl.MemoryBIO`: what the kernel has is decrypted in as many records as it
holds, and queued frames are encrypted in one go.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from typing import Any, Callable, cast

import gevent

from .frames import Buffer
from .tls import TLSChannel
from .tunnel import Tunnel, consume

CHUNK = 256 * 1024  # bytes per read
# Reads go into buffers that are used again, not into a new bytes object each: the
# allocator maps a fresh 256 KiB object and unmaps it once it is shrunk to what came,
# three system calls per read.  TLS may decrypt a little more than a read's CHUNK.
BUFFER = CHUNK + 32 * 1024
_free: list[bytearray] = []  # list.pop and list.append are atomic: hub threads may share it
_FREE_MAX = 16
IOV_MAX = 1024  # Linux refuses a sendmsg with more buffers (EMSGSIZE)
SMALL = 2048  # payloads joined to their header for one send rather than a vectored one
_READ, _WRITE = 1, 2
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_monotonic = time.monotonic


class Pump:
    """Moves one tunnel's bytes from the hub's callbacks until it is over, then closes
    both sockets and calls `on_end(pump)` once."""

    __slots__ = ("_loop", "_on_end", "_plain", "_plain_buf", "_plain_on", "_plain_r",
                 "_plain_shut", "_plain_w", "_timer", "_ws", "_ws_buf", "_ws_on", "_ws_r",
                 "_ws_w", "exception", "tunnel")

    def __init__(self, plain: socket.socket, ws: socket.socket, tunnel: Tunnel,
                 on_end: Callable[[Pump], None]) -> None:
        self.tunnel = tunnel
        self.exception: BaseException | None = None  # a bug that ended the tunnel
        self._plain = plain  # non-blocking sockets of the standard library's kind
        self._ws = ws
        self._on_end: Callable[[Pump], None] | None = on_end
        self._loop: Any = None
        self._plain_r: Any = None
        self._ws_r: Any = None
        self._plain_w: Any = None  # write watchers exist only while a send waits
        self._ws_w: Any = None
        self._timer: Any = None
        self._plain_on = self._ws_on = False  # whether each read watcher runs
        self._plain_shut = False
        # A read buffer whose bytes a queue still holds (to_ws, to_plain), until it empties.
        self._plain_buf: bytearray | None = None
        self._ws_buf: bytearray | None = None

    def start(self, trailing: bytes = b"") -> None:
        """Begin, in the hub's thread; `trailing` holds frames read with the upgrade."""
        self._loop = loop = gevent.get_hub().loop
        self._plain_r = loop.io(self._plain.fileno(), _READ)
        self._ws_r = loop.io(self._ws.fileno(), _READ)
        delay = self.tunnel.timer(_monotonic(), held=False)
        if delay is not None:
            self._timer = loop.timer(delay - _monotonic())
            self._timer.start(self._timer_fired)
        if trailing:
            self.tunnel.ws_data(trailing, _monotonic())
        self._after()

    def sockets(self) -> list[socket.socket]:
        """The two sockets it drives (for a forked child to let go of)."""
        return [self._plain, self._ws]

    def abort(self, reason: str) -> None:
        """End the tunnel now, from the hub's thread (the forwarder closes)."""
        if self._on_end is not None:
            self.tunnel.abort(reason)
            self._finish()

    # Callbacks, in the hub ----------------------------------------------------

    def _plain_readable(self) -> None:
        tunnel = self.tunnel
        buf = _take()
        try:
            count = self._plain.recv_into(buf, CHUNK)
            if count:
                tunnel.plain_data(memoryview(buf)[:count])
            else:
                tunnel.plain_eof()
        except BlockingIOError:
            _give(buf)
            return
        except OSError as exc:
            tunnel.error(f"local side: {_describe(exc)}")
        except Exception as exc:  # a bug: end this tunnel, not the hub
            self._crash(exc)
            _give(buf)
            return
        self._after()
        if tunnel.to_ws and self._on_end is not None:
            self._plain_buf = buf  # back to the pool once to_ws is sent
        else:
            _give(buf)

    def _ws_readable(self) -> None:
        tunnel = self.tunnel
        buf = _take()
        try:
            count = self._ws.recv_into(buf, CHUNK)
            if count:
                tunnel.ws_data(memoryview(buf)[:count], _monotonic())
            else:
                tunnel.ws_lost("WebSocket lost without a Close frame")
        except BlockingIOError:
            _give(buf)
            return
        except OSError as exc:
            tunnel.ws_lost(f"WebSocket: {_describe(exc)}")
        except Exception as exc:
            self._crash(exc)
            _give(buf)
            return
        self._after()
        if tunnel.to_plain and self._on_end is not None:
            self._ws_buf = buf  # back to the pool once to_plain is sent
        else:
            _give(buf)

    def _plain_writable(self) -> None:
        self._plain_w.close()
        self._plain_w = None
        self._guarded(self._flush_plain)

    def _ws_writable(self) -> None:
        self._ws_w.close()
        self._ws_w = None
        self._guarded(self._flush_ws)

    def _timer_fired(self) -> None:
        self._timer.close()
        self._timer = None
        tunnel = self.tunnel
        try:
            held = bool(tunnel.to_plain or tunnel.to_ws or self._ws_backlog())
            deadline = tunnel.timer(_monotonic(), held=held)
            if deadline is not None:
                self._timer = self._loop.timer(max(deadline - _monotonic(), 0.0))
                self._timer.start(self._timer_fired)
        except Exception as exc:
            self._crash(exc)
            return
        self._after()

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except Exception as exc:
            self._crash(exc)
            return
        self._after()

    # After every event --------------------------------------------------------

    def _after(self) -> None:
        """Write what the tunnel queued, then set the watchers to what it wants now."""
        tunnel = self.tunnel
        if tunnel.to_ws and self._ws_w is None:
            self._flush_ws()
        if tunnel.to_plain and self._plain_w is None:
            self._flush_plain()
        if (self._plain_on and self._ws_on and tunnel.reading_plain
                and not (tunnel.to_ws or tunnel.to_plain or tunnel.outcome or tunnel.shut_plain)):
            return  # the usual state, both sides read and nothing waits: no change
        self._settle()

    def _settle(self) -> None:
        """The rest of `_after`: half-close, the end, and which sides to read."""
        tunnel = self.tunnel
        if tunnel.shut_plain and not (tunnel.to_plain or tunnel.outcome or self._plain_shut):
            self._plain_shut = True
            try:
                self._plain.shutdown(socket.SHUT_WR)
            except OSError as exc:
                tunnel.error(f"local side: {_describe(exc)}")
        if tunnel.outcome or (tunnel.finished and self._ws_w is None):
            self._finish()
            return
        want = tunnel.reading_plain and not tunnel.to_ws and self._ws_w is None
        if want != self._plain_on:
            self._plain_on = want
            if want:
                self._plain_r.start(self._plain_readable)
            else:
                self._plain_r.stop()
        want = tunnel.reading_ws
        if want != self._ws_on:
            self._ws_on = want
            if want:
                self._ws_r.start(self._ws_readable)
            else:
                self._ws_r.stop()

    # Writing ----------------------------------------------------------------------

    def _flush_plain(self) -> None:
        out = self.tunnel.to_plain
        try:
            count = _send(self._plain, out)
        except OSError as exc:
            self.tunnel.error(f"local side: {_describe(exc)}")
            return
        if count < 0:
            if self._ws_buf is not None:
                _give(self._ws_buf)
                self._ws_buf = None
        else:
            consume(out, count)
            self._plain_w = self._wait_writable(self._plain, self._plain_writable)

    def _flush_ws(self) -> None:
        tunnel = self.tunnel
        try:
            count = _send(self._ws, tunnel.to_ws)
        except OSError as exc:
            tunnel.ws_lost(f"WebSocket: {_describe(exc)}")
            return
        if count < 0:
            tunnel.ws_skip = 0
            self._ws_sent()
        else:
            tunnel.sent_to_ws(count)
            self._ws_w = self._wait_writable(self._ws, self._ws_writable)

    def _ws_sent(self) -> None:
        """All that was queued for the WebSocket is out: plain's read buffer is free."""
        if self._plain_buf is not None:
            _give(self._plain_buf)
            self._plain_buf = None

    def _wait_writable(self, sock: socket.socket, callback: Callable[[], None]) -> Any:
        watcher = self._loop.io(sock.fileno(), _WRITE)
        watcher.start(callback)
        return watcher

    def _ws_backlog(self) -> bool:
        """Bytes for the WebSocket held below the Tunnel's queue (TLS records)."""
        return False

    # The end ------------------------------------------------------------------------

    def _crash(self, exc: Exception) -> None:
        self.exception = exc
        self.tunnel.error(f"internal error: {exc!r}")
        self._finish()

    def _finish(self) -> None:
        """Close everything once: last words best effort, plain reset if the tunnel was cut."""
        on_end, self._on_end = self._on_end, None
        if on_end is None:
            return
        for watcher in (self._plain_r, self._ws_r, self._plain_w, self._ws_w, self._timer):
            if watcher is not None:
                watcher.close()  # before the descriptors close and their numbers are reused
        self._plain_r = self._ws_r = self._plain_w = self._ws_w = self._timer = None
        tunnel = self.tunnel
        if tunnel.outcome:  # cut or aborted: what can go out at once, goes
            with contextlib.suppress(OSError):
                if tunnel.to_plain:
                    self._plain.sendmsg(tunnel.to_plain[:IOV_MAX])
                self._last_words()
            tunnel.to_plain.clear()
            tunnel.to_ws.clear()
        else:
            tunnel.outcome = "closed"
            self._last_words()
        if tunnel.failed:
            with contextlib.suppress(OSError):
                self._plain.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self._plain.close()
        self._ws.close()
        for buf in (self._plain_buf, self._ws_buf):
            if buf is not None:
                _give(buf)
        self._plain_buf = self._ws_buf = None
        try:
            on_end(self)
        except Exception as exc:  # the hub would print it and go on; keep it for the log
            self.exception = self.exception or exc

    def _last_words(self) -> None:
        """Best effort before the WebSocket closes: what is queued for it."""
        with contextlib.suppress(OSError):
            if self.tunnel.to_ws:
                self._ws.sendmsg(self.tunnel.to_ws[:IOV_MAX])


def _send(sock: socket.socket, out: list[Buffer]) -> int:
    """Write from `out` without blocking: -1 once all of it went (`out` emptied), else how
    many bytes off its front did, for the caller's bookkeeping.  Raises OSError."""
    try:
        while len(out) > IOV_MAX:
            batch = out[:IOV_MAX]  # an even count: frame pairs stay whole
            count = sock.sendmsg(batch)
            if count < sum(map(len, batch)):
                return count
            del out[:IOV_MAX]
        if len(out) == 1:  # a plain send is cheaper than a vectored one
            count, total = sock.send(out[0]), len(out[0])
        elif len(out) == 2 and len(out[1]) <= SMALL:  # one small frame: joined, and sent so
            joined = b"".join(out)
            count, total = sock.send(joined), len(joined)
        else:
            count, total = sock.sendmsg(out), sum(map(len, out))
    except BlockingIOError:
        return 0
    if count == total:
        out.clear()
        return -1
    return count


def _take() -> bytearray:
    try:
        return _free.pop()
    except IndexError:
        return bytearray(BUFFER)


def _give(buf: bytearray) -> None:
    if len(_free) < _FREE_MAX:
        _free.append(buf)


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


class TLSPump(Pump):
    """A Pump whose WebSocket runs in TLS over `ssl.MemoryBIO`s, as `dial` set it up."""

    __slots__ = ("_cipher", "_incoming", "_outgoing", "_tls")

    def __init__(self, plain: socket.socket, ws: socket.socket, tunnel: Tunnel,
                 on_end: Callable[[Pump], None], tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        super().__init__(plain, ws, tunnel, on_end)
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        self._cipher: Buffer = b""  # encrypted bytes the socket has not taken yet

    def start(self, trailing: bytes = b"") -> None:
        super().start(trailing)
        if self._on_end is not None and self._incoming.pending:  # records read with the 101
            self._ws_readable(read_socket=False)

    def _ws_readable(self, read_socket: bool = True) -> None:
        tunnel = self.tunnel
        buf = _take()
        try:
            if read_socket:
                count = self._ws.recv_into(buf, CHUNK)
                if not count:
                    tunnel.ws_lost("WebSocket lost without a Close frame",
                                   backlog=bool(self._cipher))
                    _give(buf)
                    self._after()
                    return
                self._incoming.write(memoryview(buf)[:count])
            count, ended = self._decrypt(buf)
            if count:
                tunnel.ws_data(memoryview(buf)[:count], _monotonic())
            if ended:  # close_notify: the TLS stream's end
                tunnel.ws_lost("WebSocket lost without a Close frame",
                               backlog=bool(self._cipher))
            if self._outgoing.pending:  # TLS may answer while reading (a key update)
                self._cipher = bytes(self._cipher) + self._outgoing.read()
        except BlockingIOError:
            _give(buf)
            return
        except OSError as exc:  # ssl.SSLError included
            tunnel.ws_lost(f"WebSocket: {_describe(exc)}")
        except Exception as exc:
            self._crash(exc)
            _give(buf)
            return
        self._after()
        if tunnel.to_plain and self._on_end is not None:
            self._ws_buf = buf
        else:
            _give(buf)

    def _decrypt(self, buf: bytearray) -> tuple[int, bool]:
        """Every whole record the BIO holds, into `buf`: how many bytes that made, and
        whether the stream ended.  All of them, always: no socket event would come for
        records left behind."""
        view = memoryview(buf)
        count = 0
        while count < BUFFER:  # never reached: one read's records and a part are smaller
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                got = cast(int, self._tls.read(BUFFER - count, view[count:]))
            except ssl.SSLWantReadError:
                return count, False
            if not got:
                return count, True
            count += got
        return count, False

    def _flush_ws(self) -> None:
        tunnel = self.tunnel
        if not self._cipher and tunnel.to_ws:
            self._encrypt(tunnel.to_ws)
            tunnel.to_ws.clear()
            tunnel.ws_skip = 0
        try:
            sent = self._ws.send(self._cipher)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            tunnel.ws_lost(f"WebSocket: {_describe(exc)}")
            return
        self._cipher = memoryview(self._cipher)[sent:] if sent < len(self._cipher) else b""
        if self._cipher or tunnel.to_ws:
            self._ws_w = self._wait_writable(self._ws, self._ws_writable)
        else:
            self._ws_sent()

    def _encrypt(self, buffers: list[Buffer]) -> None:
        """Whole frames into TLS records: small ones joined, so one record holds many."""
        if sum(map(len, buffers)) <= 16384:
            self._tls.write(b"".join(buffers))
        else:
            for buf in buffers:
                if buf:
                    self._tls.write(buf)
        self._cipher = self._outgoing.read()

    def _ws_backlog(self) -> bool:
        return bool(self._cipher)

    def _last_words(self) -> None:
        with contextlib.suppress(OSError):
            if self.tunnel.to_ws:
                self._encrypt_more(self.tunnel.to_ws)
            if not self.tunnel.failed:
                with contextlib.suppress(ssl.SSLError):
                    self._tls.unwrap()  # close_notify, for proxies that log its absence
                self._cipher = bytes(self._cipher) + self._outgoing.read()
            self._ws.send(self._cipher)

    def _encrypt_more(self, buffers: list[Buffer]) -> None:
        pending = bytes(self._cipher)
        self._encrypt(buffers)
        self._cipher = pending + bytes(self._cipher)


def open_pump(plain: Any, stream: Any, tunnel: Tunnel, on_end: Callable[[Pump], None]) -> Pump:
    """The pump for a plain socket and the stream the upgrade ran over (a socket, or a
    `tls.TLSChannel`), both of gevent's kind: it drives their standard sockets beneath
    (gevent keeps them non-blocking), and gevent's wrappers, with their idle watchers,
    can go."""
    if isinstance(stream, TLSChannel):
        return TLSPump(_raw(plain), _raw(stream.sock), tunnel, on_end, stream.tls,
                       stream.incoming, stream.outgoing)
    return Pump(_raw(plain), _raw(stream), tunnel, on_end)


def _raw(sock: Any) -> socket.socket:
    raw: socket.socket = getattr(sock, "_sock", sock)  # gevent's socket wraps it as `_sock`
    return raw
