"""`start()` and the Forwarder: listeners, and the life of one local connection.

Each accepted connection gets its own WebSocket to the daemon, as the Go
`forward` package does; `_serve_connection` below is that whole life, top to
bottom: dial, upgrade, pump, log.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket as stdlib_socket
import ssl as stdlib_ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gevent import socket

from . import dial, handshake, tls
from ._version import __version__
from .endpoint import Endpoint, parse_base_url
from .errors import ForwardError
from .listen import ListeningSocket, listen_tcp, listen_unix
from .mapping import AddressMapping, join_host_port, parse_address_mapping
from .proxy import ConnectHandshake, Proxy, select_proxy
from .pump import Pump, open_pump
from .service import Binder, Connection, Service
from .tunnel import Tunnel

# Logged once per listener that binds every interface (the command line prints its own line).
WILDCARD_WARNING = ("listening on all interfaces (%s): anyone who can reach this machine can "
                    "reach vm %s; prefix the spec with 127.0.0.1: to keep it local")


@dataclass
class Options:
    """What to forward where; the fields of the Go package's Options."""

    base_url: str
    vm_name: str
    specs: list[str]
    token: str = field(default="", repr=False)  # never shown, never logged
    client_id: str | None = None  # default: socket.gethostname()
    user_agent: str | None = None  # default: gforward/<version>
    dial_timeout: float = 10.0  # seconds, bounds proxy + connect + TLS + upgrade
    ping_interval: float = 30.0  # seconds of silence from the daemon before a Ping; 0: never
    ping_timeout: float = 10.0  # seconds more without a byte before the tunnel is cut
    logger: logging.Logger | None = None  # default: logging.getLogger("gforward")
    # TLS, for https:// daemons (ignored otherwise); at most one of the three:
    ssl_context: stdlib_ssl.SSLContext | None = None  # full control, used as given
    ca_file: str | None = None  # trust only these CAs (PEM file or hashed directory)
    insecure: bool = False  # no certificate or host-name check; warns at each start()
    # HTTP proxy for http(s):// daemons: None reads HTTPS_PROXY/HTTP_PROXY/NO_PROXY,
    # "" means none, "http://[user:password@]host:port" is used whatever the environment says.
    proxy: str | None = field(default=None, repr=False)  # may hold a password


@dataclass(frozen=True)
class Listener:
    """One bound local listener."""

    spec: str
    local: str  # "127.0.0.1:50306" or "/tmp/docker.sock"
    remote: str  # the X-Inlets-Upstream value
    port: int  # resolved TCP port; 0 for unix listeners


@dataclass(frozen=True)
class _Settings:
    """Options checked and resolved once, shared by every tunnel."""

    endpoint: Endpoint
    vm_name: str
    token: str = field(repr=False)
    client_id: str
    user_agent: str
    dial_timeout: float
    ping_interval: float
    ping_timeout: float
    tls: stdlib_ssl.SSLContext | None
    proxy: Proxy | None

    def redact(self, text: str) -> str:
        """`text` with every secret starred out: a daemon or proxy may echo our headers
        back in a refusal's body, and that body goes to the log."""
        secrets = [self.token]
        if self.proxy is not None:
            credentials = self.proxy.authorization()  # "Basic <base64>"
            secrets += [self.proxy.password, credentials.split()[-1] if credentials else ""]
        for secret in filter(None, secrets):
            text = text.replace(secret, "***")
        return text

    def proxy_handshake(self) -> ConnectHandshake | None:
        """A fresh CONNECT exchange for one tunnel, when a proxy is in the way."""
        if self.proxy is None:
            return None
        return ConnectHandshake(self.proxy, self.endpoint.host, self.endpoint.port,
                                      self.user_agent)

    def upgrade(self, upstream: str) -> handshake.Upgrade:
        """The upgrade request of every tunnel to `upstream` (one listener's)."""
        return handshake.Upgrade(
            host=self.endpoint.host_header,
            target=self.endpoint.request_target(self.vm_name),
            headers=handshake.upgrade_headers(
                token=self.token,
                client_id=self.client_id,
                upstream=upstream,
                user_agent=self.user_agent,
            ),
        )


class Forwarder(Service):
    """Bound listeners and their tunnels; close() from any thread or greenlet."""

    def __init__(self, options: Options) -> None:
        mappings, self._settings = _check(options)
        super().__init__(options.logger or logging.getLogger("gforward"))
        endpoint = self._settings.endpoint
        if options.insecure and endpoint.tls:
            self._log.warning("TLS verification is off (insecure=True): the certificate of %s "
                              "is not checked, so anyone on the way can read the token and "
                              "the tunnels", endpoint.describe())
        if self._settings.proxy is not None:
            self._log.info("reaching %s through proxy %s", endpoint.describe(),
                           self._settings.proxy.describe())
        self.listeners: list[Listener] = []
        self._open([self._binder(m) for m in mappings])

    def _binder(self, mapping: AddressMapping) -> Binder:
        """Binds one mapping's listener and records it (run in the hub)."""

        def bind() -> tuple[ListeningSocket, Any]:
            if mapping.listen_unix():
                bound = listen_unix(mapping.listen_unix_path)
            else:
                bound = listen_tcp(mapping.listen_addr, mapping.listen_port)
            listener = Listener(mapping.raw_spec, bound.address, mapping.remote_target(),
                                bound.port)
            upgrade = self._settings.upgrade(listener.remote)
            self.listeners.append(listener)
            self._log.info("listening on %s -> vm %s %s", listener.local,
                           self._settings.vm_name, listener.remote)
            if mapping.listens_everywhere():
                self._log.warning(WILDCARD_WARNING, listener.local, self._settings.vm_name)

            def handle(local: socket.socket, address: Any) -> None:
                self._serve_connection(listener, upgrade, local, address)

            return bound, handle

        return bind

    def _serve_connection(self, listener: Listener, upgrade: handshake.Upgrade,
                          local: socket.socket, address: Any) -> None:
        """The life of one local connection: dial, upgrade, hand over to a pump, which
        logs the outcome when the tunnel is over."""
        settings = self._settings
        connection = Connection(self._connections, local)
        dial.set_nodelay(local)
        try:
            stream, trailing = dial.open_websocket(
                settings.endpoint,
                upgrade.handshake(),
                timeout=settings.dial_timeout,
                tls=settings.tls,
                track=connection.add,
                proxy=settings.proxy_handshake(),
            )
        except (ForwardError, OSError) as exc:
            if not connection.aborted:
                self._log.warning("tunnel %s failed: %s", _TunnelName(listener, address),
                                  settings.redact(str(exc)))
            local.close()
            connection.done()
            return
        self._log.debug("tunnel %s opened", _TunnelName(listener, address))
        tunnel = Tunnel(client=True, ping_interval=settings.ping_interval,
                        ping_timeout=settings.ping_timeout, now=time.monotonic())

        def ended(pump: Pump) -> None:
            connection.done()
            failed = pump.tunnel.failed and not connection.aborted
            self._log_soon(logging.ERROR if pump.exception else
                           logging.WARNING if failed else logging.DEBUG,
                           "tunnel %s closed (%d bytes up, %d down): %s",
                           _TunnelName(listener, address), pump.tunnel.sent,
                           pump.tunnel.received, pump.tunnel.outcome, exc_info=pump.exception)

        pump = open_pump(local, stream, tunnel, ended)
        connection.open(pump)
        pump.start(trailing)


class _TunnelName:
    """"127.0.0.1:50312 -> 127.0.0.1:80" for the log, spelled out only if a line is written."""

    __slots__ = ("address", "listener")

    def __init__(self, listener: Listener, address: Any) -> None:
        self.listener = listener
        self.address = address

    def __str__(self) -> str:
        address, listener = self.address, self.listener
        peer = join_host_port(*address[:2]) if isinstance(address, tuple) else listener.local
        return f"{peer} -> {listener.remote}"


def start(options: Options | None = None, /, **fields: Any) -> Forwarder:
    """Parse every spec, bind every listener, start accepting, and return.

    Accepts an Options, keyword fields, or both (keywords override).
    """
    if options is None:
        options = Options(**fields)
    elif fields:
        options = dataclasses.replace(options, **fields)
    return Forwarder(options)


def _check(options: Options) -> tuple[list[AddressMapping], _Settings]:
    """Everything that can be wrong with Options, found before anything is bound."""
    specs: object = options.specs  # callers without type checking pass a str by mistake
    if isinstance(specs, str) or not isinstance(specs, Sequence):
        raise ValueError("specs must be a list of spec strings, e.g. ['8080:127.0.0.1:80']")
    if not options.specs:
        raise ValueError("no specs given: nothing to forward")
    if not options.vm_name:
        raise ValueError("vm_name is empty")
    if not options.dial_timeout > 0:
        raise ValueError(f"dial_timeout must be positive, not {options.dial_timeout!r}")
    for name in ("ping_interval", "ping_timeout"):
        if not getattr(options, name) >= 0:
            raise ValueError(f"{name} must be 0 (off) or positive, not {getattr(options, name)!r}")
    if options.ping_interval > 0 and not options.ping_timeout > 0:
        raise ValueError("ping_timeout must be positive when ping_interval is")
    mappings = [parse_address_mapping(spec) for spec in options.specs]
    endpoint = parse_base_url(options.base_url)
    settings = _Settings(
        endpoint=endpoint,
        vm_name=options.vm_name,
        token=options.token,
        client_id=options.client_id or stdlib_socket.gethostname(),
        user_agent=options.user_agent or f"gforward/{__version__}",
        dial_timeout=options.dial_timeout,
        ping_interval=options.ping_interval,
        ping_timeout=options.ping_timeout,
        tls=_tls(options, endpoint),
        proxy=select_proxy(endpoint.scheme, endpoint.host, endpoint.port,
                           explicit=options.proxy, environ=os.environ),
    )
    try:
        settings.upgrade(mappings[0].remote_target())
    except Exception:  # h11 refuses CR, LF and the like; its message may hold the token
        raise ValueError("token, client_id or user_agent is not a valid HTTP header value"
                         ) from None
    return mappings, settings


def _tls(options: Options, endpoint: Endpoint) -> stdlib_ssl.SSLContext | None:
    """The one TLS context of every tunnel, from ssl_context, ca_file or insecure."""
    chosen = [name for name, value in (("ssl_context", options.ssl_context is not None),
                                       ("ca_file", bool(options.ca_file)),
                                       ("insecure", options.insecure)) if value]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} exclude each other: ssl_context is full "
                         "control, ca_file trusts a CA, insecure trusts anything")
    if not endpoint.tls:
        return None
    if options.ssl_context is not None:
        tls.check_context(options.ssl_context)
        return options.ssl_context
    try:
        return tls.client_context(ca_file=options.ca_file, insecure=options.insecure)
    except OSError as exc:  # ssl.SSLError included: a file that holds no certificate
        raise ValueError(f"cannot load ca_file {options.ca_file!r}: {exc}") from exc
