"""Fixtures shared by the tests: guest services and daemons on loopback, cleaned up after."""

from __future__ import annotations

import os
import socket
import socketserver
import tempfile
import threading
from collections.abc import Iterator

import pytest

import gforward.daemon


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echo until EOF, then half-close: the guest side of most tunnel tests."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while True:
                data = sock.recv(256 * 1024)
                if not data:
                    break
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _TCPEcho(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


class _UnixEcho(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = 1024


def _serve(server: socketserver.BaseServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def echo_server() -> Iterator[str]:
    """A TCP echo service; yields its "127.0.0.1:port" (an upstream target)."""
    server = _TCPEcho(("127.0.0.1", 0), _EchoHandler)
    host, port = server.server_address[:2]
    for _ in _serve(server):
        yield f"{host}:{port}"


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short private directory: unix socket paths must fit in 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="gf-", dir="/tmp") as path:
        yield path


@pytest.fixture
def unix_echo_server(short_tmp: str) -> Iterator[str]:
    """A unix-socket echo service; yields its path."""
    path = os.path.join(short_tmp, "guest.sock")
    server = _UnixEcho(path, _EchoHandler)
    for _ in _serve(server):
        yield path


@pytest.fixture
def daemon() -> Iterator[gforward.daemon.Daemon]:
    """The reference daemon in this process (its own hub thread), no token."""
    with gforward.daemon.start() as d:
        yield d


def echo_once(address: tuple[str, int] | str, payload: bytes, timeout: float = 10.0) -> bytes:
    """Connect, send `payload`, half-close, and read everything back."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = sock.recv(256 * 1024)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
