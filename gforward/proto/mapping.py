"""Parse ``-L``-style forwarding specs into :class:`AddressMapping`.

The accepted formats and field meanings follow ``ParseAddressMapping`` in the
Go ``forward`` package (the README's "Specs" table lists them). One addition: a
unix listener forwarding to a TCP remote (``/tmp/web.sock:127.0.0.1:8080``), which
the Go parser rejects but Slicer's documentation promises. IPv6 hosts are
written in brackets, as ssh does (``[::1]:8080:[::1]:80``).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..errors import SpecError

__all__ = ["AddressMapping", "is_local_path", "parse_address_mapping", "resolve_local_path"]

# sockaddr_un.sun_path is 108 bytes on Linux, one of which is the terminating NUL.
MAX_UNIX_PATH_BYTES = 107

_HOST_RE = re.compile(r"[A-Za-z0-9._-]+")
_PATH_PREFIXES = ("/", "./", "../", "~")


@dataclass
class AddressMapping:
    """One forward: a local listener on the host and the target to dial inside the VM."""

    raw_spec: str
    listen_addr: str = ""
    listen_port: int = 0
    listen_unix_path: str = ""
    remote_host: str = ""
    remote_port: int = 0
    remote_unix_path: str = ""

    def listen_unix(self) -> bool:
        """Whether the local listener is a unix socket."""
        return bool(self.listen_unix_path)

    def remote_unix(self) -> bool:
        """Whether the guest-side target is a unix socket."""
        return bool(self.remote_unix_path)

    def remote_target(self) -> str:
        """The ``X-Inlets-Upstream`` header value: ``host:port`` or ``unix:/path``."""
        if self.remote_unix():
            return "unix:" + self.remote_unix_path
        return join_host_port(self.remote_host, self.remote_port)

    def listen_address(self) -> str:
        """Human-readable local side: ``host:port`` or the socket path."""
        if self.listen_unix():
            return self.listen_unix_path
        return join_host_port(self.listen_addr, self.listen_port)

    def listens_everywhere(self) -> bool:
        """Whether the listener binds every interface (0.0.0.0, ::): other machines can
        reach the VM's port through it."""
        try:
            return bool(self.listen_addr) and ipaddress.ip_address(self.listen_addr).is_unspecified
        except ValueError:
            return False

    def canonical_spec(self) -> str:
        """Fully explicit ``LISTEN:REMOTE`` form, so logs show what was really meant."""
        remote = self.remote_unix_path if self.remote_unix() else self.remote_target()
        return f"{self.listen_address()}:{remote}"


def is_local_path(text: str) -> bool:
    """Whether a host-side address is written as a filesystem path rather than host/port."""
    return text.startswith(_PATH_PREFIXES)


def resolve_local_path(text: str) -> str:
    """Expand ``~`` and make ``text`` absolute, rejecting what no unix socket could use.

    Raises ValueError; callers add which input it came from.
    """
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError("unix socket path contains control characters")
    try:
        os.fsencode(text)
    except UnicodeError:
        raise ValueError("unix socket path cannot be encoded for the filesystem") from None
    path = os.path.expanduser(text)
    if path.startswith("~"):
        raise ValueError(f"cannot expand {text.split('/', 1)[0]!r} in unix socket path")
    try:
        path = os.path.abspath(path)
    except OSError as exc:  # relative path while the working directory is gone
        raise ValueError(f"cannot make unix socket path absolute: {exc}") from None
    size = len(os.fsencode(path))
    if size > MAX_UNIX_PATH_BYTES:
        raise ValueError(
            f"unix socket path {path!r} is {size} bytes, more than the "
            f"{MAX_UNIX_PATH_BYTES} that fit in sun_path"
        )
    return path


def parse_address_mapping(spec: str) -> AddressMapping:
    """Parse one spec; every error is a :class:`SpecError` quoting ``spec``."""
    with _quoting("spec", spec):
        return _parse(spec)


def parse_remote_target(target: str) -> AddressMapping:
    """The inverse of remote_target(), for the daemon: "host:port", "[v6]:port", "unix:/path"."""
    mapping = AddressMapping(raw_spec=target)
    with _quoting("upstream", target):
        if target.startswith("unix:/"):
            mapping.remote_unix_path = _remote_path(target[len("unix:") :])
        else:
            mapping.remote_host, mapping.remote_port = _host_port(
                target, "remote", 1, "expected HOST:PORT or unix:/PATH")
    return mapping


def parse_listen_address(text: str) -> AddressMapping:
    """A listen side alone, HOST:PORT or [V6]:PORT (port 0: any free one), for the
    reference daemon's --listen; SpecError otherwise."""
    mapping = AddressMapping(raw_spec=text)
    with _quoting("listen address", text):
        mapping.listen_addr, mapping.listen_port = _host_port(
            text, "listen", 0, "expected HOST:PORT (--unix for paths)")
    return mapping


@contextmanager
def _quoting(what: str, text: str) -> Iterator[None]:
    """A ValueError inside becomes a SpecError that quotes `text` as a `what`."""
    try:
        yield
    except ValueError as exc:
        raise SpecError(f"invalid {what} {text!r}: {exc}") from None


def _host_port(text: str, side: str, minimum: int, shape: str) -> tuple[str, int]:
    """HOST:PORT alone (IPv6 in brackets); ValueError saying `shape` if it is not that."""
    parts = _split(text)
    if len(parts) != 2:
        raise ValueError(shape)
    return _host(parts[0], side), _port(parts[1], side, minimum)


def _parse(spec: str) -> AddressMapping:
    if not spec:
        raise ValueError("empty spec")
    if spec != spec.strip():
        raise ValueError("leading or trailing whitespace")
    parts = _split(spec)
    if "" in parts and "::" in spec:
        raise ValueError("empty field (write IPv6 addresses in brackets: [::1]:80)")
    if len(parts) < 2:
        raise ValueError("expected [LISTEN:]HOST:PORT or [LISTEN:]/REMOTE/PATH")
    mapping = AddressMapping(raw_spec=spec)
    if parts[-1].startswith("/"):
        mapping.remote_unix_path = _remote_path(parts[-1])
        listen = parts[:-1]
    else:
        if "/" in parts[-1]:
            raise ValueError(f"remote unix socket path {parts[-1]!r} must be absolute")
        mapping.remote_host = _host(parts[-2], "remote")
        mapping.remote_port = _port(parts[-1], "remote", minimum=1)
        listen = parts[:-2]

    if not listen:
        if mapping.remote_unix():
            raise ValueError("a unix socket remote needs a listen port or path")
        mapping.listen_addr = mapping.remote_host
        mapping.listen_port = mapping.remote_port
    elif len(listen) == 1 and is_local_path(listen[0]):
        mapping.listen_unix_path = resolve_local_path(listen[0])
        if ":" in mapping.listen_unix_path:
            # From $HOME or the working directory; specs have no escaping for ':'.
            raise ValueError(f"unix socket path {mapping.listen_unix_path!r} contains ':'")
    elif len(listen) == 1:
        mapping.listen_addr = "0.0.0.0"
        mapping.listen_port = _port(listen[0], "listen", minimum=0)
    elif len(listen) == 2:
        mapping.listen_addr = _host(listen[0], "listen")
        mapping.listen_port = _port(listen[1], "listen", minimum=0)
    else:
        raise ValueError("too many ':'-separated fields (write IPv6 addresses in brackets: [::1])")
    return mapping


def _split(spec: str) -> list[str]:
    """Split on ':' except inside a ``[...]`` that opens a part, so IPv6 hosts stay whole."""
    parts: list[str] = []
    current = ""
    bracketed = False
    for char in spec:
        if bracketed:
            bracketed = char != "]"
        elif char == "[" and not current:
            bracketed = True
        elif char == ":":
            parts.append(current)
            current = ""
            continue
        current += char
    if bracketed:
        raise ValueError("unclosed '['")
    parts.append(current)
    return parts


def _host(text: str, side: str) -> str:
    """Validate a host and strip IPv6 brackets; the remote one ends up in an HTTP header."""
    if not text:
        raise ValueError(f"empty {side} host")
    if text.startswith("["):
        inner = text[1:-1]
        if not text.endswith("]") or not _is_printable_ascii(inner):
            raise ValueError(f"invalid {side} host {text!r}")
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {text!r}") from None
        return inner
    if not _HOST_RE.fullmatch(text):
        if ":" in text:
            raise ValueError(f"IPv6 address {text!r} must be written in brackets")
        raise ValueError(f"invalid {side} host {text!r}")
    return text


def _port(text: str, side: str, minimum: int) -> int:
    if not text:
        raise ValueError(f"empty {side} port")
    # isdigit() alone would accept non-ASCII digits such as Arabic-Indic ones.
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{side} port {text!r} is not a number")
    digits = text.lstrip("0")
    if len(digits) > 5 or not minimum <= int(digits or "0") <= 65535:
        raise ValueError(f"{side} port {text!r} is out of range {minimum}..65535")
    return int(digits or "0")


def _remote_path(text: str) -> str:
    """A guest-side path goes verbatim into an HTTP header, so only visible ASCII passes."""
    if not _is_printable_ascii(text):
        raise ValueError(f"remote unix socket path {text!r} must be printable ASCII without spaces")
    return text


def _is_printable_ascii(text: str) -> bool:
    return all(0x21 <= ord(c) <= 0x7E for c in text)


def join_host_port(host: str, port: int) -> str:
    """host:port as people and HTTP headers write it, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback_host(host: str) -> bool:
    """Whether `host` names this machine: "localhost" or a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
