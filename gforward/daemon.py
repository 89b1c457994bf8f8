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
import ipaddress
import logging
import posixpath
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote

import gevent
from gevent import socket, ssl

from . import dial, handshake
from .credentials import read_token_file
from .errors import ForwardError, SpecError
from .listen import ListeningSocket, listen_tcp, listen_unix
from .mapping import AddressMapping, join_host_port, parse_address_mapping, parse_remote_target
from .pump import Pump, open_pump
from .service import Binder, Connection, Service, serve_until_signalled
from .tls import TLSChannel
from .tunnel import Tunnel

HANDSHAKE_TIMEOUT = 10.0  # a client must finish TLS and its upgrade request in this time
DIAL_TIMEOUT = 10.0  # seconds for the upstream's name to resolve, and again for it to accept
_FORWARD_PATH = re.compile(r"(?:/.*)?/vm/([^/?]+)/forward")
# The host of an --allow pattern: IP address characters and wildcards (a scope after %).
_PATTERN_HOST = re.compile(r"[0-9A-Fa-f.:*?]+(?:%.*)?")


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
        return [join_host_port(_canonical_ip(sockaddr[0]), sockaddr[1])
                for _, sockaddr in self.addresses]

    def is_local(self) -> bool:
        """The default policy: a unix path, or a host whose every address is loopback."""
        if self.unix_path:
            return True
        return bool(self.addresses) and all(
            ipaddress.ip_address(sockaddr[0]).is_loopback for _, sockaddr in self.addresses)

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


def normalise_path(path: str) -> str:
    """An absolute path without "." or ".." parts or repeated slashes, as the kernel reads
    it, so that no ".." leads out of a pattern's directory.  Lexical: a symbolic link
    is followed when dialled, as with any path."""
    return "/" + posixpath.normpath(path).lstrip("/")


def _canonical_ip(text: str) -> str:
    """An IP address in its one usual spelling (IPv6 shortest, lower case); else `text`."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """An --allow pattern as a regular expression for `fullmatch`.

    `*` and `?` are the only wildcards: `[` and `]` are literal, since they bracket
    IPv6 addresses.  A literal address is put in its usual spelling and a unix path
    normalised, as the targets are.  A host that cannot be an address (a name) is a
    ValueError: names match only through the addresses they resolve to.
    """
    if pattern.startswith("unix:"):
        normalised = "unix:" + normalise_path(pattern[len("unix:"):])
    elif pattern == "*":
        normalised = pattern
    else:
        host, colon, port = pattern.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        bare = host[1:-1] if bracketed else host
        if not colon or not _PATTERN_HOST.fullmatch(bare):
            raise ValueError(f"--allow pattern {pattern!r}: expected ADDRESS:PORT, [IPV6]:PORT, "
                             "unix:/PATH or *; names are matched through their addresses, "
                             "so a pattern names addresses")
        address = _canonical_ip(bare)
        bracketed = bracketed or ":" in address
        normalised = f"[{address}]:{port}" if bracketed else f"{address}:{port}"
    wildcards = {"*": ".*", "?": "."}
    return re.compile("".join(wildcards.get(c) or re.escape(c) for c in normalised), re.DOTALL)


def allowed(targets: Sequence[str], patterns: Sequence[re.Pattern[str]]) -> bool:
    """Whether every target (every address a name resolved to) matches some pattern."""
    return bool(targets) and all(any(p.fullmatch(t) for p in patterns) for t in targets)


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
        allow: Sequence[str] = (),
        logger: logging.Logger | None = None,
    ) -> None:
        super().__init__(logger or logging.getLogger("gforward.daemon"))
        self._token = token
        self._allow = [compile_pattern(pattern) for pattern in allow]
        self._tls: ssl.SSLContext | None = None
        if tls_cert:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(tls_cert, tls_key)
        self.urls: list[str] = []
        binders = [self._binder(_listen_address(a)) for a in listen]
        binders += [self._binder(AddressMapping("", listen_unix_path=p)) for p in unix]
        if not binders:
            raise ValueError("nothing to listen on: give a TCP address or a unix path")
        self._open(binders)

    @property
    def url(self) -> str:
        """The first listener's base URL, to hand to gforward.start()."""
        return self.urls[0]

    def _binder(self, where: AddressMapping) -> Binder:
        def bind() -> tuple[ListeningSocket, Any]:
            if where.listen_unix():
                bound = listen_unix(where.listen_unix_path)
                self.urls.append(f"unix://{bound.address}")
            else:
                bound = listen_tcp(where.listen_addr, where.listen_port)
                self.urls.append(f"{'https' if self._tls else 'http'}://{bound.address}")
            return bound, self._serve_connection

        return bind

    def _serve_connection(self, client: socket.socket, address: Any) -> None:
        """The life of one tunnel: TLS, upgrade, check, dial the upstream, hand over to a pump."""
        connection = Connection(self._connections, client)
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
                    request = server.receive(stream.recv(dial.RECV_SIZE))
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
            connection.done()
            self._log_soon(logging.ERROR if pump.exception else logging.DEBUG,
                           "tunnel to %s closed (%d bytes up, %d down): %s", detail,
                           pump.tunnel.received, pump.tunnel.sent, pump.tunnel.outcome,
                           exc_info=pump.exception)

        pump = open_pump(plain, stream, Tunnel(client=False), ended)
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


def _listen_address(text: str) -> AddressMapping:
    """HOST:PORT (or [V6]:PORT) for --listen, parsed as a spec's listen side."""
    try:
        mapping = parse_address_mapping(f"{text}:127.0.0.1:1")
    except SpecError:
        mapping = AddressMapping(text)
    if mapping.listen_unix() or not mapping.listen_addr:
        raise SpecError(f"invalid listen address {text!r}: expected HOST:PORT (--unix for paths)")
    return mapping


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
            _listen_address(address)  # a bad one is a usage error, before anything binds
        for pattern in args.allow:
            compile_pattern(pattern)  # likewise
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s", stream=sys.stderr)

    def launch() -> Daemon:
        return Daemon(args.listen, args.unix, token=token, tls_cert=args.tls_cert,
                      tls_key=args.tls_key, allow=args.allow)

    def announce(daemon: Daemon) -> None:
        for url in daemon.urls:
            print(f"listening on {url}", flush=True)

    try:
        serve_until_signalled(launch, announce)
    except (ForwardError, ValueError) as exc:
        print(f"gforward.daemon: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
