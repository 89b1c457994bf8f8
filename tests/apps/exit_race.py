"""The exit hook, run while another thread closes services, in a plain process.

Closing a service drops it from the set of open ones in gforward's hub thread,
whenever that thread gets to it; the hook, in the main thread, must go through
that set all the same.  Threads switch as often as the interpreter allows, to
widen the window.  Each round opens services with no listener (nothing but their
place among the open ones), has a thread close half of them while the hook runs,
then checks that every one ended closed.  Exit 0 only if the hook never failed.

    python tests/apps/exit_race.py
"""

from __future__ import annotations

import logging
import sys
import threading

import support

from gforward import live, service

ROUNDS = 5
SERVICES = 400


class Bare(service.Service):
    """A service without listeners."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("exit-race"))
        self._open([])


def close_all(services: list[Bare]) -> None:
    for one in services:
        one.close()


def main() -> int:
    support.watchdog(40)
    sys.setswitchinterval(1e-6)
    problems: list[str] = []
    for n in range(ROUNDS):
        services = [Bare() for _ in range(SERVICES)]
        closer = threading.Thread(target=close_all, args=(services[::2],))
        closer.start()
        try:
            live._close_live_services()
        except RuntimeError as exc:
            problems.append(f"round {n}: the exit hook failed: {exc!r}")
        closer.join()
        still_open = sum(not s.closed for s in services)
        support.say(f"round {n}: {SERVICES} services, half closed by another thread meanwhile;"
                    f" still open after the hook: {still_open}")
        if still_open:
            problems.append(f"round {n}: {still_open} services still open")
    return support.verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
