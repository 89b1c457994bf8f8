"""The connection to the daemon: TCP, TLS or unix socket, maybe through a proxy, then the upgrade.

Every socket made here is handed to `track` before it blocks, so that a
closing forwarder can end a tunnel that is still dialling by closing it.
One timer bounds the whole dial: proxy connect, CONNECT, TLS and upgrade.
"""

from __future__ import annotations

import _socket
import contextlib
import functools
import ipaddress
import itertools
import ssl
import time
from collections.abc import Sequence
from typing import Any, Callable, Union

import gevent
from gevent import socket
from gevent.event import AsyncResult
from gevent.queue import Empty, Queue

from .errors import ForwardError
from .proto.endpoint import Endpoint
from .proto.handshake import ClientHandshake
from .proto.proxy import ConnectHandshake, ProxyError
from .proto.records import Counters
from .proto.tunnel import Tunnel
from .pump import Pump
from .queues import raw
from .tls import RECV_SIZE, TLSChannel, TLSPump

_NAME_MISMATCH = (62, 64)  # OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
REFUSAL_BODY_WAIT = 1.0  # seconds to wait for the start of a refusal's body
ATTEMPT_DELAY = 0.25  # seconds an attempt to connect has alone: RFC 8305's recommended value

Stream = Union[socket.socket, TLSChannel]  # what the upgrade ran over, for the pump
Address = tuple[int, Any]  # (address family, socket address), as getaddrinfo gives them
_lookups: dict[tuple[Any, str, int], AsyncResult] = {}  # lookups under way, per hub and name


class DialError(ForwardError):
    """The daemon could not be reached, or did not answer in time."""


def open_pump(plain: Any, stream: Stream, tunnel: Tunnel, on_end: Callable[[Pump], None],
              counts: tuple[Counters, Counters]) -> Pump:
    """The pump for a plain socket and the stream an upgrade ran over, both gevent's."""
    if isinstance(stream, TLSChannel):
        return TLSPump(plain, stream, tunnel, on_end, counts)
    return Pump(raw(plain), raw(stream), tunnel, on_end, counts)


def set_nodelay(sock: socket.socket) -> None:
    """Small writes (an echo, a pong) must not wait for Nagle's algorithm.  Set on the
    socket under gevent's wrapper, whose Python layers cost twice the call; a unix
    socket refuses the option (EOPNOTSUPP), as a socket the peer already closed may."""
    with contextlib.suppress(OSError):
        raw(sock).setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
        if exc is timer:
            raise timed_out(handshake, where, timeout) from None
        if isinstance(exc, OSError):
            raise failure(exc, where) from exc
        raise
    finally:
        timer.close()


def timed_out(handshake: ClientHandshake, where: str, timeout: float) -> ForwardError:
    """The error of a dial whose time ran out: the refusal, if its head had arrived."""
    if handshake.refused:
        return handshake.refusal()
    return DialError(f"no answer from {where} within {timeout:g} s", "timeout")


def failure(exc: OSError, where: str) -> DialError:
    """The error of a dial that a socket or TLS error ended."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return DialError(_rejected_certificate(exc, where), "tls")
    cause = "tls" if isinstance(exc, ssl.SSLError) else "unreachable"
    return DialError(f"cannot reach {where}: {exc}", cause)


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
        raise ProxyError(f"cannot reach proxy {server.describe()}: {exc}", "unreachable") from exc
    sock.sendall(exchange.request)
    while not exchange.receive(sock.recv(RECV_SIZE)):
        pass
    return sock


def connect(
    host: str, port: int, unix_path: str, track: Callable[[socket.socket], None]
) -> socket.socket:
    """A connected stream socket to a unix path (when given) or to host:port."""
    if unix_path:
        return _attempt((socket.AF_UNIX, unix_path), track)
    return connect_any(resolve(host, port), track)


def connect_any(addresses: Sequence[Address], track: Callable[[socket.socket], None]
                ) -> socket.socket:
    """A TCP socket connected to the first of `addresses` that accepts ("Happy Eyeballs").

    As RFC 8305 (sections 4 and 5) has it: the address families take turns, and each
    attempt has ATTEMPT_DELAY to itself before the next one starts beside it (at once
    if it failed first), so a blackholed address costs a quarter of a second, not the
    whole dial.  The first connection wins.  Every other socket is closed here before
    returning or raising, whatever ended the race (a timeout of the caller's included),
    never left to the garbage collector.
    """
    ordered = interleave(addresses)
    sock = _attempt(ordered[0], track) if len(ordered) == 1 else _race(ordered, track)
    set_nodelay(sock)
    return sock


def interleave(addresses: Sequence[Address]) -> list[Address]:
    """`addresses` (in the resolver's order of preference) with the families taking turns,
    the first address's family first; duplicates dropped."""
    if len(addresses) < 2:  # the usual case, an IP literal: nothing to order
        return list(addresses)
    by_family: dict[int, list[Address]] = {}
    for address in dict.fromkeys(addresses):
        by_family.setdefault(address[0], []).append(address)
    turns = itertools.zip_longest(*by_family.values())
    return [address for turn in turns for address in turn if address is not None]


def _attempt(address: Address, track: Callable[[socket.socket], None]) -> socket.socket:
    """One connection attempt; its socket is closed if it fails or is interrupted."""
    family, sockaddr = address
    sock = socket.socket(family, socket.SOCK_STREAM)
    track(sock)
    try:
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _race(ordered: list[Address], track: Callable[[socket.socket], None]) -> socket.socket:
    """connect_any() over several addresses: one greenlet per attempt, started in turn."""
    outcomes: Queue[tuple[int, socket.socket | None, OSError | None]] = Queue()
    opened: list[socket.socket] = []
    attempts: list[gevent.Greenlet] = []
    winner: socket.socket | None = None

    def keep(sock: socket.socket) -> None:
        opened.append(sock)
        track(sock)

    def attempt(index: int, address: Address) -> None:
        try:
            outcomes.put((index, _attempt(address, keep), None))
        except OSError as exc:  # closing its socket below ends a losing attempt this way
            outcomes.put((index, None, exc))

    error = OSError("no address to connect to")
    running = 0
    try:
        for index, address in enumerate(ordered):
            attempts.append(gevent.spawn(attempt, index, address))
            running += 1
            last = index == len(ordered) - 1
            deadline = time.monotonic() + ATTEMPT_DELAY
            while running:
                try:
                    done, sock, exc = outcomes.get(
                        timeout=None if last else max(deadline - time.monotonic(), 0.0))
                except Empty:
                    break  # its time alone is over: the next attempt starts beside it
                running -= 1
                if sock is not None:
                    winner = sock
                    return sock
                assert exc is not None
                error = exc
                if done == index and not last:
                    break  # the newest attempt failed: the next one need not wait
        raise error
    finally:
        gevent.killall(attempts, block=False)  # one not started yet never runs
        for sock in opened:
            if sock is not winner:
                sock.close()


def known_address(endpoint: Endpoint) -> Address | None:
    """Where the daemon is, if that takes no lookup: its unix path or IP literal."""
    if endpoint.unix_path:
        return (socket.AF_UNIX, endpoint.unix_path)
    family = _literal_family(endpoint.host)
    if family is None:
        return None
    # A numeric getaddrinfo looks nothing up; it keeps an IPv6 zone (fe80::1%eth0) as the
    # scope id, which a (host, port) pair given to a plain connect() would lose.
    info = _socket.getaddrinfo(endpoint.host, endpoint.port, family, _socket.SOCK_STREAM, 0,
                               _socket.AI_NUMERICHOST)
    return (family, info[0][4])


def resolve(host: str, port: int) -> list[Address]:
    """Where host:port is, in the resolver's order of preference.

    An IP literal needs no lookup (gevent resolves in a thread pool, which costs
    a fifth of a tunnel's setup on loopback).  Dials of one name at the same time
    share one lookup: a resolver that hangs then holds one thread of gevent's
    pool, however many tunnels wait for it (each gives up at its own bound).
    """
    family = _literal_family(host)
    if family is None:
        return [(info[0], info[4]) for info in _shared_lookup(host, port)]
    return [(family, (host, port))]


@functools.lru_cache(maxsize=256)
def _literal_family(host: str) -> int | None:
    """The address family of an IP literal, None for a name (remembered: each tunnel of
    a forwarder asks about the same daemon)."""
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        return None
    return int(socket.AF_INET6 if version == 6 else socket.AF_INET)


def _shared_lookup(host: str, port: int) -> list[Any]:
    """getaddrinfo for TCP, joining a lookup of the same name that is already under way
    in this hub (a hub's greenlets wait only on their own hub's objects)."""
    key = (gevent.get_hub(), host, port)
    pending = _lookups.get(key)
    if pending is None:
        pending = _lookups[key] = AsyncResult()
        gevent.spawn(_look_up, key, pending)
    infos, error = pending.get()
    if error is not None:
        raise error.with_traceback(None)  # one error for every waiter: no traceback piles up
    return list(infos)


def _look_up(key: tuple[Any, str, int], result: AsyncResult) -> None:
    """The lookup that `_shared_lookup` callers wait for; it runs to its end even when they
    all gave up, then makes way for the next."""
    _, host, port = key
    try:
        result.set((socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM), None))
    except OSError as exc:
        result.set(((), exc))
    except UnicodeError as exc:  # a name IDNA cannot encode ("a..b"): no such host
        result.set(((), socket.gaierror(socket.EAI_NONAME, f"invalid host name: {exc}")))
    finally:
        del _lookups[key]
