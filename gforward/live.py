"""The services open in this process: closed when the interpreter exits, detached in a
forked child.

Services still open at exit are closed by an atexit hook, last opened first, within
EXIT_TIMEOUT, so that unix socket files are removed and no tunnel is left for the hub
thread (a daemon thread) to be frozen in the middle of a write; then the hub thread
is let finish what it was given, so that it is idle when the interpreter finalizes.
"""

from __future__ import annotations

import atexit
import itertools
import time
import weakref
from typing import Any

from . import fork, hub

EXIT_TIMEOUT = 10.0  # how long the exit hook waits for open services to close
_count = itertools.count()


def opened() -> int:
    """A number for a service just opened: services close at exit in the reverse order."""
    return next(_count)


class _Open:
    """The services open in this process, for the exit hook and the fork hook: a weak set
    behind a lock, since a hub thread drops a service from it when it closes, maybe
    while the exit hook, in another thread, goes through it."""

    def __init__(self) -> None:
        self._services: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = hub.allocate_lock()

    def add(self, service: Any) -> None:
        with self._lock:
            self._services.add(service)

    def discard(self, service: Any) -> None:
        with self._lock:
            self._services.discard(service)

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self._services)

    def detach_all(self) -> None:
        """In a forked child: every open service is the parent's.  A thread of the parent
        may have held the lock at the fork, so it is made anew first."""
        self._lock = hub.allocate_lock()
        for service in self.snapshot():
            try:
                service._detach()
            except Exception:  # an at-fork hook must not fail the fork
                service._log.warning("could not detach an inherited service after fork",
                                     exc_info=True)


services = _Open()
fork.on_fork(services.detach_all)


@atexit.register
def _close_live_services() -> None:
    """An app that exits with services open must not leave socket files behind.

    Last opened, first closed, as nested `with` blocks would: a forwarder goes
    before the daemon its tunnels lead to (in tests, both live here), so its
    tunnels end as closed rather than as cut.  The wait is bounded, so that a
    hub that cannot run (a log handler stuck in its thread, say) delays the
    exit but never hangs it.
    """
    deadline = time.monotonic() + EXIT_TIMEOUT
    for service in sorted(services.snapshot(), key=lambda s: s._order, reverse=True):
        service._request_close(0.0)
        if not service._await_closed(max(deadline - time.monotonic(), 0.0)):
            service._log.warning("still open %g s after exit began; leaving it", EXIT_TIMEOUT)
    hub.settle(max(deadline - time.monotonic(), 0.0))  # closed ones' last greenlets too
