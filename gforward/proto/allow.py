"""The reference daemon's upstream policy: --allow patterns against what will be dialled.

Patterns match what will really be dialled, never the spelling of a request: a
unix path normalised (no ".." leads out of a pattern's directory), a host name
only through the addresses it resolves to (every one of them must match),
IPv6 brackets literal rather than glob classes.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Sequence
from typing import Any

from .mapping import join_host_port

# The host of an --allow pattern: IP address characters and wildcards (a scope after %).
_PATTERN_HOST = re.compile(r"[0-9A-Fa-f.:*?]+(?:%.*)?")


def normalise_path(path: str) -> str:
    """An absolute path without "." or ".." parts or repeated slashes, as the kernel reads
    it, so that no ".." leads out of a pattern's directory.  Lexical: a symbolic link
    is followed when dialled, as with any path."""
    return "/" + posixpath.normpath(path).lstrip("/")


def canonical_ip(text: str) -> str:
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
        address = canonical_ip(bare)
        bracketed = bracketed or ":" in address
        normalised = f"[{address}]:{port}" if bracketed else f"{address}:{port}"
    wildcards = {"*": ".*", "?": "."}
    return re.compile("".join(wildcards.get(c) or re.escape(c) for c in normalised), re.DOTALL)


def allowed(targets: Sequence[str], patterns: Sequence[re.Pattern[str]]) -> bool:
    """Whether every target (every address a name resolved to) matches some pattern."""
    return bool(targets) and all(any(p.fullmatch(t) for p in patterns) for t in targets)


def address_targets(addresses: Sequence[tuple[int, Any]]) -> list[str]:
    """What patterns are matched against for resolved addresses: "host:port" each (IPv6
    in brackets, in its shortest form)."""
    return [join_host_port(canonical_ip(sockaddr[0]), sockaddr[1]) for _, sockaddr in addresses]


def all_loopback(addresses: Sequence[tuple[int, Any]]) -> bool:
    """The default policy for hosts: every address it resolves to is a loopback one."""
    return bool(addresses) and all(
        ipaddress.ip_address(sockaddr[0]).is_loopback for _, sockaddr in addresses)
