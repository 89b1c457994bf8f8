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
import fnmatch
import hmac
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

import gevent
from gevent import socket, ssl

from . import dial, handshake
from .credentials import read_token_file
from .errors import ForwardError, SpecError
from .listen import ListeningSocket, listen_tcp, listen_unix
from .mapping import (
    AddressMapping,
    is_loopback_host,
    parse_address_mapping,
    parse_remote_target,
)
from .pump import Pump
from .service import Binder, Connection, Service, serve_until_signalled

HANDSHAKE_TIMEOUT = 10.0  # a client must finish TLS and its upgrade request in this time
DIAL_TIMEOUT = 10.0  # the upstream must accept within this time
_FORWARD_PATH = re.compile(r"(?:/.*)?/vm/([^/?]+)/forward")


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
        self._allow = list(allow)
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
        """The life of one tunnel: upgrade, check, dial the upstream, pump."""
        with Connection(self._connections, client) as connection:
            dial.set_nodelay(client)
            try:
                with gevent.Timeout(HANDSHAKE_TIMEOUT, ForwardError("no upgrade request in time")):
                    if self._tls is not None:
                        client = self._tls.wrap_socket(client, server_side=True)
                        connection.add(client)
                    server = handshake.ServerHandshake()
                    request = None
                    while request is None:
                        request = server.receive(client.recv(dial.RECV_SIZE))
            except (ForwardError, OSError) as exc:
                self._log.info("client %s: %s", address, exc)
                _answer(client, handshake.rejection(400, str(exc)))
                return
            status, detail, upstream = self._authorize(request)
            if upstream is not None:
                try:
                    with gevent.Timeout(DIAL_TIMEOUT, ForwardError("timed out")):
                        plain = dial.connect(upstream.remote_host, upstream.remote_port,
                                             upstream.remote_unix_path, connection.add)
                except (ForwardError, OSError) as exc:
                    status, detail = 502, f"cannot dial {upstream.remote_target()}: {exc}"
            if status != 101:
                self._log.info("refused %s: %d %s", address, status, detail)
                _answer(client, handshake.rejection(status, detail))
                return
            try:
                client.sendall(server.accept())
            except OSError:
                plain.close()
                client.close()
                return
            pump = Pump(plain, client, client=False, trailing=request.trailing)
            pump.run()
            self._log.debug("tunnel to %s closed (%d bytes up, %d down): %s",
                            detail, pump.received, pump.sent, pump.reason)

    def _authorize(
        self, request: handshake.UpgradeRequest
    ) -> tuple[int, str, AddressMapping | None]:
        """Status, reason and upstream for one upgrade request."""
        match = _FORWARD_PATH.fullmatch(request.target.split("?", 1)[0])
        if match is None:
            return 404, f"no such endpoint {request.target!r}", None
        given = request.headers.get("authorization", "").encode()
        if self._token and not hmac.compare_digest(given, f"Bearer {self._token}".encode()):
            return 401, "missing or wrong bearer token", None
        target = request.headers.get("x-inlets-upstream", "")
        try:
            upstream = parse_remote_target(target)
        except SpecError as exc:
            return 400, str(exc), None
        if not self._allowed(upstream):
            return 403, f"upstream {target!r} is not allowed", None
        return 101, f"{upstream.remote_target()} for vm {unquote(match.group(1))}", upstream

    def _allowed(self, upstream: AddressMapping) -> bool:
        if self._allow:
            target = upstream.remote_target()
            return any(fnmatch.fnmatchcase(target, pattern) for pattern in self._allow)
        return upstream.remote_unix() or is_loopback_host(upstream.remote_host)


def _listen_address(text: str) -> AddressMapping:
    """HOST:PORT (or [V6]:PORT) for --listen, parsed as a spec's listen side."""
    try:
        mapping = parse_address_mapping(f"{text}:127.0.0.1:1")
    except SpecError:
        mapping = AddressMapping(text)
    if mapping.listen_unix() or not mapping.listen_addr:
        raise SpecError(f"invalid listen address {text!r}: expected HOST:PORT (--unix for paths)")
    return mapping


def _answer(sock: socket.socket, response: bytes) -> None:
    """Send a refusal, best effort: the client may already be gone."""
    with contextlib.suppress(OSError):
        sock.sendall(response)


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
                        help="glob of allowed upstreams, e.g. '127.0.0.1:*' (default: loopback"
                             " and unix paths)")
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
