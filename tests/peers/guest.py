"""Guests: the services inside the "VM", each a `Guest` in threads running one handler
per connection; `echo_until_eof` is the echo guest every test uses (conftest's
`echo_server` and `unix_echo_server`)."""

from __future__ import annotations

import errno
import socket
from typing import Callable

from tests.peers.server import PEER_TIMEOUT, ThreadedServer


class Guest(ThreadedServer):
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
        return self.where

    def handle(self, sock: socket.socket, index: int) -> None:
        sock.settimeout(PEER_TIMEOUT)
        self._handler(sock)

    def __enter__(self) -> Guest:
        return self


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
