"""Where listeners run: the hub, the live connections, and closing them all.

The forwarder and the reference daemon are both "some listeners, a handler
per accepted connection"; this module is what they share, modelled on
gevent's own `BaseServer` but for several sockets at once.

Which hub: in a process that gevent has patched, or when called from inside
a greenlet, the servers join the caller's hub, as the app's other greenlets
do.  In a plain process they run in "gforward hub", a native thread with a
hub of its own, so the app's blocking calls never starve them; one such
thread serves every service of the process and lives as long as it does
(gevent never frees the hub of a thread that ended, so a thread per
forwarder would leak one hub each time).  `close()` and `wait()` work from
any thread or greenlet: they cross into the hub with
`loop.run_callback_threadsafe` and wait on a lock that any thread can wait
on (a gevent Event only wakes greenlets of its own hub).

Exit: services still open when the interpreter exits are closed by an
atexit hook, last opened first, within EXIT_TIMEOUT, so unix socket files are
removed and no tunnel is left for the hub thread (a daemon thread) to be
frozen in the middle of a write.

Fork: a forked child inherits copies of every open service, sharing the
parent's listening and tunnel sockets.  Those belong to the parent, so right
after fork the child detaches them (see `_detach_inherited`): the child's
references to the sockets are dropped at once (the parent's port or unix
file is not held open by the child, and a tunnel's EOF is not delayed by
it), nothing of them is served in the child, and close(), wait() and the
exit hook treat them as already closed there, without touching the
parent's files or hub.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import threading
import time
import weakref
from types import TracebackType
from typing import Any, Callable, TypeVar

import gevent
import gevent.monkey
from gevent import socket
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from .listen import ListeningSocket
from .pump import Pump

Handler = Callable[[socket.socket, Any], None]
Binder = Callable[[], "tuple[ListeningSocket, Handler]"]  # binds one listener, or raises
_S = TypeVar("_S", bound="Service")
JOIN_TIMEOUT = 2.0  # how long close() lets handlers finish after their sockets closed
EXIT_TIMEOUT = 10.0  # how long the exit hook waits for open services to close

_allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")
_thread_id = gevent.monkey.get_original("_thread", "get_ident")  # per OS thread, even patched
_orphans: list[Service] = []  # detached in a forked child, their hub gone: never freed
_opened = itertools.count()  # the order services opened in, for closing them at exit


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
        """True once set.  Waiters pass the lock along, so a short timeout can
        expire while another waiter holds it for a moment: `is_set` decides."""
        if self.is_set:
            return True
        if self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            self._lock.release()
            return True
        return self.is_set


class _Open:
    """The services open in this process, for the exit hook and the fork hook.

    A weak set behind a lock: a hub thread drops a service from it when it closes,
    maybe while the exit hook, in another thread, goes through it.
    """

    def __init__(self) -> None:
        self._services: weakref.WeakSet[Service] = weakref.WeakSet()
        self._lock = _allocate_lock()

    def add(self, service: Service) -> None:
        with self._lock:
            self._services.add(service)

    def discard(self, service: Service) -> None:
        with self._lock:
            self._services.discard(service)

    def snapshot(self) -> list[Service]:
        with self._lock:
            return list(self._services)

    def forget_lock(self) -> None:
        """In a forked child: a thread of the parent may have held the lock at the fork."""
        self._lock = _allocate_lock()


_live = _Open()


class _AcceptFailed(gevent.GreenletExit):  # type: ignore[misc]
    """A failed accept(), already logged.  gevent's server backs off on any error
    from do_read (10 ms, doubling to 1 s), and its hub prints no exception of
    the Hub.NOT_ERROR kinds (GreenletExit among them): so the app's logger, not
    stderr, hears of it, once per run of failures."""


class _Server(StreamServer):  # type: ignore[misc]  # gevent ships no type hints
    """gevent's StreamServer, with failed accepts (EMFILE: out of descriptors) logged, and
    the accepted socket left to its handler, which may hand it to a pump that outlives it."""

    log: logging.Logger
    _failing = False

    def do_close(self, *args: Any) -> None:
        pass

    def do_read(self) -> Any:
        try:
            accepted = super().do_read()
        except OSError as exc:
            if self.is_fatal_error(exc):
                raise
            if not self._failing:
                self._failing = True
                self.log.warning("cannot accept on %s: %s; retrying, backing off up to %g s",
                                 self.address, exc.strerror or exc, self.max_delay)
            raise _AcceptFailed() from exc
        if self._failing and accepted:
            self._failing = False
            self.log.warning("accepting on %s again", self.address)
        return accepted


class Connection:
    """One accepted connection, registered with its service until it is over, so that
    close() can end it at any stage: its sockets while it dials, its pump once open."""

    __slots__ = ("_registry", "aborted", "pump", "sockets")

    def __init__(self, registry: set[Connection], *sockets: Any) -> None:
        self._registry = registry
        self.sockets = list(sockets)
        self.pump: Pump | None = None
        self.aborted = False
        registry.add(self)

    def add(self, sock: Any) -> None:
        """One more socket of this connection (while it dials)."""
        self.sockets.append(sock)
        if self.aborted:
            sock.close()

    def open(self, pump: Pump) -> None:
        """The tunnel is open: from now on its pump owns the sockets."""
        self.pump = pump
        self.sockets = pump.sockets()

    def abort(self) -> None:
        self.aborted = True
        if self.pump is not None:
            self.pump.abort("closed with its listener")
        else:
            for sock in self.sockets:
                sock.close()

    def done(self) -> None:
        """Over: nothing of it is left to close."""
        self._registry.discard(self)


class _HubThread:
    """The native thread, with a hub of its own, that serves a plain app's services."""

    _shared: _HubThread | None = None
    _lock = _allocate_lock()

    @classmethod
    def shared(cls) -> _HubThread:
        """The process's one hub thread, started on first use."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    @classmethod
    def forget(cls) -> None:
        """In a forked child: the parent's hub thread does not exist here."""
        cls._lock = _allocate_lock()
        cls._shared = None

    def __init__(self) -> None:
        ready = threading.Event()
        self.hub: Any = None
        thread = threading.Thread(target=self._main, args=(ready,), name="gforward hub",
                                  daemon=True)
        thread.start()
        ready.wait()

    def _main(self, ready: threading.Event) -> None:
        self.hub = gevent.get_hub()
        # A started async watcher keeps the loop from running dry between services.
        self._keepalive = self.hub.loop.async_()
        self._keepalive.start(lambda: None)
        ready.set()
        self.hub.join()

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` in a greenlet of this hub; return, or raise what it raised, in the caller."""
        done = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # handed to the caller's thread
                failure.append(exc)
            finally:
                done.set()

        self.hub.loop.run_callback_threadsafe(gevent.spawn, run)
        done.wait()
        if failure:
            raise failure[0]


class Service:
    """Listening sockets served in one hub, with a lifecycle any thread can drive."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._listening: list[ListeningSocket] = []
        self._servers: list[_Server] = []
        self._connections: set[Connection] = set()
        self._pool: Pool | None = None
        self._closing = False
        self._detached = False  # an inherited copy in a forked child: the parent's, not ours
        self._closed_here: Event | None = None  # for waiters in the hub's thread
        self._closed_anywhere = _Latch()  # for waiters in other threads
        self._hub_thread: int | None = None
        self._hub: Any = None
        self._order = -1

    # Starting -------------------------------------------------------------

    def _open(self, binders: list[Binder]) -> None:
        """Bind and start serving; raises in the caller if any bind fails.

        With `threading` patched, a thread of our own would only be a greenlet of
        the caller's hub, so that case joins the caller's hub openly.
        """
        if (
            gevent.monkey.is_module_patched("socket")
            or gevent.monkey.is_module_patched("threading")
            or gevent.getcurrent().parent is not None
        ):
            self._serve(binders)
        else:
            _HubThread.shared().call(lambda: self._serve(binders))
        self._order = next(_opened)
        _live.add(self)

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
            server = _Server(listening.sock, self._guarded(handler), spawn=self._pool)
            server.log = self._log
            self._servers.append(server)
            server.start()

    def _guarded(self, handler: Handler) -> Handler:
        """The handler, run only while the service is open, and never leaving the accepted
        socket open behind an exception (the server leaves closing it to the handler)."""

        def handle(sock: socket.socket, address: Any) -> None:
            if self._closing:  # accepted just before the close: nobody would end it
                sock.close()
                return
            try:
                handler(sock, address)
            except BaseException:
                sock.close()
                raise

        return handle

    def _log_soon(self, level: int, message: str, *args: Any,
                  exc_info: BaseException | None = None) -> None:
        """Log from a greenlet of its own.  Tunnels end in the hub's callbacks, where a log
        handler must neither block the hub nor switch (a network handler in a patched app
        would, and one that calls close() waits for the hub)."""
        if self._log.isEnabledFor(level):
            gevent.spawn(self._log.log, level, message, *args, exc_info=exc_info)

    # Closing --------------------------------------------------------------

    def close(self) -> None:
        """Stop listening and end every connection; idempotent, from any thread.

        Called from one of our own connection greenlets (a log handler, say),
        it does not wait for that greenlet, which could never end first.  In a
        forked child, an inherited service is already closed (`detached`).
        """
        if not self._detached:
            self._request_close()
            self._await_closed(None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until closed; False if `timeout` seconds passed first."""
        return self._detached or self._await_closed(timeout)

    @property
    def closed(self) -> bool:
        return self._closed_anywhere.is_set

    @property
    def detached(self) -> bool:
        """Whether this is a forked child's copy: closed here, still the parent's to serve."""
        return self._detached

    def _request_close(self) -> None:
        """Start closing without waiting for it, from any thread."""
        if _thread_id() == self._hub_thread:
            # One of our own handlers (a log handler's close(), say) then waits for the
            # others to end, and could never end first: the teardown must not wait for it.
            current = gevent.getcurrent()
            assert self._pool is not None
            if current in self._pool:
                self._pool.discard(current)
            self._begin_close()
        else:
            self._hub.loop.run_callback_threadsafe(self._begin_close)

    def _await_closed(self, timeout: float | None) -> bool:
        if _thread_id() == self._hub_thread:
            assert self._closed_here is not None
            return bool(self._closed_here.wait(timeout))
        return self._closed_anywhere.wait(timeout)

    def _begin_close(self) -> None:
        if not self._closing:
            self._closing = True
            gevent.spawn(self._teardown)

    def _teardown(self) -> None:
        """In the hub: listeners first, so nothing new arrives, then connections."""
        for server in self._servers:
            server.close()
        for listening in self._listening:
            if self._detached:  # a teardown under way when the process forked: not our file
                listening.sock.close()
            else:
                listening.close()
        for connection in list(self._connections):
            connection.abort()
        assert self._pool is not None
        if not self._pool.join(timeout=JOIN_TIMEOUT):
            late = list(self._pool)
            self._log.warning("%d connection(s) did not end in time; killing them", len(late))
            gevent.killall(late, timeout=JOIN_TIMEOUT)
        _live.discard(self)
        assert self._closed_here is not None
        self._closed_here.set()
        self._closed_anywhere.set()

    # Forking --------------------------------------------------------------

    def _detach(self) -> None:
        """In a forked child, first thing: leave this service to the parent.

        Its sockets are the parent's too.  The child's hold on them is dropped
        at once (`_release`), so the parent alone decides when a port is free
        or a local client sees EOF.  If its hub is the forking thread's, that
        hub lives on in the child (gevent re-initialises it after fork): the
        servers are stopped, not-yet-started handlers never start, and the
        running ones see their sockets closed and end, each touching only its
        own closed objects.  Otherwise its hub's thread does not exist here:
        nothing of that hub may run or be touched, not even its loop, whose
        epoll set the parent shares; the service is kept referenced so that
        its greenlets are never collected.
        """
        self._detached = self._closing = True
        _live.discard(self)
        handlers = list(self._pool or ())
        sockets = [listening.sock for listening in self._listening]
        sockets += [sock for connection in self._connections for sock in connection.sockets]
        sockets += [sock for handler in handlers for sock in _accepted_sockets(handler)]
        _release(sockets)
        if self._hub_thread == _thread_id():
            for server in self._servers:
                server.close()
            current = gevent.getcurrent()
            for handler in handlers:
                if handler.gr_frame is None and not handler.dead and handler is not current:
                    handler.kill(block=False)  # spawned, never run: it would find its socket gone
            for connection in list(self._connections):
                connection.abort()
            assert self._closed_here is not None
            self._closed_here.set()
        else:
            _orphans.append(self)
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


def _accepted_sockets(handler: Any) -> list[socket.socket]:
    """The accepted socket a handler greenlet holds before it has run: gevent's servers
    spawn it as (handle, close, (socket, address)), so the socket is one level down."""
    return [item for arg in handler.args if isinstance(arg, tuple)
            for item in arg if isinstance(item, socket.socket)]


def _release(sockets: list[socket.socket]) -> None:
    """Drop this process's hold on sockets it shares with its parent, now.

    Each descriptor is pointed at /dev/null rather than closed, so that its
    number stays taken: the socket objects still own it and will close it some
    day, which must not close a descriptor opened since for something else.
    """
    fds = {sock.fileno() for sock in sockets} - {-1}
    if not fds:
        return
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in fds:
            os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def _detach_inherited() -> None:
    """os.register_at_fork(after_in_child=...): every open service is the parent's."""
    _HubThread.forget()
    _live.forget_lock()
    for service in _live.snapshot():
        try:
            service._detach()
        except Exception:  # an at-fork hook must not fail the fork
            service._log.warning("could not detach an inherited service after fork",
                                 exc_info=True)


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
    """An app that exits with services open must not leave socket files behind.

    Last opened, first closed, as nested `with` blocks would: a forwarder goes
    before the daemon its tunnels lead to (in tests, both live here), so its
    tunnels end as closed rather than as cut.  The wait is bounded, so that a
    hub that cannot run (a log handler stuck in its thread, say) delays the
    exit but never hangs it.
    """
    deadline = time.monotonic() + EXIT_TIMEOUT
    for service in sorted(_live.snapshot(), key=lambda s: s._order, reverse=True):
        service._request_close()
        if not service._await_closed(max(deadline - time.monotonic(), 0.0)):
            service._log.warning("still open %g s after exit began; leaving it", EXIT_TIMEOUT)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_detach_inherited)
