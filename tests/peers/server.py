"""What the threaded peers (fake daemons, guests) are built on: `ThreadedServer`, a
listening socket whose connections each run in a thread of their own; `PEER_TIMEOUT`;
and `reset_on_close`, for any test socket that must end with a reset."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading

PEER_TIMEOUT = 15.0  # no fake daemon or guest socket blocks longer than this


class ThreadedServer:
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

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        return self._count

    @property
    def where(self) -> str:
        """The unix socket's path, or "host:port" ("[host]:port" for IPv6)."""
        if isinstance(self.address, str):
            return self.address
        host = self.address[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

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

    def __enter__(self) -> ThreadedServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def reset_on_close(sock: socket.socket) -> None:
    """Make close() send RST, as the kernel of a crashed peer does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

