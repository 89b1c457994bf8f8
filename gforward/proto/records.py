"""What a forwarder reports: its listeners, and the counters of what went through them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Listener:
    """One bound local listener."""

    spec: str
    local: str  # "127.0.0.1:50306" or "/tmp/docker.sock"
    remote: str  # the X-Inlets-Upstream value
    port: int  # resolved TCP port; 0 for unix listeners

    def is_named(self, what: Listener | str) -> bool:
        """Whether `what` (remove()'s argument) is this listener or the spec it was bound for."""
        return self == what or self.spec == what


class Counters:
    """Running counts of one listener, or of a whole forwarder.  Only the hub's thread
    writes them, and each only ever grows (but `open`), so any thread may read them."""

    __slots__ = ("down", "failed", "failures", "open", "total", "up")

    def __init__(self) -> None:
        self.open = 0  # tunnels accepted and not over yet (dialling included)
        self.total = 0  # local connections accepted
        self.failed = 0  # tunnels that could not open, or were cut
        self.up = 0  # payload bytes from local clients on to the daemon
        self.down = 0  # payload bytes from the daemon for local clients
        self.failures: dict[str, int] = {}  # failed tunnels by cause

    def fail(self, cause: str) -> None:
        self.failed += 1
        self.failures[cause] = self.failures.get(cause, 0) + 1


@dataclass(frozen=True)
class _Totals:
    """The counters both stats classes report (see the README's "Operating it")."""

    tunnels_open: int
    tunnels_total: int
    tunnels_failed: int
    bytes_up: int
    bytes_down: int
    failures: dict[str, int]


@dataclass(frozen=True)
class ListenerStats(_Totals):
    """One listener's counters at one moment."""

    listener: Listener


@dataclass(frozen=True)
class ForwarderStats(_Totals):
    """A forwarder's counters at one moment: totals since start (listeners removed since
    included), and each current listener's own."""

    listeners: tuple[ListenerStats, ...] = ()
