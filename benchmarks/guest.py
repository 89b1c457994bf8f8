"""The guest service (the port inside the "VM"): `python -m benchmarks.guest`.

It speaks `benchmarks.protocol` on 127.0.0.1, a free port, which it prints as
``guest 127.0.0.1:PORT``. One thread and one epoll serve every connection, so
that small requests cost it a few microseconds each: the guest must never be
what limits a run, the direct one included.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from typing import Any, Callable

from benchmarks import protocol as p
from benchmarks.children import child_arguments, child_setup
from benchmarks.eventloop import READ, WRITE, Loop

RECV = 65536  # what one read takes when the bytes themselves are kept (echo, headers)


class Guest:
    """The listener and what every connection shares: one read buffer, one payload."""

    def __init__(self, loop: Loop, listener: socket.socket) -> None:
        self.loop = loop
        self.listener = listener
        self.buf = bytearray(p.CHUNK)
        self.payload = memoryview(os.urandom(p.CHUNK))
        self._replies: dict[tuple[int, int], bytes] = {}
        listener.setblocking(False)
        loop.add(listener, READ, self.accept)

    def accept(self, _events: int) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, say: the client sees it as a failure
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            Connection(self, sock)

    def replies(self, size: int, count: int) -> bytes:
        """`count` replies of `size` bytes, in one buffer (made once)."""
        key = (size, count)
        data = self._replies.get(key)
        if data is None:
            data = self._replies[key] = bytes(self.payload[:size]) * count
        return data


class Connection:
    """One client: its mode, and what it still owes or is owed."""

    __slots__ = ("got", "guest", "head", "left", "mode", "out", "reply", "request", "sock")

    def __init__(self, guest: Guest, sock: socket.socket) -> None:
        self.guest, self.sock = guest, sock
        self.head = b""
        self.mode = b""
        self.left = self.request = self.reply = self.got = 0
        self.out = bytearray()  # bytes a full send buffer left over; reading waits for them
        guest.loop.add(sock, READ, self.on_head)

    def close(self) -> None:
        self.guest.loop.remove(self.sock)
        self.sock.close()

    def send(self, data: bytes | memoryview) -> None:
        if not self.out:
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                n = 0
            if n == len(data):
                return
            data = data[n:]
            self.guest.loop.switch(self.sock, WRITE, self.on_writable)
        self.out += data

    def on_writable(self, _events: int) -> None:
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        del self.out[:n]
        if not self.out:
            self.resume()

    def resume(self) -> None:
        """Back to reading, in the mode's own handler."""
        handler = {p.ECHO: self.on_echo, p.REQUESTS: self.on_requests}.get(self.mode,
                                                                         self.on_count)
        self.guest.loop.switch(self.sock, READ, handler)

    def on_head(self, _events: int) -> None:
        try:
            data = self.sock.recv(RECV)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.head += data
        mode = self.head[:1]
        need = 1 + p.HEAD_SIZE.get(mode, 0)
        if len(self.head) < need:
            return
        rest, self.mode = self.head[need:], mode
        try:
            if mode == p.ECHO:
                self.resume()
                self.send(p.ECHO + rest)
            elif mode == p.UPLOAD:
                (self.left,) = p.SIZE.unpack(self.head[1:need])
                self.resume()
                self.count(len(rest))
            elif mode == p.DOWNLOAD:
                (self.left,) = p.SIZE.unpack(self.head[1:need])
                self.guest.loop.switch(self.sock, WRITE, self.on_download)
            elif mode == p.REQUESTS:
                self.request, self.reply = p.SHAPE.unpack(self.head[1:need])
                self.resume()
                self.answer(len(rest))
            else:
                self.close()
        except OSError:
            self.close()

    def on_echo(self, _events: int) -> None:
        self._read(self.sock.recv, RECV, self.send)

    def on_requests(self, _events: int) -> None:
        self._read(self.sock.recv_into, self.guest.buf, self.answer)

    def answer(self, n: int) -> None:
        done, self.got = divmod(self.got + n, self.request)
        if done:
            self.send(self.guest.replies(self.reply, done))

    def on_count(self, _events: int) -> None:
        """Uploads, and every mode once its part is done: count and drop until EOF."""
        self._read(self.sock.recv_into, self.guest.buf, self.count)

    def _read(self, read: Callable[[Any], Any], into: Any, then: Callable[[Any], None]) -> None:
        """One `read(into)` (a recv, or a recv_into the shared buffer); what it got goes to
        `then`. EOF or a socket error (the read's or the answer's) closes the connection."""
        try:
            got = read(into)
            if got:
                then(got)
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self.close()

    def count(self, n: int) -> None:
        if self.mode == p.UPLOAD and self.left > 0:
            self.left -= n
            if self.left <= 0:
                self.send(p.UPLOADED)

    def on_download(self, _events: int) -> None:
        try:
            n = self.sock.send(self.guest.payload[:min(self.left, p.CHUNK)])
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.left -= n
        if self.left <= 0:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self.mode = b""
            self.resume()


def main() -> int:
    args = child_arguments(__doc__.split("\n\n")[0]).parse_args()
    child_setup(args.deadline_at, args.nofile)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    loop = Loop()
    Guest(loop, listener)
    print(f"guest 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    loop.run_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

