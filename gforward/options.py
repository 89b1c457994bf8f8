"""Options: what a forwarder is asked to do, checked and resolved once for all its tunnels.

Everything that can be wrong with them is found here, before anything is bound.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import tls
from ._version import __version__
from .proto import handshake
from .proto.endpoint import Endpoint, parse_base_url
from .proto.mapping import AddressMapping, parse_address_mapping
from .proto.proxy import ConnectHandshake, Proxy, select_proxy

ISOLATIONS = ("thread", "process")


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
    ssl_context: ssl.SSLContext | None = None  # full control, used as given
    ca_file: str | None = None  # trust only these CAs (PEM file or hashed directory)
    insecure: bool = False  # no certificate or host-name check; warns at each start()
    # HTTP proxy for http(s):// daemons: None reads HTTPS_PROXY/HTTP_PROXY/NO_PROXY,
    # "" means none, "http://[user:password@]host:port" is used whatever the environment says.
    proxy: str | None = field(default=None, repr=False)  # may hold a password
    # Where the tunnels run: "thread" (a hub thread of this process, or the app's own hub
    # when gevent patched it) or "process" (a helper process, out of reach of the app's GIL).
    isolation: str = "thread"


@dataclass(frozen=True)
class Settings:
    """Options checked and resolved once, shared by every tunnel."""

    endpoint: Endpoint
    vm_name: str
    token: str = field(repr=False)
    client_id: str
    user_agent: str
    dial_timeout: float
    ping_interval: float
    ping_timeout: float
    tls: ssl.SSLContext | None
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


def settle(options: Options) -> tuple[list[AddressMapping], Settings]:
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
    if options.isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {', '.join(ISOLATIONS)}, "
                         f"not {options.isolation!r}")
    if options.ping_interval > 0 and not options.ping_timeout > 0:
        raise ValueError("ping_timeout must be positive when ping_interval is")
    mappings = [parse_address_mapping(spec) for spec in options.specs]
    endpoint = parse_base_url(options.base_url)
    settings = Settings(
        endpoint=endpoint,
        vm_name=options.vm_name,
        token=options.token,
        client_id=options.client_id or socket.gethostname(),
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


def _tls(options: Options, endpoint: Endpoint) -> ssl.SSLContext | None:
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
