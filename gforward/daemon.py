"""The reference daemon: the server side of /vm/{name}/forward, for tests and trials.

It stands in for Slicer's daemon (the README's "Try it without Slicer"): it
checks the bearer token, dials the X-Inlets-Upstream target itself (there is
no VM), and runs the same Pump as the client, in the server role.  Importable:

    with gforward.daemon.start(token="t") as daemon:
        gforward.start(base_url=daemon.url, token="t", ...)
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote

import gevent
from gevent import socket, ssl

from . import dial
from .command import log_to_stderr, read_token_file, serve
from .errors import ForwardError, SpecError
from .listen import ListeningSocket
from .proto import handshake
from .proto.allow import address_targets, all_loopback, allowed, compile_pattern, normalise_path
from .proto.mapping import AddressMapping, parse_listen_address, parse_remote_target
from .proto.tunnel import Tunnel
from .pump import Pump
from .service import Connection, Door, Service
from .tls import RECV_SIZE, TLSChannel

HANDSHAKE_TIMEOUT = 10.0  # a client must finish TLS and its upgrade request in this time
DIAL_TIMEOUT = 10.0  # seconds for the upstream's name to resolve, and again for it to accept
_FORWARD_PATH = re.compile(r"(?:/.*)?/vm/([^/?]+)/forward")


@dataclass(frozen=True)
class Upstream:
    """An upstream as it will be dialled: a normalised unix path, or the addresses its
    host resolved to (once: these are dialled, with no second lookup in between)."""

    header: str  # the X-Inlets-Upstream value asked for
    unix_path: str = ""
    addresses: tuple[dial.Address, ...] = ()

    def remote_target(self) -> str:
        """The X-Inlets-Upstream value, as AddressMapping.remote_target() gives it."""
        return self.header

    def targets(self) -> list[str]:
        """What --allow patterns are matched against: "unix:/path", or "host:port" for
        each address (IPv6 in brackets, in its shortest form)."""
        if self.unix_path:
            return ["unix:" + self.unix_path]
        return address_targets(self.addresses)

    def is_local(self) -> bool:
        """The default policy: a unix path, or a host whose every address is loopback."""
        return bool(self.unix_path) or all_loopback(self.addresses)

    def dial(self, track: Callable[[socket.socket], None]) -> socket.socket:
        """A socket connected to the path or to one of the addresses that were checked."""
        if self.unix_path:
            return dial.connect("", 0, self.unix_path, track)
        return dial.connect_any(self.addresses, track)


def resolve_upstream(mapping: AddressMapping) -> Upstream:
    """The Upstream a parsed X-Inlets-Upstream value names; OSError if its host does not
    resolve (within DIAL_TIMEOUT)."""
    if mapping.remote_unix():
        return Upstream(mapping.raw_spec, unix_path=normalise_path(mapping.remote_unix_path))
    failure = OSError(f"no address for {mapping.remote_host} within {DIAL_TIMEOUT:g} s")
    with gevent.Timeout(DIAL_TIMEOUT, failure):
        addresses = dial.resolve(mapping.remote_host, mapping.remote_port)
    return Upstream(mapping.raw_spec, addresses=tuple(addresses))


class Daemon(Service):
    """Listeners that accept tunnels; `urls` (and `url`) say where they are."""

    def __init__(
        self,
        listen: Sequence[str] = ("127.0.0.1:0",),
        unix: Sequence[str] = (),
        *,
        token: str = "",
        tls_cert: str | None = None,
        tls_key: str | None = None,
        allow: Sequence[str] = (),  # patterns, see proto.allow
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(logger or logging.getLogger("gforward.daemon"))
        self._token = token
        self._allow = [compile_pattern(pattern) for pattern in allow]
        self._tls: ssl.SSLContext | None = None
        if tls_cert:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(tls_cert, tls_key)
        mappings = [parse_listen_address(address) for address in listen]
        mappings += [AddressMapping("", listen_unix_path=path) for path in unix]
        if not mappings:
            raise ValueError("nothing to listen on: give a TCP address or a unix path")
        self._open(mappings)

    @property
    def urls(self) -> list[str]:
        """Each listener's base URL, in the order given (TCP first, then unix)."""
        return [door.context for door in list(self._doors)]

    @property
    def url(self) -> str:
        """The first listener's base URL, to hand to gforward.start()."""
        return self.urls[0]

    def _prepare(self, mapping: AddressMapping, bound: ListeningSocket) -> str:
        if mapping.listen_unix():
            return f"unix://{bound.address}"
        return f"{'https' if self._tls else 'http'}://{bound.address}"

    def _handle(self, door: Door, client: socket.socket, address: Any) -> None:
        """The life of one tunnel: TLS, upgrade, check, dial the upstream, hand over to a pump."""
        connection = Connection(door, client)
        dial.set_nodelay(client)
        stream: dial.Stream = client
        try:
            with gevent.Timeout(HANDSHAKE_TIMEOUT, ForwardError("no upgrade request in time")):
                if self._tls is not None:
                    stream = TLSChannel(client, self._tls, server_side=True)
                    try:
                        stream.handshake()
                    except (ForwardError, OSError) as exc:  # no TLS: no HTTP answer either
                        self._log.info("client %s: TLS handshake failed: %s", address, exc)
                        self._drop(connection, stream)
                        return
                server = handshake.ServerHandshake()
                request = None
                while request is None:
                    request = server.receive(stream.recv(RECV_SIZE))
        except (ForwardError, OSError) as exc:
            self._log.info("client %s: %s", address, exc)
            self._drop(connection, stream, handshake.rejection(400, str(exc)))
            return
        status, detail, upstream = self._authorize(request)
        if upstream is not None:
            try:
                with gevent.Timeout(DIAL_TIMEOUT, ForwardError("timed out")):
                    plain = upstream.dial(connection.add)
            except (ForwardError, OSError) as exc:
                status, detail = 502, f"cannot dial {upstream.remote_target()}: {exc}"
        if status != 101:
            self._log.info("refused %s: %d %s", address, status, detail)
            self._drop(connection, stream, handshake.rejection(status, detail))
            return
        try:
            stream.sendall(server.accept())
        except OSError:
            plain.close()
            self._drop(connection, stream)
            return

        def ended(pump: Pump) -> None:
            self._log_soon(logging.ERROR if pump.exception else logging.DEBUG,
                           "tunnel to %s closed (%d bytes up, %d down): %s", detail,
                           pump.tunnel.received, pump.tunnel.sent, pump.tunnel.outcome,
                           exc_info=pump.exception)

        tunnel = Tunnel(client=False, now=time.monotonic())
        pump = dial.open_pump(plain, stream, tunnel, ended, (door.counters, self.counters))
        connection.open(pump)
        pump.start(request.trailing)

    @staticmethod
    def _drop(connection: Connection, stream: Any, answer: bytes = b"") -> None:
        """End a connection that never became a tunnel, with a last answer if any."""
        if answer:
            with contextlib.suppress(OSError):  # the client may already be gone
                stream.sendall(answer)
        stream.close()
        connection.done()

    def _authorize(self, request: handshake.UpgradeRequest) -> tuple[int, str, Upstream | None]:
        """Status, reason and upstream for one upgrade request (looked up only once the
        token is right)."""
        match = _FORWARD_PATH.fullmatch(request.target.split("?", 1)[0])
        if match is None:
            return 404, f"no such endpoint {request.target!r}", None
        given = request.headers.get("authorization", "").encode()
        if self._token and not hmac.compare_digest(given, f"Bearer {self._token}".encode()):
            return 401, "missing or wrong bearer token", None
        target = request.headers.get("x-inlets-upstream", "")
        try:
            upstream = resolve_upstream(parse_remote_target(target))
        except SpecError as exc:
            return 400, str(exc), None
        except OSError as exc:  # a name with no address can match nothing
            return 403, f"upstream {target!r} is not allowed: {exc}", None
        if not self._allowed(upstream):
            dialled = ", ".join(upstream.targets())
            shown = "" if dialled == target else f" ({dialled})"
            return 403, f"upstream {target!r}{shown} is not allowed", None
        return 101, f"{upstream.remote_target()} for vm {unquote(match.group(1))}", upstream

    def _allowed(self, upstream: Upstream) -> bool:
        if self._allow:
            return allowed(upstream.targets(), self._allow)
        return upstream.is_local()


def start(
    listen: Sequence[str] = ("127.0.0.1:0",), unix: Sequence[str] = (), **options: Any
) -> Daemon:
    """Start a daemon (in this hub, or a thread of its own in a plain process)."""
    return Daemon(listen, unix, **options)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m gforward.daemon`: serve until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m gforward.daemon",
                                     description="Reference daemon for gforward.")
    parser.add_argument("--listen", action="append", default=[], metavar="HOST:PORT",
                        help="TCP address to serve on (port 0 picks a free one); repeatable")
    parser.add_argument("--unix", action="append", default=[], metavar="PATH",
                        help="unix socket to serve on; repeatable")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token", default="", help="bearer token clients must send")
    auth.add_argument("--token-file", metavar="F", help="read the token from a file")
    parser.add_argument("--tls-cert", metavar="C", help="serve TLS with this certificate chain")
    parser.add_argument("--tls-key", metavar="K", help="the certificate's private key")
    parser.add_argument("--allow", action="append", default=[], metavar="PATTERN",
                        help="allowed upstreams, with * and ? as wildcards, e.g. '127.0.0.1:*', "
                             "'[::1]:80', 'unix:/run/*' (default: loopback and unix paths); "
                             "a name is allowed when every address it resolves to is")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every tunnel")
    args = parser.parse_args(argv)
    if not args.listen and not args.unix:
        parser.error("give --listen HOST:PORT and/or --unix PATH")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        token = read_token_file(args.token_file) if args.token_file else args.token
        for address in args.listen:
            parse_listen_address(address)  # a bad one is a usage error, before anything binds
        for pattern in args.allow:
            compile_pattern(pattern)  # likewise
    except ValueError as exc:
        parser.error(str(exc))
    log_to_stderr("gforward.daemon", args.verbose)

    def launch() -> Daemon:
        return Daemon(args.listen, args.unix, token=token, tls_cert=args.tls_cert,
                      tls_key=args.tls_key, allow=args.allow)

    def announce(daemon: Daemon) -> None:
        for url in daemon.urls:
            print(f"listening on {url}", flush=True)

    try:
        return serve(launch, announce)
    except (ForwardError, ValueError) as exc:
        print(f"gforward.daemon: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
