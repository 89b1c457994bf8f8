"""Load: many connections, one thread (tests/test_load.py).

`LoadLoop` and `Stream`: thousands of client and guest connections driven by one
thread with a selector, each sending known bytes and hashing what it reads;
`Rotations`, the payloads.
"""

from __future__ import annotations

import errno
import hashlib
import os
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from typing import Callable, Union

LOAD_CHUNK = 256 * 1024
Buffer = Union[bytes, bytearray, memoryview]


class Stream:
    """One end of a load connection, driven by a `LoadLoop` without ever blocking.

    It sends `outgoing` (buffers sent in turn; None until `send_later` says what),
    then shuts its side for writing, and reads until EOF, hashing everything
    after its first `prefix` bytes (kept in `head`: a guest learns from them
    which client it serves); `on_head` and `on_read` are told when the head is
    complete and after each read.  `hold` keeps it from sending until the loop's
    `release()`; `repeat` sends `outgoing` over and over until the loop's
    `stop()`.  It ends at EOF once its sending is done, or at the first
    socket error (`error`); `ended` is then the time.monotonic() of that.
    """

    def __init__(
        self,
        sock: socket.socket,
        outgoing: Sequence[Buffer] | None = None,
        *,
        prefix: int = 0,
        on_head: Callable[[Stream, bytes], None] | None = None,
        on_read: Callable[[Stream], None] | None = None,
        hold: bool = False,
        repeat: bool = False,
        connecting: bool = False,
    ) -> None:
        self.sock = sock
        self.outgoing: list[memoryview] | None = None
        self.prefix, self.on_head, self.on_read = prefix, on_head, on_read
        self.head = bytearray()
        self.hold, self.repeat, self.connecting = hold, repeat, connecting
        self.sent = self.received = 0
        self.digest = hashlib.sha256()  # of what was read after the prefix
        self.eof = self.shut = False
        self.error: str | None = None
        self.ended: float | None = None
        self._part = self._offset = 0
        if outgoing is not None:
            self.send_later(outgoing)

    def send_later(self, outgoing: Sequence[Buffer]) -> None:
        self.outgoing = [memoryview(b).cast("B") for b in outgoing]

    @property
    def outcome(self) -> str:
        """"EOF", "reset", "broken pipe" (a send after the peer closed), another
        socket error's text, or "open"."""
        return self.error or ("EOF" if self.eof else "open")

    @property
    def wants_write(self) -> bool:
        return self.connecting or (not self.hold and not self.shut and self.outgoing is not None)

    def on_writable(self, stopping: bool) -> None:
        if self.connecting:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.fail(OSError(code, os.strerror(code)))
            self.connecting = False
            return
        assert self.outgoing is not None
        while self._part < len(self.outgoing) and not len(self.outgoing[self._part]):
            self._part += 1
        if self._part < len(self.outgoing):
            part = self.outgoing[self._part]
            try:
                n = self.sock.send(part[self._offset : self._offset + LOAD_CHUNK])
            except BlockingIOError:
                return
            except OSError as exc:
                self.fail(exc)
                return
            self.sent += n
            self._offset += n
            if self._offset < len(part):
                return
            self._part, self._offset = self._part + 1, 0
            if self._part < len(self.outgoing):
                return
        if self.repeat and not stopping and self.outgoing:
            self._part = 0
            return
        self.shut = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.fail(exc)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(LOAD_CHUNK)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(exc)
            return
        if not data:
            self.eof = True
            return
        if len(self.head) < self.prefix:
            take = self.prefix - len(self.head)
            self.head += data[:take]
            data = data[take:]
            if len(self.head) == self.prefix and self.on_head is not None:
                self.on_head(self, bytes(self.head))
        self.digest.update(data)
        self.received += len(data)
        if self.on_read is not None:
            self.on_read(self)

    def fail(self, exc: OSError) -> None:
        if self.error is None:
            self.error = ("reset" if isinstance(exc, ConnectionResetError)
                          else "broken pipe" if isinstance(exc, BrokenPipeError)
                          else exc.strerror or type(exc).__name__)

    @property
    def done(self) -> bool:
        return self.error is not None or (self.eof and (self.shut or self.outgoing is None))


Accept = Callable[[socket.socket], Stream]


class Rotations:
    """Distinct payloads of `size` bytes without holding them all: rotations of one
    random block, so that bytes crossed between two streams do not go unnoticed."""

    def __init__(self, size: int) -> None:
        block = os.urandom(size)
        self.size = size
        self._twice = memoryview(block + block)

    def __getitem__(self, i: int) -> memoryview:
        start = (i * 7919) % self.size
        return self._twice[start : start + self.size]

    def digest(self, i: int, length: int | None = None) -> str:
        """sha256 of payload i, or of its first `length` bytes."""
        return hashlib.sha256(self[i][:length]).hexdigest()


class LoadLoop:
    """Streams and listeners served by one selector, in whichever thread calls `run`.

    `release()` and `stop()` may be called from another thread: the loop looks
    at them within POLL seconds.
    """

    POLL = 0.05

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self._selector = selectors.DefaultSelector()
        self._listeners: list[socket.socket] = []
        self._open: set[Stream] = set()  # not ended yet
        self._watched: set[Stream] = set()  # registered with the selector
        self._changed = threading.Event()
        self._stopping = False

    def connect(self, address: tuple[str, int] | str, outgoing: Sequence[Buffer] | None,
                **options: object) -> Stream:
        """A client stream to `address`; the connect completes inside `run`."""
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS, errno.EAGAIN):
            sock.close()
            raise OSError(code, os.strerror(code))
        stream = Stream(sock, outgoing, connecting=True, **options)  # type: ignore[arg-type]
        self.add(stream)
        return stream

    def listen(self, sock: socket.socket, accept: Accept) -> None:
        """Accept on `sock` inside `run`; `accept` makes each connection's stream."""
        sock.setblocking(False)
        self._listeners.append(sock)
        self._selector.register(sock, selectors.EVENT_READ, accept)

    def add(self, stream: Stream) -> None:
        stream.sock.setblocking(False)
        self.streams.append(stream)
        self._open.add(stream)
        self._update(stream)

    def release(self) -> None:
        for stream in self.streams:
            stream.hold = False
        self._changed.set()

    def stop(self) -> None:
        """Repeating streams finish the buffer they are in, then shut for writing."""
        self._stopping = True
        self._changed.set()

    @property
    def open_streams(self) -> int:
        return len(self._open)

    def run(self, until: Callable[[], bool], timeout: float) -> bool:
        """Serve until `until()` holds (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                return False
            if self._changed.is_set():
                self._changed.clear()
                for stream in list(self._open):
                    self._update(stream)
            for key, events in self._selector.select(self.POLL):
                if isinstance(key.data, Stream):
                    self._serve(key.data, events)
                else:
                    self._accept(key.fileobj, key.data)  # type: ignore[arg-type]
        return True

    def _accept(self, listener: socket.socket, accept: Accept) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            self.add(accept(sock))

    def _serve(self, stream: Stream, events: int) -> None:
        if events & selectors.EVENT_READ and not stream.eof:
            stream.on_readable()
        if events & selectors.EVENT_WRITE and stream.error is None and stream.wants_write:
            stream.on_writable(self._stopping)
        self._update(stream)

    def _interest(self, stream: Stream) -> int:
        return (0 if stream.eof else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if stream.wants_write else 0)

    def _update(self, stream: Stream) -> None:
        if stream.done:
            self._end(stream)
            return
        interest = self._interest(stream)
        if interest and stream in self._watched:
            self._selector.modify(stream.sock, interest, stream)
        elif interest:
            self._selector.register(stream.sock, interest, stream)
            self._watched.add(stream)
        elif stream in self._watched:  # EOF read and sending held: wait for release()
            self._selector.unregister(stream.sock)
            self._watched.discard(stream)

    def _end(self, stream: Stream) -> None:
        if stream in self._watched:
            self._selector.unregister(stream.sock)
            self._watched.discard(stream)
        self._open.discard(stream)
        stream.ended = time.monotonic()
        stream.sock.close()

    def close(self) -> None:
        """Close every socket, the listeners' included."""
        for stream in self.streams:
            stream.sock.close()
        for sock in self._listeners:
            sock.close()
        self._selector.close()

    def __enter__(self) -> LoadLoop:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

