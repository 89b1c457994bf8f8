"""The load generator's many connections: one thread, one epoll (`benchmarks.eventloop`).

* `Load` with `KeepAlive` or `OneShot` clients, run by `drive`: small requests on
  keep-alive connections (pipelined or not), one connection per request, tunnel
  setup (`benchmarks.loadgen.run_load` picks). Each answer costs a poll, a
  recv_into a shared buffer and, while the load runs, the send of the next
  request: little enough that the forwarder, not this, sets the pace.
* `StreamLoop` and `Stream`: checked connections, each sending known bytes and
  hashing what it reads, with their guests in the same loop (benchmarks/soak.py,
  tests/test_load.py); `Rotations`, the bytes they send.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, Callable, Union

from benchmarks.children import BenchError
from benchmarks.eventloop import READ, WRITE, Loop, nonblocking_connect

Mark = Callable[[], Any]
RECV = 256 * 1024  # one read of a connection
SETTLE = 0.2  # after a setup run, before its last mark: the forwarder's tunnels wind down


class Load:
    """What the connections of one loop-driven workload share: where they go, what they
    send, and the counters."""

    def __init__(self, addr: tuple[str, int], hello: bytes, request: int, reply: int,
                 depth: int) -> None:
        self.loop = Loop()
        self.addr = addr
        self.hello = hello  # what a connection sends first
        self.reply = reply  # bytes of one answer
        self.batches = [b"x" * request * k for k in range(depth + 1)]  # k requests at once
        self.depth = depth
        self.buf = bytearray(RECV)
        self.done = 0  # answers received
        self.in_flight = 0  # requests sent and not answered yet
        self.opened = 0  # connections
        self.running = True  # False: no new request, no new connection
        self.limit = math.inf  # connections to open in all (OneShot)
        self.error = ""
        self.clients: set[Client] = set()

    def fail(self, what: str) -> None:
        if not self.error:
            self.error = what

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        self.loop.close()


class Client:
    """One non-blocking connection of a `Load`; a send the kernel cannot take at once
    waits for writability while replies go on being read."""

    __slots__ = ("got", "load", "out", "sock")

    def __init__(self, load: Load) -> None:
        self.load = load
        self.got = 0
        self.out = b""
        self.sock = nonblocking_connect(load.addr)
        load.clients.add(self)
        load.opened += 1
        load.loop.add(self.sock, WRITE, self.on_connected)

    def on_connected(self, _events: int) -> None:
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self.load.fail(f"connect: {os.strerror(code)}")
            self.close()
            return
        self.load.loop.switch(self.sock, READ, self.on_readable)
        self.start()

    def start(self) -> None:
        raise NotImplementedError

    def on_readable(self, events: int) -> None:
        raise NotImplementedError

    def send(self, data: bytes) -> None:
        if self.out:
            self.out += data
            return
        n = self._send_now(data)
        if 0 <= n < len(data):
            self.out = data[n:]
            self.load.loop.switch(self.sock, READ | WRITE, self.on_either)

    def on_either(self, events: int) -> None:
        if events & WRITE:
            n = self._send_now(self.out)
            if n < 0:
                return
            self.out = self.out[n:]
            if not self.out:
                self.load.loop.switch(self.sock, READ, self.on_readable)
        if events & ~WRITE:
            self.on_readable(events)

    def _send_now(self, data: bytes) -> int:
        """What the kernel takes of `data` at once; -1 after failing the load."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self.load.fail(f"send: {exc}")
            self.close()
            return -1

    def receive(self) -> int:
        """Bytes read (into the shared buffer), or 0 after failing the load."""
        try:
            n = self.sock.recv_into(self.load.buf)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self.load.fail(f"recv: {exc}")
            self.close()
            return 0
        if not n:
            self.load.fail("connection closed by the far end")
            self.close()
        return n

    def close(self) -> None:
        if self in self.load.clients:
            self.load.clients.discard(self)
            self.load.loop.remove(self.sock)
            self.sock.close()


class KeepAlive(Client):
    """A connection that keeps `depth` requests in flight until the load stops."""

    __slots__ = ()

    def start(self) -> None:
        load = self.load
        load.in_flight += load.depth
        self.send(load.hello + load.batches[load.depth])

    def on_readable(self, _events: int) -> None:
        n = self.receive()
        if not n:
            return
        load = self.load
        done, self.got = divmod(self.got + n, load.reply)
        if done:
            load.done += done
            if load.running:
                self.send(load.batches[done])
            else:
                load.in_flight -= done


class OneShot(Client):
    """Connect, send the hello (the request), read one answer, close, open the next."""

    __slots__ = ()

    def start(self) -> None:
        self.load.in_flight += 1
        self.send(self.load.hello)

    def on_readable(self, _events: int) -> None:
        n = self.receive()
        if not n:
            return
        self.got += n
        load = self.load
        if self.got >= load.reply:
            self.close()
            load.done += 1
            load.in_flight -= 1
            if load.running and load.opened < load.limit:
                OneShot(load)


def _phase(load: Load, until: Callable[[], bool], seconds: float, stall: float) -> None:
    """Run the loop until `until()`; fail on an error, or after `stall` seconds in which
    not one answer came (`seconds` bounds the phase in all)."""
    end = time.monotonic() + seconds
    while True:
        before = load.done
        try:
            finished = load.loop.run(lambda: bool(load.error) or until(),
                                     min(stall, max(end - time.monotonic(), 0.0)))
        except OSError as exc:  # a connect refused at once, out of ports or descriptors
            raise BenchError(f"{type(exc).__name__}: {exc}") from exc
        if load.error:
            raise BenchError(load.error)
        if finished:
            return
        if time.monotonic() >= end:
            raise BenchError(f"still not done after {seconds:g} s ({load.done} answers)")
        if load.done == before:
            raise BenchError(f"no answer in {stall:g} s ({load.done} answers so far,"
                             f" {load.in_flight} waiting)")


def drive(load: Load, connections: int, client: type[Client], mark: Mark, *, warmup: float,
          seconds: float, count: float, timeout: float, settle: float = SETTLE
          ) -> dict[str, Any]:
    """Open `connections` clients and warm up; then measure for `seconds` or until `count`
    answers came, whichever is first; then stop and wait for what is in flight.

    Without a warm-up, the window opens before the first connect and, once `count`
    answers came, closes after the tunnels have had time to wind down: that is what a
    setup rate costs.
    """
    clock = time.monotonic
    first = connections if math.isinf(load.limit) else min(connections, int(load.limit))
    try:
        if warmup <= 0:
            marks = [mark()]
        done0, start, cpu0 = load.done, time.perf_counter(), time.thread_time()
        for _ in range(first):
            try:
                client(load)
            except OSError as exc:
                raise BenchError(f"{type(exc).__name__}: {exc}") from exc
        if warmup > 0:
            warm_end = clock() + warmup
            _phase(load, lambda: clock() >= warm_end, warmup + timeout, timeout)
            marks = [mark()]
            done0, start, cpu0 = load.done, time.perf_counter(), time.thread_time()
        end, target = clock() + seconds, done0 + count
        _phase(load, lambda: clock() >= end or load.done >= target, seconds + timeout, timeout)
        done, elapsed = load.done - done0, time.perf_counter() - start
        loadgen_cpu = time.thread_time() - cpu0
        if warmup > 0:
            marks.append(mark())
        load.running = False
        _phase(load, lambda: load.in_flight <= 0, timeout, timeout)
        if warmup <= 0:
            time.sleep(settle)
            marks.append(mark())
    finally:
        load.close()
    return {"count": done, "seconds": elapsed, "loadgen_cpu": loadgen_cpu, "marks": marks}


# Checked streams (benchmarks/soak.py, tests/test_load.py) ----------------------------------------

Buffer = Union[bytes, bytearray, memoryview]


class Stream:
    """One end of a checked connection, client or guest, driven by a `StreamLoop`.

    It sends `outgoing` (buffers in turn; None until `send_later` says what), then
    shuts its side for writing, and reads until EOF, hashing everything after its
    first `prefix` bytes (kept in `head`: a guest learns from them which client it
    serves); `on_head` and `on_read` are told when the head is complete and after
    each read. `hold` keeps it from sending (a callback may clear it, or the loop's
    `release()`); `repeat` sends `outgoing` over and over until the loop's `stop()`;
    `shut_after_eof` waits for the peer's EOF before shutting (a guest behind a
    WebSocket, which cannot carry a half-close while the client still sends).
    It ends at EOF once its sending is done, or at the first socket error (`error`);
    `ended` is then the time.monotonic() of that.
    """

    def __init__(self, sock: socket.socket, outgoing: Sequence[Buffer] | None = None, *,
                 prefix: int = 0, on_head: Callable[[Stream, bytes], None] | None = None,
                 on_read: Callable[[Stream], None] | None = None, hold: bool = False,
                 repeat: bool = False, connecting: bool = False,
                 shut_after_eof: bool = False) -> None:
        self.sock = sock
        self.outgoing: list[memoryview] | None = None
        self.prefix, self.on_head, self.on_read = prefix, on_head, on_read
        self.head = bytearray()
        self.hold, self.repeat, self.connecting = hold, repeat, connecting
        self.shut_after_eof = shut_after_eof
        self._sent_all = False  # everything went; the shut waits for the peer's EOF
        self.sent = self.received = 0
        self.digest = hashlib.sha256()  # of what was read after the prefix
        self.eof = self.shut = False
        self.error: str | None = None
        self.ended: float | None = None
        self._part = self._offset = 0
        self._events = 0  # what the loop watches for it now
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
        return self.connecting or (not self.hold and not self.shut and not self._sent_all
                                   and self.outgoing is not None)

    @property
    def done(self) -> bool:
        return self.error is not None or (self.eof and (self.shut or self.outgoing is None))

    def on_writable(self, stopping: bool = False) -> None:
        """Send what the socket takes; `stopping`: a repeating stream ends with this round."""
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
                n = self.sock.send(part[self._offset : self._offset + RECV])
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
        self._sent_all = True
        if self.eof or not self.shut_after_eof:
            self._shut()

    def _shut(self) -> None:
        self.shut = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.fail(exc)

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(exc)
            return
        if not data:
            self.eof = True
            if self._sent_all and not self.shut:
                self._shut()
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


class StreamLoop:
    """Checked streams and the listeners of their guests, on one `Loop`.

    `stop()` may be called from another thread: the loop looks at it when a
    repeating stream has sent a round.
    """

    def __init__(self) -> None:
        self.loop = Loop()
        self.streams: list[Stream] = []
        self.open_streams = 0  # added and not ended yet
        self._listeners: list[socket.socket] = []
        self._stopping = False

    def connect(self, address: tuple[str, int], outgoing: Sequence[Buffer] | None,
                **options: Any) -> Stream:
        """A client stream to `address`; the connect completes inside `run`."""
        stream = Stream(nonblocking_connect(address), outgoing, connecting=True, **options)
        self.add(stream)
        return stream

    def listen(self, sock: socket.socket, accept: Callable[[socket.socket], Stream]) -> None:
        """Accept on `sock` inside `run`; `accept` makes each connection's stream."""
        sock.setblocking(False)
        self._listeners.append(sock)

        def on_accept(_events: int) -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                self.add(accept(conn))

        self.loop.add(sock, READ, on_accept)

    def add(self, stream: Stream) -> None:
        stream.sock.setblocking(False)
        self.streams.append(stream)
        self.open_streams += 1
        self._update(stream)

    def release(self) -> None:
        """Let every held stream send; from inside the loop (a callback)."""
        for stream in self.streams:
            if stream.ended is None:
                stream.hold = False
                self._update(stream)

    def stop(self) -> None:
        """Repeating streams finish the round they are in, then shut for writing."""
        self._stopping = True

    def run(self, until: Callable[[], bool], timeout: float) -> bool:
        """Serve until `until()` holds (True) or `timeout` seconds pass (False)."""
        return self.loop.run(until, timeout)

    def _serve(self, stream: Stream, events: int) -> None:
        if events & ~WRITE and not stream.eof:
            stream.on_readable()
        if events & WRITE and stream.error is None and stream.wants_write:
            stream.on_writable(self._stopping)
        self._update(stream)

    def _update(self, stream: Stream) -> None:
        if stream.ended is not None:  # a callback's release() got here first
            return
        if stream.done:
            if stream._events:
                self.loop.remove(stream.sock)
            stream._events = 0
            stream.ended = time.monotonic()
            self.open_streams -= 1
            stream.sock.close()
            return
        events = (0 if stream.eof else READ) | (WRITE if stream.wants_write else 0)
        if events == stream._events:
            return
        if not events:  # EOF read and sending held: nothing to wait for until it is released
            self.loop.remove(stream.sock)
        elif stream._events:
            self.loop.modify(stream.sock, events)
        else:
            self.loop.add(stream.sock, events, functools.partial(self._serve, stream))
        stream._events = events

    def close(self) -> None:
        """Close every socket, the listeners' included."""
        for stream in self.streams:
            stream.sock.close()
        for sock in self._listeners:
            sock.close()
        self.loop.close()

    def __enter__(self) -> StreamLoop:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
