"""Listeners served in one hub: the server core that the forwarder and the daemon share.

Modelled on gevent's `BaseServer`, for several listeners at once: a service
binds each mapping's listen side (TCP or unix), accepts, and hands every
connection to its role's `_handle`, in a greenlet of its own, or to its
`_accept`, in the hub, for a role that never blocks there; a role supplies
only that, and `_prepare` for what it keeps per listener.  Which hub it runs
in is `hub`'s business; what a forked child does with it is `fork`'s; `live`
closes what is still open when the interpreter exits.

Lifecycle, from any thread or greenlet: listeners are added and removed while
others serve; `close(drain=S)` stops accepting at once and lets open
connections end by themselves for up to S seconds before cutting the rest (a
plain `close()` meanwhile cuts at once).
"""

from __future__ import annotations

import functools
import logging
import time
from types import TracebackType
from typing import Any, Callable, Protocol, TypeVar

import gevent
from gevent import socket
from gevent.event import Event
from gevent.pool import Pool

from . import fork, hub, live
from .errors import ForwardError
from .listen import AcceptingServer, ListeningSocket, listen_tcp, listen_unix
from .proto.mapping import AddressMapping
from .proto.records import Counters
from .pump import Pump

_S = TypeVar("_S", bound="Service")
JOIN_TIMEOUT = 2.0  # how long closing lets handlers finish after their sockets closed
DRAIN_POLL = 0.05  # seconds between looks at what a drain waits for


class Driver(Protocol):
    """What moves a connection on from the hub's callbacks: the opener that dials, then
    the pump."""

    def abort(self, reason: str) -> None: ...

    def sockets(self) -> list[Any]: ...


class Connection:
    """One accepted connection, registered with its door until it is over, so that a
    close can end it at any stage: its sockets while a greenlet dials, its driver once
    one runs it."""

    __slots__ = ("_door", "_sockets", "aborted", "driver")

    def __init__(self, door: Door, *sockets: Any) -> None:
        self._door = door
        self._sockets = list(sockets)
        self.driver: Driver | None = None
        self.aborted = False
        door.connections.add(self)

    @property
    def sockets(self) -> list[Any]:
        """Every socket it holds now (for a forked child to let go of)."""
        return self._sockets + (self.driver.sockets() if self.driver is not None else [])

    def add(self, sock: Any) -> None:
        """One more socket of this connection (while a greenlet dials)."""
        self._sockets.append(sock)
        if self.aborted:
            sock.close()

    def dialling(self, driver: Driver) -> None:
        """From now on `driver` runs its dial (and a close ends it through the driver)."""
        self.driver = driver

    def open(self, pump: Pump) -> None:
        """The tunnel is open: from now on its pump owns every socket (the gevent
        wrappers they came in, with idle watchers each, can go), and the connection is over
        once the pump has closed them."""
        self.driver = pump
        self._sockets = []
        pump.on_closed = self.done

    def abort(self) -> None:
        self.aborted = True
        if self.driver is not None:
            self.driver.abort("closed with its listener")
        else:
            for sock in self._sockets:
                sock.close()

    def done(self) -> None:
        """Over: nothing of it is left to close."""
        self._door.connections.discard(self)


class Door:
    """One listening socket, what accepts on it, and the connections that came through."""

    __slots__ = ("bound", "connections", "context", "counters", "server")

    def __init__(self, bound: ListeningSocket, context: Any) -> None:
        self.bound = bound
        self.context = context  # what the role keeps for this listener
        self.server: AcceptingServer | None = None
        self.connections: set[Connection] = set()
        self.counters = Counters()


class Service:
    """Listeners served in one hub, with a lifecycle any thread can drive."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._doors: list[Door] = []
        self._leaving: set[Door] = set()  # removed, their connections still draining
        self.counters = Counters()  # every listener's, removed ones included
        self._pool = Pool()
        self._closing = False
        self._cut = False  # a close(drain=0) came while draining
        self._detached = False  # an inherited copy in a forked child: the parent's, not ours
        self._closed_here = Event()  # for waiters in the hub's thread
        self._closed_anywhere = hub.Latch()  # for waiters in other threads
        self._hub: Any = None
        self._in_hub_thread = False  # in the shared "gforward hub" thread (a plain process)
        self._order = -1

    # What a role supplies ------------------------------------------------------

    def _prepare(self, mapping: AddressMapping, bound: ListeningSocket) -> Any:
        """What the role keeps for a listener just bound (a door's `context`)."""
        return None

    def _handle(self, door: Door, sock: socket.socket, address: Any) -> None:
        """The life of one accepted connection; the socket is the handler's to close."""
        raise NotImplementedError

    def _accept(self, door: Door, sock: socket.socket, address: Any) -> None:
        """In the hub: a role that can start a connection without blocking does so here;
        by default `_handle` runs in a greenlet of its own."""
        self._pool.spawn(self._guarded, self._handle, door, sock, address)

    # Opening ----------------------------------------------------------------------

    def _open(self, mappings: list[AddressMapping]) -> None:
        """Bind every listener (all or nothing: raises in the caller) and serve them."""
        self._hub = hub.home()
        self._in_hub_thread = hub.is_shared(self._hub)
        hub.run_in(self._hub, lambda: self._serve(self._bind_all(mappings)))
        self._order = live.opened()
        live.services.add(self)

    def _serve(self, doors: list[Door]) -> None:
        for door in doors:
            # spawn=None: the server calls the role's `_accept` (guarded) in the hub.
            door.server = AcceptingServer(
                door.bound.sock, functools.partial(self._guarded, self._accept, door), spawn=None)
            door.server.log = self._log
            self._doors.append(door)
            door.server.start()

    def _bind_all(self, mappings: list[AddressMapping]) -> list[Door]:
        """Every listener bound, or none: what was bound is closed again if one fails."""
        doors: list[Door] = []
        try:
            for mapping in mappings:
                doors.append(self._bind(mapping))
        except BaseException:
            for door in doors:
                door.bound.close()
            raise
        return doors

    def _bind(self, mapping: AddressMapping) -> Door:
        """One listener, bound but not yet serving; nothing is left behind if it fails."""
        if mapping.listen_unix():
            bound = listen_unix(mapping.listen_unix_path)
        else:
            bound = listen_tcp(mapping.listen_addr, mapping.listen_port)
        try:
            return Door(bound, self._prepare(mapping, bound))
        except BaseException:
            bound.close()
            raise

    def _add(self, mapping: AddressMapping) -> Door:
        """Bind one more listener and serve it, from any thread."""

        def add() -> Door:
            if self._closing:
                raise ForwardError("the forwarder is closed")
            door = self._bind(mapping)
            self._serve([door])
            return door

        return hub.run_in(self._hub, add)

    def _guarded(self, step: Callable[[Door, socket.socket, Any], None], door: Door,
                 sock: socket.socket, address: Any) -> None:
        """`step` for an accepted socket, only while its door is open (a close may come
        between the accept and a greenlet's start), never leaving the socket open behind
        an exception."""
        if self._closing or door not in self._doors:
            sock.close()
            return
        try:
            step(door, sock, address)
        except BaseException:
            sock.close()
            raise

    def _log_soon(self, level: int, message: str, *args: Any,
                  exc_info: BaseException | None = None) -> None:
        """Log from a greenlet of its own.  Tunnels end in the hub's callbacks, where a log
        handler must neither block the hub nor switch (a network handler in a patched app
        would, and one that calls close() waits for the hub)."""
        if self._log.isEnabledFor(level):
            gevent.spawn(self._log.log, level, message, *args, exc_info=exc_info)

    # Closing ----------------------------------------------------------------------

    def close(self, drain: float = 0.0) -> None:
        """Stop accepting and end every connection, after letting them end by themselves
        for up to `drain` seconds; idempotent, from any thread, returns once closed.

        A close(drain=0) while another close drains cuts what is left at once.  Called
        from one of our own connection greenlets (a log handler, say), it does not wait
        for that greenlet, which could never end first.  In a forked child, an
        inherited service is already closed (`detached`).
        """
        if not self._detached:
            self._request_close(drain)
            self._await_closed(None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until closed; False if `timeout` seconds passed first."""
        return self._detached or self._await_closed(timeout)

    @property
    def closed(self) -> bool:
        return self._closed_anywhere.is_set

    def stopping(self) -> bool:
        """Whether a close has begun (the service may not be closed yet); a method, as it
        changes under its callers' feet."""
        return self._closing

    @property
    def detached(self) -> bool:
        """Whether this is a forked child's copy: closed here, still the parent's to serve."""
        return self._detached

    def _remove(self, door: Door, drain: float) -> None:
        """Stop one listener and end its connections, as close() does; from any thread."""

        def remove() -> None:
            if door not in self._doors:
                raise KeyError("no such listener")
            self._doors.remove(door)
            self._leaving.add(door)  # a close meanwhile ends its connections too
            self._stop_accepting(door)
            try:
                self._end([door], drain)
            finally:
                self._leaving.discard(door)

        hub.run_in(self._hub, remove)

    def _request_close(self, drain: float) -> None:
        """Start closing without waiting for it, from any thread."""
        if hub.is_mine(self._hub):
            current = gevent.getcurrent()
            if current in self._pool:  # one of our handlers: the teardown must not wait for it
                self._pool.discard(current)
        hub.soon(self._hub, lambda: self._begin_close(drain))

    def _await_closed(self, timeout: float | None) -> bool:
        if hub.is_mine(self._hub):
            return bool(self._closed_here.wait(timeout))
        return self._closed_anywhere.wait(timeout)

    def _begin_close(self, drain: float) -> None:
        if drain <= 0:
            self._cut = True  # also ends a drain under way, a listener's included
        if not self._closing:
            self._closing = True
            self._teardown(drain)

    def _teardown(self, drain: float) -> None:
        """In the hub: listeners first, so nothing new arrives, then connections."""
        for door in self._doors:
            self._stop_accepting(door)
        self._end(self._doors + list(self._leaving), drain)
        if not self._pool.join(timeout=JOIN_TIMEOUT):
            late = list(self._pool)
            self._log.warning("%d connection(s) did not end in time; killing them", len(late))
            gevent.killall(late, timeout=JOIN_TIMEOUT)
        live.services.discard(self)
        self._closed_here.set()
        self._closed_anywhere.set()

    def _stop_accepting(self, door: Door) -> None:
        if door.server is not None:
            door.server.close()
        if self._detached:  # under way when the process forked: not our file to remove
            door.bound.sock.close()
        else:
            door.bound.close()

    def _end(self, doors: list[Door], drain: float) -> None:
        """Give the doors' connections up to `drain` seconds to end by themselves (or until
        a close cuts), then cut what is left."""
        deadline = time.monotonic() + drain
        waiting = sum(len(door.connections) for door in doors)
        if drain > 0 and waiting:
            self._log.info("draining: waiting up to %g s for %d open tunnel(s) to end",
                           drain, waiting)
        while not self._cut and any(door.connections for door in doors):
            left = deadline - time.monotonic()
            if left <= 0:
                if drain > 0:
                    self._log.info("drained for %g s: cutting %d tunnel(s) still open", drain,
                                   sum(len(door.connections) for door in doors))
                break
            gevent.sleep(min(DRAIN_POLL, left))
        for door in doors:
            for connection in list(door.connections):
                connection.abort()

    # Forking ----------------------------------------------------------------------

    def _detach(self) -> None:
        """In a forked child, first thing: leave this service to the parent.

        Its sockets are the parent's too: the child lets go of them at once
        (`fork.release`).  If its hub is the forking thread's, that hub lives on
        in the child (gevent re-initialises it after fork): the servers are
        stopped, not-yet-started handlers never start, and the running ones see
        their sockets closed and end, each touching only its own closed objects.
        Otherwise nothing of its hub may run or be touched here, not even its loop,
        whose epoll set the parent shares.
        """
        self._detached = self._closing = True
        live.services.discard(self)
        handlers = list(self._pool)
        doors = self._doors + list(self._leaving)  # removed listeners' tunnels too
        connections = [c for door in doors for c in door.connections]
        sockets = [door.bound.sock for door in doors]
        sockets += [sock for connection in connections for sock in connection.sockets]
        sockets += [sock for handler in handlers for sock in fork.accepted_sockets(handler)]
        fork.release(sockets)
        if self._hub is not None and hub.is_mine(self._hub):
            for door in self._doors:
                if door.server is not None:
                    door.server.close()
            current = gevent.getcurrent()
            for handler in handlers:
                if handler.gr_frame is None and not handler.dead and handler is not current:
                    handler.kill(block=False)  # spawned, never run: it would find its socket gone
            for connection in connections:
                connection.abort()
            self._closed_here.set()
        else:
            fork.keep(self)
        self._closed_anywhere.set()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
