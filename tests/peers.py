"""Daemons and guests for the wire-level tests, none of them built on gforward's own code.

* `FakeDaemon`: a raw-socket daemon in threads.  Each accepted connection
  runs the next *script* (a function of one `Peer`), so a test states the
  exact bytes a daemon answers: a refusal, a bad Sec-WebSocket-Accept,
  silence, half a status line, a ping.  Its frame codec is written here
  from RFC 6455, independently of gforward.proto.frames.
* `Guest`: a TCP or unix-socket service in threads (the upstream inside the
  "VM"), running one handler per connection; `echo_until_eof` is the echo
  guest every test uses (conftest's `echo_server` and `unix_echo_server`).
* Scripts most fake daemons share: `accept_then_echo`, `accept_then_close`,
  `silent`, `accept_tcp_only`, `answer_then_wait`.
* `LoadLoop` and `Stream`: thousands of client and guest connections driven
  by one thread with a selector, each sending known bytes and hashing what
  it reads (the load tests and benchmarks/soak.py).
* `announced`: a program of ours in a process of its own (the reference
  daemon, the gforward command line), once it has printed where it listens;
  `daemon_process`, the reference daemon that way.
* `Program` and `Programs`: programs run as a user runs them, stdout read line
  by line with a timeout and stderr collected (conftest's `programs`), with
  `clean_env` (no SLICER_* or proxy variables from the caller).
* The gevent-websocket peer, a WebSocket implementation other than ours:
  `python -m tests.peers gws [--prefix /p]` serves gevent.pywsgi with
  geventwebsocket's handler in its own process, prints
  `listening on http://127.0.0.1:PORT` when ready, and runs until killed.
  Behaviour per VM name (the `{name}` of `/vm/{name}/forward`):
  `echo` echoes each message; `headers` sends one JSON message with the
  request line and headers it saw, then closes; `ping` sends a ping with
  the payload `gws-ping-<n>`, waits for the pong and sends back
  `pong:<its payload>`, then echoes; `bye` sends `bye` and closes at once.
  Paths outside `{prefix}/vm/*/forward` get a plain 404, never an upgrade.
  Keep its payloads small: its masking runs at a few MB/s.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import queue
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Callable, NamedTuple, Union

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA
PEER_TIMEOUT = 15.0  # no fake daemon or guest socket blocks longer than this


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode("ascii")).digest()).decode()


def _unmask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One unmasked frame, as a server sends it."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", first, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


class Frame(NamedTuple):
    fin: bool
    opcode: int
    masked: bool
    payload: bytes  # unmasked
    key: bytes  # the masking key, b"" when unmasked


@dataclass
class Request:
    """An upgrade request as it arrived: the head's bytes, split but not normalised."""

    head: bytes
    request_line: str
    headers: list[tuple[str, str]]  # (name, value) in the order sent, names as sent

    def get(self, name: str) -> str | None:
        """The value of header `name` (any case); None when absent. Fails if repeated."""
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"header {name} sent {len(values)} times"
        return values[0] if values else None

    @property
    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    @property
    def target(self) -> str:
        return self.request_line.split(" ")[1]


class Peer:
    """One accepted connection, seen from the fake daemon's side."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(PEER_TIMEOUT)
        self.buffer = bytearray()
        self.request: Request | None = None
        self.eof = threading.Event()  # set once the forwarder's side closed (read b"")

    # Reading ----------------------------------------------------------------

    def _fill(self) -> bool:
        data = self.sock.recv(256 * 1024)
        if not data:
            self.eof.set()
            return False
        self.buffer += data
        return True

    def read_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                raise EOFError(f"EOF after {len(self.buffer)} of {n} bytes")
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def read_request(self) -> Request:
        """Read the upgrade request's head (up to the blank line)."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise EOFError("EOF before the end of the request head")
        end = self.buffer.index(b"\r\n\r\n") + 4
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        lines = head[:-4].decode("latin-1").split("\r\n")
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            assert sep, f"malformed header line {line!r}"
            headers.append((name, value.strip()))
        self.request = Request(head, lines[0], headers)
        return self.request

    def read_frame(self) -> Frame:
        b0, b1 = self.read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", self.read_exact(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self.read_exact(8))
        masked = bool(b1 & 0x80)
        key = self.read_exact(4) if masked else b""
        payload = self.read_exact(n)
        return Frame(bool(b0 & 0x80), b0 & 0x0F, masked,
                     _unmask(payload, key) if masked else payload, key)

    def wait_eof(self) -> None:
        """Read (and drop) until the other side closes; a reset counts (a client that
        closes with our unread bytes in its buffer resets, per TCP)."""
        try:
            while self._fill():
                self.buffer.clear()
        except ConnectionResetError:
            pass

    # Writing ----------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def accept(self, accept: str | None = None, *, then: bytes = b"") -> None:
        """Answer the request with a 101; `accept` overrides the correct Sec-WebSocket-Accept.

        `then` (frames, say) goes in the same send as the 101, so that the
        client reads it along with the upgrade's answer.
        """
        assert self.request is not None
        key = self.request.get("Sec-WebSocket-Key") or ""
        self.send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {accept or accept_key(key)}\r\n\r\n".encode()
            + then
        )

    def send_frame(self, opcode: int, payload: bytes = b"") -> None:
        self.send(encode_frame(opcode, payload))

    def close_ws(self, code: int = 1000) -> None:
        self.send_frame(OP_CLOSE, struct.pack("!H", code))

    def echo(self) -> list[Frame]:
        """Echo data frames until the client's Close, answer it; returns the control frames."""
        control = []
        while True:
            frame = self.read_frame()
            assert frame.masked, "a client frame arrived unmasked"
            if frame.opcode in (OP_TEXT, OP_BINARY, 0):
                self.send_frame(frame.opcode, frame.payload)
                continue
            control.append(frame)
            if frame.opcode == OP_CLOSE:
                self.send_frame(OP_CLOSE, frame.payload[:2])
                return control

    def proxy(self, address: tuple[str, int]) -> None:
        """Pipe this connection to a real daemon at `address`, half-closes carried across."""
        upstream = socket.create_connection(address, timeout=PEER_TIMEOUT)
        try:
            if self.buffer:
                upstream.sendall(bytes(self.buffer))
                self.buffer.clear()
            back = threading.Thread(target=_pipe, args=(upstream, self.sock), daemon=True)
            back.start()
            _pipe(self.sock, upstream)
            back.join(PEER_TIMEOUT)
        finally:
            upstream.close()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while True:
            data = source.recv(256 * 1024)
            if not data:
                break
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


Script = Callable[[Peer], None]


class _ThreadedServer:
    """A listening socket whose connections each run `handle` in a thread of their own.

    It listens on the unix socket `unix_path` when given, else on a free port of `host`.
    """

    BACKLOG = 64

    def __init__(self, unix_path: str, host: str) -> None:
        family = (socket.AF_UNIX if unix_path
                  else socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.bind(unix_path or (host, 0))
        self._listener.listen(self.BACKLOG)
        self.address = self._listener.getsockname()
        self.errors: list[BaseException] = []
        self._stopping = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._count = 0
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def port(self) -> int:
        return int(self.address[1])

    def handle(self, sock: socket.socket, index: int) -> None:
        raise NotImplementedError

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._stopping:
                    sock.close()
                    return
                index = self._count
                self._count += 1
                self._sockets.append(sock)
                thread = threading.Thread(target=self._run, args=(sock, index), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _run(self, sock: socket.socket, index: int) -> None:
        try:
            self.handle(sock, index)
        except BaseException as exc:
            if not self._stopping:
                self.errors.append(exc)
        finally:
            sock.close()

    def close(self) -> None:
        """Stop accepting, cut every connection, join every thread; re-raise a handler's error."""
        with self._lock:
            self._stopping = True
            sockets, threads = list(self._sockets), list(self._threads)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        self._acceptor.join(PEER_TIMEOUT)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            thread.join(PEER_TIMEOUT)
        if isinstance(self.address, str):
            with contextlib.suppress(OSError):
                os.unlink(self.address)
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> _ThreadedServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class FakeDaemon(_ThreadedServer):
    """Connection i runs scripts[i] (the last script for every later one); `peers` in order."""

    def __init__(self, *scripts: Script, unix_path: str = "", host: str = "127.0.0.1") -> None:
        assert scripts
        self._scripts = scripts
        self.peers: list[Peer] = []
        super().__init__(unix_path, host)

    @property
    def url(self) -> str:
        if isinstance(self.address, str):
            return f"unix://{self.address}"
        host = self.address[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def handle(self, sock: socket.socket, index: int) -> None:
        peer = Peer(sock)
        self.peers.append(peer)
        try:
            self._scripts[min(index, len(self._scripts) - 1)](peer)
        finally:
            peer.sock.close()  # a script may have replaced it (a TLS wrap)

    def __enter__(self) -> FakeDaemon:
        return self


class Guest(_ThreadedServer):
    """A service on loopback or a unix path running `handler(sock)` per connection.

    `target` is what a spec's remote side names: "127.0.0.1:port", "[::1]:port"
    or the path.  A handler's exception fails the test when the guest closes,
    unless the guest was closing already.
    """

    BACKLOG = 1024  # a test may open hundreds of tunnels at once

    def __init__(self, handler: Callable[[socket.socket], None], unix_path: str = "",
                 host: str = "127.0.0.1") -> None:
        self._handler = handler
        super().__init__(unix_path, host)

    @property
    def target(self) -> str:
        if isinstance(self.address, str):
            return self.address
        host = self.address[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def handle(self, sock: socket.socket, index: int) -> None:
        sock.settimeout(PEER_TIMEOUT)
        self._handler(sock)

    def __enter__(self) -> Guest:
        return self


def reset_on_close(sock: socket.socket) -> None:
    """Make close() send RST, as the kernel of a crashed peer does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def echo_until_eof(sock: socket.socket) -> None:
    """A guest handler: echo, then half-close once the client has.

    A connection the daemon cuts (a reset, a broken pipe: the tunnel ended
    abruptly, as many tests make it) ends the echo quietly; any other error,
    a timeout included, fails the test when the guest closes.
    """
    try:
        while data := sock.recv(256 * 1024):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError as exc:
        if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
            raise


# Fake daemon scripts that several test modules use -----------------------------


def accept_then_echo(peer: Peer) -> None:
    """Upgrade, echo every data frame, answer the client's Close."""
    peer.read_request()
    peer.accept()
    peer.echo()


def accept_then_close(peer: Peer) -> None:
    """Upgrade, then close the WebSocket at once (Close 1000)."""
    peer.read_request()
    peer.accept()
    peer.close_ws()
    peer.wait_eof()


def silent(peer: Peer) -> None:
    """Read the upgrade request and never answer it."""
    peer.read_request()
    peer.wait_eof()


def accept_tcp_only(peer: Peer) -> None:
    """Accept the TCP connection and never even read the request."""
    peer.wait_eof()


def answer_then_wait(answer: bytes) -> Script:
    """A script that reads the request, sends `answer` (a refusal, part of one, a proxy's
    200) and says no more, staying connected until the client goes."""

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.send(answer)
        peer.wait_eof()

    return script


# Load: many connections, one thread --------------------------------------------

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


# Our own programs, each in a process of its own --------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def announced(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stderr: IO[str] | None = None,
    timeout: float = PEER_TIMEOUT,
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run `python argv...` from the repository root until it prints its first line.

    Yields the process and that line (where it listens); SIGTERM at the end,
    SIGKILL if that is not enough.  Its stderr is ours (pytest captures it)
    unless `stderr` (a file) says otherwise.
    """
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stderr=stderr,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"{' '.join(argv)} printed nothing in {timeout:g} s "
                               f"(exit status {proc.poll()})")
        yield proc, line.strip()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@contextlib.contextmanager
def daemon_process(*args: str) -> Iterator[str]:
    """The reference daemon (`python -m gforward.daemon`) in a process of its own; yields its URL.

    It gets a core of its own: a load test's client, guest and forwarder then
    do not share one interpreter lock with it.
    """
    with announced(["-m", "gforward.daemon", "--listen", "127.0.0.1:0", *args]) as (_, line):
        assert line.startswith("listening on "), line
        yield line.split()[-1]


READ_TIMEOUT = 15.0  # a slow CI machine still starts a Python process in this time


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without SLICER_* or proxies, so only the test's settings count."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLICER_") and not k.lower().endswith("_proxy")}
    env.update(extra)
    return env


class Program:
    """A subprocess under test: stdout lines read with a timeout, stderr collected."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=clean_env() if env is None else env, cwd=cwd, text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._out: list[str] = []
        self._err: list[str] = []
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self._on_out),
                             daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self._err.append),
                             daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _on_out(self, line: str | None) -> None:
        if line is not None:
            self._out.append(line)
        self._lines.put(line)

    @staticmethod
    def _read(stream: IO[str], sink: Callable[[str | None], None]) -> None:
        for line in stream:
            sink(line)
        sink(None)  # EOF; harmless on stderr, where None is never joined
        stream.close()

    def readline(self, timeout: float = READ_TIMEOUT) -> str:
        """The next stdout line; fails the test (with stderr) on timeout or exit."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from {self.args} in {timeout}s; "
                                 f"stderr: {self.stderr!r}") from None
        if line is None:
            self.popen.wait(READ_TIMEOUT)
            raise AssertionError(f"{self.args} exited {self.popen.returncode} early; "
                                 f"stderr: {self.stderr!r}")
        return line.rstrip("\n")

    def finish(self, timeout: float = READ_TIMEOUT) -> int:
        """Wait for the exit status, and for all of its output."""
        status = self.popen.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return status

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Deliver `sig` as a user would and return the exit status."""
        self.popen.send_signal(sig)
        return self.finish()

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(line for line in self._err if line is not None)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(READ_TIMEOUT)
        for reader in self._readers:
            reader.join(READ_TIMEOUT)


class Programs:
    """Every program a test starts, each killed at the end whatever happened."""

    def __init__(self) -> None:
        self._all: list[Program] = []

    def run(self, *args: str, env: dict[str, str] | None = None,
            cwd: str | None = None) -> Program:
        program = Program(list(args), env, cwd)
        self._all.append(program)
        return program

    def daemon(self, *args: str, listeners: int = 1,
               env: dict[str, str] | None = None) -> tuple[Program, list[str]]:
        """`python -m gforward.daemon ARGS`, once it has announced its `listeners` URLs;
        `env` is added to a clean environment."""
        program = self.run(sys.executable, "-m", "gforward.daemon", *args,
                           env=clean_env(**(env or {})))
        urls = []
        for _ in range(listeners):
            line = program.readline()
            assert line.startswith("listening on "), line
            urls.append(line[len("listening on "):])
        return program, urls

    def close(self) -> None:
        for program in self._all:
            program.close()


# The gevent-websocket peer (runs in its own process) --------------------------


def serve_gws(prefix: str) -> None:
    """gevent.pywsgi + geventwebsocket, serving the behaviours of the module doc."""
    import json
    import re
    import sys
    from itertools import count

    from gevent.pywsgi import WSGIServer
    from gevent.queue import Queue
    from geventwebsocket.handler import WebSocketHandler
    from geventwebsocket.websocket import WebSocket

    forward_path = re.compile(re.escape(prefix) + r"/vm/([^/]+)/forward")
    pings = count(1)
    pong_queues: dict[int, Queue] = {}  # by id(ws): WebSocket has __slots__

    def handle_pong(self: WebSocket, header: object, payload: bytes) -> None:
        pongs = pong_queues.get(id(self))
        if pongs is not None:
            pongs.put(bytes(payload))

    WebSocket.handle_pong = handle_pong

    def not_an_upgrade(handler: WebSocketHandler) -> bool:
        """pre_start_hook: True sends the request to the plain WSGI app (the 404)."""
        return forward_path.fullmatch(handler.environ.get("PATH_INFO", "")) is None

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        ws = environ.get("wsgi.websocket")
        if ws is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [f"no such endpoint {environ.get('PATH_INFO')}\n".encode()]
        mode = forward_path.fullmatch(environ["PATH_INFO"]).group(1)
        if mode == "headers":
            seen = {
                "request_line": ws.handler.requestline,
                "headers": [[k, v] for k, v in ws.handler.headers.items()],
            }
            ws.send(json.dumps(seen).encode(), binary=True)
            ws.close()
            return []
        if mode == "bye":
            ws.send(b"bye", binary=True)
            ws.close()
            return []
        if mode == "ping":
            pongs = pong_queues[id(ws)] = Queue()
            payload = f"gws-ping-{next(pings)}"
            ws.send_frame(payload, ws.OPCODE_PING)
            reader = gevent.spawn(_echo_gws, ws)  # reads, so handle_pong runs
            try:
                pong = pongs.get(timeout=10)
            finally:
                del pong_queues[id(ws)]
            ws.send(json.dumps({"ping": payload, "pong": pong.decode("latin-1")}).encode(),
                    binary=True)
            reader.join()
            return []
        _echo_gws(ws)
        return []

    import gevent

    server = WSGIServer(("127.0.0.1", 0), app, handler_class=WebSocketHandler, log=None,
                        error_log=None)
    server.pre_start_hook = not_an_upgrade
    server.start()
    print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
    sys.stdout.flush()
    server.serve_forever()


def _echo_gws(ws: object) -> None:
    while True:
        message = ws.receive()  # type: ignore[attr-defined]
        if message is None:
            return
        ws.send(message, binary=True)  # type: ignore[attr-defined]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.peers")
    sub = parser.add_subparsers(dest="command", required=True)
    gws = sub.add_parser("gws", help="serve the gevent-websocket peer")
    gws.add_argument("--prefix", default="", help="path prefix of /vm/{name}/forward")
    args = parser.parse_args()
    serve_gws(args.prefix.rstrip("/"))
