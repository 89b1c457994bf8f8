"""One thread, one epoll: the loop under the load generator and the guest service.

Thousands of non-blocking sockets cost a thread nothing while idle, and a busy
one costs a poll and one call of its handler: little enough Python per
request that the forwarder, not the load generator, is what a run measures.
Linux only, like the rest of the benchmarks (they read /proc).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from typing import Callable

READ = select.EPOLLIN  # errors and hang-ups come too: handlers treat them as readable
WRITE = select.EPOLLOUT

Handler = Callable[[int], None]


class Loop:
    """Sockets and the handler each one's epoll events go to."""

    POLL = 0.05  # longest sleep between two looks at a run's `until`

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}

    def add(self, sock: socket.socket, events: int, handler: Handler) -> None:
        fd = sock.fileno()
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, sock: socket.socket, events: int) -> None:
        self._epoll.modify(sock.fileno(), events)

    def switch(self, sock: socket.socket, events: int, handler: Handler) -> None:
        """New events, and a new handler for them."""
        fd = sock.fileno()
        self._handlers[fd] = handler
        self._epoll.modify(fd, events)

    def remove(self, sock: socket.socket) -> None:
        """Forget `sock` (before it is closed: a closed socket has no descriptor)."""
        fd = sock.fileno()
        if self._handlers.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    def run(self, until: Callable[[], bool], timeout: float) -> bool:
        """Serve until `until()` holds (True) or `timeout` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        poll, handlers, clock = self._epoll.poll, self._handlers, time.monotonic
        while not until():
            left = deadline - clock()
            if left <= 0:
                return False
            for fd, events in poll(min(left, self.POLL)):
                handler = handlers.get(fd)
                if handler is not None:  # an earlier handler of this batch may have closed it
                    handler(events)
        return True

    def run_forever(self) -> None:
        poll, handlers = self._epoll.poll, self._handlers
        while True:
            for fd, events in poll():
                handler = handlers.get(fd)
                if handler is not None:
                    handler(events)

    def close(self) -> None:
        self._handlers.clear()
        self._epoll.close()


def nonblocking_connect(addr: tuple[str, int]) -> socket.socket:
    """A TCP socket connecting to `addr`: writable once connected (or failed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    code = sock.connect_ex(addr)
    if code not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(code, f"connect to {addr[0]}:{addr[1]}: {os.strerror(code)}")
    return sock
