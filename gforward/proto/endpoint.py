"""Turn ``Options.base_url`` into where the daemon is and how to address it.

Pure parsing, so bad URLs fail in ``start()`` before anything is bound rather
than on the first accepted connection.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from .mapping import is_local_path, resolve_local_path

__all__ = ["Endpoint", "mask_userinfo", "parse_base_url", "split_host_port"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_RE = re.compile(r"[A-Za-z0-9._-]+")
# user:password@ in an http(s) URL; masked so error messages never echo a password.
_USERINFO_RE = re.compile(r"(?<=://)[^/?#]*@")


@dataclass(frozen=True)
class Endpoint:
    """The daemon's address plus the pieces of the upgrade request that depend on it."""

    scheme: str
    host: str
    port: int
    unix_path: str
    prefix: str

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def host_header(self) -> str:
        """``Host`` value; a unix socket has no host name, so ``localhost`` as Go sends."""
        if self.scheme == "unix":
            return "localhost"
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.port == _DEFAULT_PORTS[self.scheme]:
            return host
        return f"{host}:{self.port}"

    def request_target(self, vm_name: str) -> str:
        """Path of the upgrade request; the VM name is one path segment whatever it holds."""
        if not vm_name:
            raise ValueError("vm_name is empty")
        return f"{self.prefix}/vm/{quote(vm_name, safe='')}/forward"

    def describe(self) -> str:
        """Where the daemon is, for logs; the URL never carries credentials."""
        if self.scheme == "unix":
            return "unix:" + self.unix_path
        return f"{self.scheme}://{self.host_header}{self.prefix}"


def parse_base_url(base_url: str) -> Endpoint:
    """Parse ``http(s)://host[:port][/prefix]``, ``unix:///path`` or a socket path.

    Raises ValueError quoting ``base_url`` (any user:password masked) when it is unusable.
    """
    try:
        return _parse(base_url)
    except ValueError as exc:
        raise ValueError(f"invalid base URL {mask_userinfo(base_url)!r}: {exc}") from None


def mask_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` after ``scheme://`` shown as ``***@``, for messages."""
    return _USERINFO_RE.sub("***@", url, count=1)


def _parse(url: str) -> Endpoint:
    if not url:
        raise ValueError("empty")
    if url != url.strip():
        raise ValueError("leading or trailing whitespace")
    if is_local_path(url):
        return _unix(url)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ValueError("contains control characters")
    parts = urlsplit(url)
    if "?" in url or "#" in url:
        raise ValueError("a query or fragment is not allowed")
    if parts.scheme == "unix":
        if parts.netloc:
            raise ValueError("a unix: URL takes no host; write unix:///absolute/path")
        path = unquote(parts.path, errors="strict")
        if not path.startswith("/"):
            raise ValueError("a unix: URL needs an absolute path")
        return _unix(path)
    if not parts.scheme and url.endswith(".sock"):
        return _unix(url)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError("expected http://, https://, unix:///path or a socket path")
    if not all(0x21 <= ord(c) <= 0x7E for c in url):
        raise ValueError("an http(s) URL must be ASCII without spaces")
    if "@" in parts.netloc:
        raise ValueError("credentials do not belong in the URL; pass them as the token")
    host, port = split_host_port(parts.netloc, _DEFAULT_PORTS[parts.scheme])
    return Endpoint(parts.scheme, host, port, "", parts.path.rstrip("/"))


def _unix(path: str) -> Endpoint:
    return Endpoint("unix", "", 0, resolve_local_path(path), "")


def split_host_port(netloc: str, default_port: int) -> tuple[str, int]:
    """Split ``host[:port]`` (IPv6 in brackets), checking both: urlsplit is lenient about ports.

    The host comes back lower-case, IPv6 without brackets.  Shared by base URLs
    and proxy URLs, so both accept and refuse the same spellings.
    """
    if netloc.startswith("["):
        inner, bracket, rest = netloc[1:].partition("]")
        if not bracket:
            raise ValueError("unclosed '[' in host")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {inner!r}") from None
        host = inner
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected {rest!r} after IPv6 address")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = netloc.partition(":")
        if ":" in port_text:
            raise ValueError("IPv6 addresses must be written in brackets: http://[::1]:8080")
        if not host:
            raise ValueError("no host")
        if not _HOST_RE.fullmatch(host):
            raise ValueError(f"invalid host {host!r}")
    if not port_text:
        return host.lower(), default_port
    # Not int() alone: it would also take '+80', ' 80' or non-ASCII digits.
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"invalid port {port_text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1..65535")
    return host.lower(), port
