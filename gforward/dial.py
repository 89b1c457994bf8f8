"""The connection to the daemon: TCP, TLS or unix socket, maybe through a proxy, then the upgrade.

Every socket made here is handed to `track` before it blocks, so that a
closing forwarder can end a tunnel that is still dialling by closing it.
One timer bounds the whole dial: proxy connect, CONNECT, TLS and upgrade.
"""

from __future__ import annotations

import ipaddress
import ssl
from typing import Any, Callable, Union

import gevent
from gevent import socket

from .endpoint import Endpoint
from .errors import ForwardError
from .handshake import ClientHandshake
from .proxy import ConnectHandshake, ProxyError
from .tls import TLSChannel

RECV_SIZE = 64 * 1024
_NAME_MISMATCH = (62, 64)  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
REFUSAL_BODY_WAIT = 1.0  # seconds to wait for the start of a refusal's body
Stream = Union[socket.socket, TLSChannel]  # what the upgrade ran over, for the pump


class DialError(ForwardError):
    """The daemon could not be reached, or did not answer in time."""


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
    proxy: ConnectHandshake | None = None,
) -> tuple[Stream, bytes]:
    """Connect and upgrade within `timeout` seconds; returns the stream (a socket, or the
    TLS channel over it) and the frames already read.

    With `proxy`, the connection is a CONNECT tunnel through it; TLS (with
    the daemon's name for SNI and verification) then runs inside the tunnel.
    On failure every socket made here is closed before the error is raised.
    """
    opened: list[socket.socket] = []

    def keep(sock: socket.socket) -> None:
        opened.append(sock)
        track(sock)

    timer = gevent.Timeout(timeout)
    timer.start()
    where = endpoint.describe()
    if proxy is not None:
        where += f" via proxy {proxy.proxy.describe()}"
    try:
        return _upgrade(endpoint, handshake, tls, keep, proxy)
    except BaseException as exc:
        for sock in opened:
            sock.close()
        if exc is timer and handshake.refused:
            raise handshake.refusal() from None
        if exc is timer:
            raise DialError(f"no answer from {where} within {timeout:g} s") from None
        if isinstance(exc, ssl.SSLCertVerificationError):
            raise DialError(_rejected_certificate(exc, where)) from exc
        if isinstance(exc, OSError):
            raise DialError(f"cannot reach {where}: {exc}") from exc
        raise
    finally:
        timer.close()


def _rejected_certificate(exc: ssl.SSLCertVerificationError, where: str) -> str:
    """Why the daemon's certificate failed, and the fix that fits that reason."""
    problem = str(exc.verify_message or exc).rstrip(".")
    if exc.verify_code in _NAME_MISMATCH:
        fix = "the URL must name a host the certificate lists"
    else:
        fix = "trust its CA with ca_file (--ca-file) or ssl_context"
    return f"TLS certificate of {where} not accepted ({exc.reason}): {problem}; {fix}"


def _upgrade(
    endpoint: Endpoint,
    handshake: ClientHandshake,
    tls: ssl.SSLContext | None,
    track: Callable[[socket.socket], None],
    proxy: ConnectHandshake | None,
) -> tuple[Stream, bytes]:
    sock = _connect(endpoint, tls, track, proxy)
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
    endpoint: Endpoint,
    tls: ssl.SSLContext | None,
    track: Callable[[socket.socket], None],
    proxy: ConnectHandshake | None,
) -> Stream:
    """A connected stream to the daemon, TLS already negotiated where asked."""
    if proxy is None:
        sock = connect(endpoint.host, endpoint.port, endpoint.unix_path, track)
    else:
        sock = _tunnel(proxy, track)
    if tls is None:
        return sock
    channel = TLSChannel(sock, tls, server_hostname=endpoint.host)  # never the proxy's name
    channel.handshake()
    return channel


def _tunnel(exchange: ConnectHandshake, track: Callable[[socket.socket], None]) -> socket.socket:
    """A socket to the proxy that it has turned into a tunnel to the daemon."""
    server = exchange.proxy
    try:
        sock = connect(server.host, server.port, "", track)
    except OSError as exc:
        raise ProxyError(f"cannot reach proxy {server.describe()}: {exc}") from exc
    sock.sendall(exchange.request)
    while not exchange.receive(sock.recv(RECV_SIZE)):
        pass
    return sock


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
    for family, kind, proto, addr in _addresses(host, port):
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


def _addresses(host: str, port: int) -> list[tuple[int, int, int, Any]]:
    """Where host:port is; an IP literal needs no lookup (gevent resolves in a thread pool,
    which costs a fifth of a tunnel's setup on loopback)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return [info[:3] + info[4:] for info in
                socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)]
    return [(family, socket.SOCK_STREAM, 0, (host, port))]
