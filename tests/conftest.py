"""Fixtures shared by the tests: guests, daemons, programs and logs, cleaned up after.

Helpers that are not fixtures are in tests/support.py; fake daemons, guests and
subprocesses in tests/peers/, a module each.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

import gforward.daemon
from tests.peers.guest import Guest, echo_until_eof
from tests.peers.programs import READ_TIMEOUT, Programs

if TYPE_CHECKING:
    import trustme

# Guests: the services inside the "VM" -------------------------------------------------


@pytest.fixture
def echo_server() -> Iterator[str]:
    """A TCP echo guest; yields its "127.0.0.1:port" (an upstream target)."""
    with Guest(echo_until_eof) as guest:
        yield guest.target


@pytest.fixture
def short_tmp() -> Iterator[str]:
    """A short private directory: unix socket paths must fit in 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="gf-", dir="/tmp") as path:
        yield path


@pytest.fixture
def unix_echo_server(short_tmp: str) -> Iterator[str]:
    """A unix-socket echo guest; yields its path."""
    with Guest(echo_until_eof, os.path.join(short_tmp, "guest.sock")) as guest:
        yield guest.target


class _HTTPGuestHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"guest says {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture(scope="module")
def http_guest() -> Iterator[str]:
    """An HTTP server answering "guest says {path}"; yields "127.0.0.1:port"."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HTTPGuestHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(READ_TIMEOUT)


@pytest.fixture
def upstream_hole() -> Iterator[socket.socket]:
    """A bound loopback port nobody listens on (yet): connecting there is refused."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock
    finally:
        sock.close()


# Daemons, certificates and programs ---------------------------------------------------


@pytest.fixture
def daemon() -> Iterator[gforward.daemon.Daemon]:
    """The reference daemon in this process (its own hub thread), no token."""
    with gforward.daemon.start() as d:
        yield d


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A certificate authority of the module's own (trusted nowhere until a test says so)."""
    import trustme  # here, not above: a module that needs no CA runs without trustme

    return trustme.CA()


@pytest.fixture
def programs() -> Iterator[Programs]:
    """Every program the test starts (tests.peers.programs.Programs), killed at its end."""
    every = Programs()
    try:
        yield every
    finally:
        every.close()


# Logs ----------------------------------------------------------------------------------


@pytest.fixture
def gflog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Every gforward record down to DEBUG."""
    caplog.set_level(logging.DEBUG, logger="gforward")
    return caplog
