"""`start()` and the Forwarder: listeners, and the life of one local connection.

Each accepted connection gets its own WebSocket to the daemon, as the Go
package does (forward-package-doc.txt, "Overview"); `_serve_connection`
below is that whole life, top to bottom: dial, upgrade, pump, log.
"""

from __future__ import annotations

import dataclasses
import logging
import socket as stdlib_socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gevent import socket, ssl

from . import dial, handshake
from ._version import __version__
from .endpoint import Endpoint, parse_base_url
from .errors import ForwardError
from .listen import ListeningSocket, listen_tcp, listen_unix
from .mapping import AddressMapping, parse_address_mapping
from .pump import Pump
from .service import Binder, Connection, Service


@dataclass
class Options:
    """What to forward where; the fields of the Go package's Options."""

    base_url: str
    vm_name: str
    specs: list[str]
    token: str = ""
    client_id: str | None = None  # default: socket.gethostname()
    user_agent: str | None = None  # default: gforward/<version>
    dial_timeout: float = 10.0  # seconds, bounds connect + TLS + upgrade
    logger: logging.Logger | None = None  # default: logging.getLogger("gforward")


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
    tls: ssl.SSLContext | None

    def handshake(self, upstream: str) -> handshake.ClientHandshake:
        """A fresh upgrade request (fresh Sec-WebSocket-Key) for one tunnel."""
        return handshake.ClientHandshake(
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
        self.listeners: list[Listener] = []
        self._open([self._binder(m) for m in mappings], name=f"gforward {options.vm_name}")

    def _binder(self, mapping: AddressMapping) -> Binder:
        """Binds one mapping's listener and records it (run in the hub)."""

        def bind() -> tuple[ListeningSocket, Any]:
            if mapping.listen_unix():
                bound = listen_unix(mapping.listen_unix_path)
            else:
                bound = listen_tcp(mapping.listen_addr, mapping.listen_port)
            listener = Listener(mapping.raw_spec, bound.address, mapping.remote_target(),
                                bound.port)
            self.listeners.append(listener)
            self._log.info("listening on %s -> vm %s %s", listener.local,
                           self._settings.vm_name, listener.remote)

            def handle(local: socket.socket, address: Any) -> None:
                self._serve_connection(listener, local, address)

            return bound, handle

        return bind

    def _serve_connection(self, listener: Listener, local: socket.socket, address: Any) -> None:
        """The life of one local connection: dial, upgrade, pump, then log the outcome."""
        settings = self._settings
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else listener.local
        name = f"{peer} -> {listener.remote}"
        with self._track(Connection(local)) as connection:
            dial.set_nodelay(local)
            try:
                ws, trailing = dial.open_websocket(
                    settings.endpoint,
                    settings.handshake(listener.remote),
                    timeout=settings.dial_timeout,
                    tls=settings.tls,
                    track=connection.add,
                )
            except (ForwardError, OSError) as exc:
                if not connection.aborted:
                    self._log.warning("tunnel %s failed: %s", name, exc)
                local.close()
                return
            self._log.debug("tunnel %s opened", name)
            pump = Pump(local, ws, client=True, trailing=trailing)
            pump.run()
            reason = "forwarder closed" if connection.aborted else pump.reason
            level = logging.WARNING if pump.failed and not connection.aborted else logging.DEBUG
            self._log.log(level, "tunnel %s closed (%d bytes up, %d down): %s",
                          name, pump.sent, pump.received, reason)


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
    mappings = [parse_address_mapping(spec) for spec in options.specs]
    endpoint = parse_base_url(options.base_url)
    settings = _Settings(
        endpoint=endpoint,
        vm_name=options.vm_name,
        token=options.token,
        client_id=options.client_id or stdlib_socket.gethostname(),
        user_agent=options.user_agent or f"gforward/{__version__}",
        dial_timeout=options.dial_timeout,
        tls=dial.tls_context() if endpoint.tls else None,
    )
    try:
        settings.handshake(mappings[0].remote_target())
    except Exception:  # h11 refuses CR, LF and the like; its message may hold the token
        raise ValueError("token, client_id or user_agent is not a valid HTTP header value"
                         ) from None
    return mappings, settings
