"""Where listeners run: the hub, the live connections, and closing them all.

The forwarder and the reference daemon are both "some listeners, a handler
per accepted connection"; this module is what they share, modelled on
gevent's own `BaseServer` but for several sockets at once.

Which hub: in a process that gevent has patched, or when called from inside
a greenlet, the servers join the caller's hub, as the app's other greenlets
do.  In a plain process they get a native thread with a hub of its own, so
the app's blocking calls never starve them.  `close()` and `wait()` work from
any thread or greenlet: they cross into the hub with
`loop.run_callback_threadsafe` and wait on a lock that any thread can wait
on (a gevent Event only wakes greenlets of its own hub).
"""

from __future__ import annotations

import atexit
import logging
import signal
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Callable, TypeVar

import gevent
import gevent.monkey
from gevent import socket
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from .listen import ListeningSocket

Handler = Callable[[socket.socket, Any], None]
Binder = Callable[[], "tuple[ListeningSocket, Handler]"]  # binds one listener, or raises
_S = TypeVar("_S", bound="Service")
JOIN_TIMEOUT = 2.0  # how long close() lets handlers finish after their sockets closed

_allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")
_thread_id = gevent.monkey.get_original("_thread", "get_ident")  # per OS thread, even patched
_live: weakref.WeakSet[Service] = weakref.WeakSet()


class _Latch:
    """Set once, awaited from any thread: a real lock held until `set()`."""

    def __init__(self) -> None:
        self._lock = _allocate_lock()
        self._lock.acquire()
        self.is_set = False

    def set(self) -> None:
        if not self.is_set:
            self.is_set = True
            self._lock.release()

    def wait(self, timeout: float | None) -> bool:
        if self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            self._lock.release()
            return True
        return False


class Connection:
    """The sockets of one accepted connection, so that close() can end it."""

    def __init__(self, *sockets: socket.socket) -> None:
        self.sockets = list(sockets)
        self.aborted = False

    def add(self, sock: socket.socket) -> None:
        self.sockets.append(sock)
        if self.aborted:
            sock.close()

    def abort(self) -> None:
        self.aborted = True
        for sock in self.sockets:
            sock.close()


class Service:
    """Listening sockets served in one hub, with a lifecycle any thread can drive."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._listening: list[ListeningSocket] = []
        self._servers: list[StreamServer] = []
        self._connections: set[Connection] = set()
        self._pool: Pool | None = None
        self._closing = False
        self._closed_here: Event | None = None  # for waiters in the hub's thread
        self._closed_anywhere = _Latch()  # for waiters in other threads
        self._hub_thread: int | None = None
        self._hub: Any = None
        self._hub_alive = threading.Lock()  # held while callbacks may still be sent to the hub
        self._thread: threading.Thread | None = None

    # Starting -------------------------------------------------------------

    def _open(self, binders: list[Binder], name: str) -> None:
        """Bind and start serving; raises in the caller if any bind fails."""
        if gevent.monkey.is_module_patched("socket") or gevent.getcurrent().parent is not None:
            self._serve(binders)
        else:
            started = threading.Event()
            failure: list[BaseException] = []
            self._thread = threading.Thread(
                target=self._thread_main, args=(binders, started, failure), name=name, daemon=True
            )
            self._thread.start()
            started.wait()
            if failure:
                self._thread.join()
                raise failure[0]
        _live.add(self)

    def _thread_main(
        self,
        binders: list[Binder],
        started: threading.Event,
        failure: list[BaseException],
    ) -> None:
        """A plain app's hub thread: serve until closed, then free the hub."""
        hub = gevent.get_hub()
        try:
            self._serve(binders)
        except BaseException as exc:  # handed to start() in the caller's thread
            failure.append(exc)
        started.set()
        if not failure:
            assert self._closed_here is not None
            self._closed_here.wait()
        with self._hub_alive:
            self._hub = None
        hub.destroy(destroy_loop=True)

    def _serve(self, binders: list[Binder]) -> None:
        """In the hub: bind every listener (all or nothing), then start accepting."""
        self._hub = gevent.get_hub()
        self._hub_thread = _thread_id()
        self._closed_here = Event()
        self._pool = Pool()
        bound: list[tuple[ListeningSocket, Handler]] = []
        try:
            for binder in binders:
                bound.append(binder())
        except BaseException:
            for listening, _ in bound:
                listening.close()
            raise
        for listening, handler in bound:
            self._listening.append(listening)
            server = StreamServer(listening.sock, handler, spawn=self._pool)
            self._servers.append(server)
            server.start()

    @contextmanager
    def _track(self, connection: Connection) -> Iterator[Connection]:
        """Register a connection for the length of a `with` block."""
        self._connections.add(connection)
        try:
            yield connection
        finally:
            self._connections.discard(connection)

    # Closing --------------------------------------------------------------

    def close(self) -> None:
        """Stop listening and end every connection; idempotent, from any thread.

        Called from one of our own connection greenlets (a log handler, say),
        it does not wait for that greenlet, which could never end first.
        """
        if _thread_id() == self._hub_thread:
            self._begin_close(spare=gevent.getcurrent())
            assert self._closed_here is not None
            self._closed_here.wait()
            return
        with self._hub_alive:
            if self._hub is not None:
                self._hub.loop.run_callback_threadsafe(self._begin_close)
        self._closed_anywhere.wait(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until closed; False if `timeout` seconds passed first."""
        if _thread_id() == self._hub_thread:
            assert self._closed_here is not None
            return bool(self._closed_here.wait(timeout))
        return self._closed_anywhere.wait(timeout)

    @property
    def closed(self) -> bool:
        return self._closed_anywhere.is_set

    def _begin_close(self, spare: Any = None) -> None:
        if not self._closing:
            self._closing = True
            gevent.spawn(self._teardown, spare)

    def _teardown(self, spare: Any) -> None:
        """In the hub: listeners first, so nothing new arrives, then connections."""
        for server in self._servers:
            server.close()
        for listening in self._listening:
            listening.close()
        for connection in list(self._connections):
            connection.abort()
        assert self._pool is not None
        handlers = [g for g in self._pool if g is not spare]
        late = [g for g in handlers if g not in gevent.joinall(handlers, timeout=JOIN_TIMEOUT)]
        if late:
            self._log.warning("%d connection(s) did not end in time; killing them", len(late))
            gevent.killall(late, timeout=JOIN_TIMEOUT)
        _live.discard(self)
        assert self._closed_here is not None
        self._closed_here.set()
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


def serve_until_signalled(launch: Callable[[], _S], announce: Callable[[_S], None]) -> None:
    """For command lines: start, announce, serve until SIGINT or SIGTERM, close.

    The signals are blocked before the hub thread starts (threads inherit the
    mask) and taken with sigwait, so no handler ever runs inside the hub.
    """
    stop = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        service = launch()
        try:
            announce(service)
            signal.sigwait(stop)
        finally:
            service.close()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@atexit.register
def _close_live_services() -> None:
    """An app that exits with a forwarder open must not leave socket files behind."""
    for service in list(_live):
        service.close()
