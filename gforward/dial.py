"""The connection to the daemon: TCP, TLS or unix socket, then the upgrade.

Every socket made here is handed to `track` before it blocks, so that a
closing forwarder can end a tunnel that is still dialling by closing it.
"""

from __future__ import annotations

from typing import Callable

import gevent
from gevent import socket, ssl

from .endpoint import Endpoint
from .errors import ForwardError
from .handshake import ClientHandshake

RECV_SIZE = 64 * 1024
REFUSAL_BODY_WAIT = 1.0  # seconds to wait for the start of a refusal's body


class DialError(ForwardError):
    """The daemon could not be reached, or did not answer in time."""


def tls_context() -> ssl.SSLContext:
    """A verifying client context of gevent's kind (the stdlib's would block the hub)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_default_certs()
    return context


def set_nodelay(sock: socket.socket) -> None:
    """Small writes (an echo, a pong) must not wait for Nagle's algorithm."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def open_websocket(
    endpoint: Endpoint,
    handshake: ClientHandshake,
    *,
    timeout: float,
    tls: ssl.SSLContext | None,
    track: Callable[[socket.socket], None],
) -> tuple[socket.socket, bytes]:
    """Connect and upgrade within `timeout` seconds; returns the socket and frames already read.

    On failure every socket made here is closed before the error is raised.
    """
    opened: list[socket.socket] = []

    def keep(sock: socket.socket) -> None:
        opened.append(sock)
        track(sock)

    timer = gevent.Timeout(timeout)
    timer.start()
    try:
        return _upgrade(endpoint, handshake, tls, keep)
    except BaseException as exc:
        for sock in opened:
            sock.close()
        if exc is timer and handshake.refused:
            raise handshake.refusal() from None
        if exc is timer:
            raise DialError(f"no answer from {endpoint.describe()} within {timeout:g} s") from None
        if isinstance(exc, OSError):
            raise DialError(f"cannot reach {endpoint.describe()}: {exc}") from exc
        raise
    finally:
        timer.close()


def _upgrade(
    endpoint: Endpoint,
    handshake: ClientHandshake,
    tls: ssl.SSLContext | None,
    track: Callable[[socket.socket], None],
) -> tuple[socket.socket, bytes]:
    sock = _connect(endpoint, tls, track)
    sock.sendall(handshake.request)
    while not handshake.refused:
        accepted = handshake.receive(sock.recv(RECV_SIZE))
        if accepted is not None:
            return sock, accepted.trailing
    # A refusal's body is only wanted for the log: give it a moment, not the whole timeout.
    with gevent.Timeout(REFUSAL_BODY_WAIT, False):
        while True:
            handshake.receive(sock.recv(RECV_SIZE))
    raise handshake.refusal()


def _connect(
    endpoint: Endpoint, tls: ssl.SSLContext | None, track: Callable[[socket.socket], None]
) -> socket.socket:
    """A connected socket to the daemon, TLS already negotiated where asked."""
    sock = connect(endpoint.host, endpoint.port, endpoint.unix_path, track)
    if tls is None:
        return sock
    wrapped = tls.wrap_socket(sock, server_hostname=endpoint.host)
    track(wrapped)
    return wrapped


def connect(
    host: str, port: int, unix_path: str, track: Callable[[socket.socket], None]
) -> socket.socket:
    """A connected stream socket to a unix path (when given) or to host:port."""
    if unix_path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        track(sock)
        try:
            sock.connect(unix_path)
        except BaseException:
            sock.close()
            raise
        return sock
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, addr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        track(sock)
        try:
            sock.connect(addr)
        except OSError as exc:
            error = exc
            sock.close()
            continue
        set_nodelay(sock)
        return sock
    raise error
