"""The raw-socket fake daemon, in threads: each accepted connection runs the next
*script* (a function of one `Peer`), so that a test states the exact bytes a daemon
answers: a refusal, a bad Sec-WebSocket-Accept, silence, half a status line, a ping.

* `FakeDaemon`, the server; `Peer`, one connection from its side, with the
  `Request` it read; frames through `tests.peers.frames`, not gforward's codec.
* Scripts several test modules share: `accept_then_echo`, `accept_then_close`,
  `silent`, `accept_tcp_only`, `answer_then_wait`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Callable

from tests.peers.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_TEXT,
    Frame,
    accept_key,
    encode_frame,
    unmask,
)
from tests.peers.server import PEER_TIMEOUT, ThreadedServer


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
                     unmask(payload, key) if masked else payload, key)

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

    def accept(self, accept: str | None = None, *, then: bytes = b"",
               apart: bool = False) -> None:
        """Answer the request with a 101; `accept` overrides the correct Sec-WebSocket-Accept.

        `then` (frames, say) goes in the same send as the 101, so that the
        client reads it along with the upgrade's answer; in a send of its own
        after the 101's when `apart`.
        """
        assert self.request is not None
        key = self.request.get("Sec-WebSocket-Key") or ""
        answer = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + f"Sec-WebSocket-Accept: {accept or accept_key(key)}\r\n\r\n".encode()
        )
        if apart:
            self.send(answer)
            self.send(then)
        else:
            self.send(answer + then)

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


class FakeDaemon(ThreadedServer):
    """Connection i runs scripts[i] (the last script for every later one); `peers` in order."""

    def __init__(self, *scripts: Script, unix_path: str = "", host: str = "127.0.0.1") -> None:
        assert scripts
        self._scripts = scripts
        self.peers: list[Peer] = []
        super().__init__(unix_path, host)

    @property
    def url(self) -> str:
        return f"unix://{self.where}" if isinstance(self.address, str) else f"http://{self.where}"

    def handle(self, sock: socket.socket, index: int) -> None:
        peer = Peer(sock)
        self.peers.append(peer)
        try:
            self._scripts[min(index, len(self._scripts) - 1)](peer)
        finally:
            peer.sock.close()  # a script may have replaced it (a TLS wrap)

    def __enter__(self) -> FakeDaemon:
        return self


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

