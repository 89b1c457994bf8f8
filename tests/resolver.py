"""gevent resolvers for tests, so that a test decides what a name resolves to and no
lookup ever leaves the machine.

`HostsFile`, for a program under test started with `resolver_env()` (tests/support.py):
GEVENT_RESOLVER names the class, GFORWARD_TEST_HOSTS a hosts-style file.  Lines are
`ADDRESS NAME...`; a name's addresses come back in the order of the file, a name
missing from it fails as an unknown host does, and IP literals are answered without
a lookup.  The address `stall` makes lookups of that name hang for STALL seconds in a
thread of gevent's pool, as the system's resolver does while it waits for a DNS
server that does not answer.

`Scripted`, installed on a hub of this process (`hub.resolver`) for one test.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import gevent
import gevent.monkey
import gevent.resolver.thread

STALL = 60.0  # longer than any test waits
_sleep = gevent.monkey.get_original("time", "sleep")  # a pool thread blocks for real


def parse_hosts(text: str) -> dict[str, list[str]]:
    """name (lower case) -> its addresses, in the order of the file."""
    names: dict[str, list[str]] = {}
    for line in text.splitlines():
        address, *aliases = line.split("#", 1)[0].split() or [""]
        for name in aliases:
            names.setdefault(name.lower(), []).append(address)
    return names


class HostsFile(gevent.resolver.thread.Resolver):  # type: ignore[misc]
    """gevent's thread resolver, with the system's lookup replaced by the file's answers."""

    def __init__(self, hub: Any = None) -> None:
        super().__init__(hub)
        with open(os.environ["GFORWARD_TEST_HOSTS"], encoding="utf-8") as f:
            self.names = parse_hosts(f.read())

    def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0,
                    proto: int = 0, flags: int = 0) -> list[Any]:
        return self.pool.apply(self._answer, (host, port, family, type, proto, flags))

    def _answer(self, host: Any, port: Any, family: int, type: int, proto: int,
                flags: int) -> list[Any]:
        """In a thread of the pool, as the thread resolver's lookups run."""
        name = host.decode() if isinstance(host, bytes) else host
        addresses = self.names.get(name.lower(), [name]) if name else [host]
        if addresses == ["stall"]:
            _sleep(STALL)
        answers: list[Any] = []
        for address in addresses:  # AI_NUMERICHOST: an address, or "unknown host"
            answers += socket.getaddrinfo(address, port, family, type, proto,
                                          flags | socket.AI_NUMERICHOST)
        return answers


class Scripted:
    """Answers lookup n of a name with the n-th of `answers` (an IPv4 address, or "fail"
    for an unknown host; the last again once they run out), each after `delay` seconds
    in which other greenlets run; counts these lookups.  IP literals (a listener's
    address, say) are answered at once, as themselves, and not counted."""

    def __init__(self, *answers: str, delay: float = 0.0) -> None:
        self.answers = answers
        self.delay = delay
        self.lookups = 0

    def getaddrinfo(self, host: Any, port: Any, family: int = 0, type: int = 0,
                    proto: int = 0, flags: int = 0) -> list[Any]:
        try:
            return socket.getaddrinfo(host, port, family, type, proto,
                                      flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            pass  # a name
        answer = self.answers[min(self.lookups, len(self.answers) - 1)]
        self.lookups += 1
        gevent.sleep(self.delay)
        if answer == "fail":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answer, port))]
