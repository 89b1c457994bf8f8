"""Which hub a service runs in, and how any thread reaches it.

In a process that gevent has patched, or when called from inside a greenlet,
services join the caller's hub, as the app's other greenlets do.  In a plain
process they run in "gforward hub", a native thread with a hub of its own, so
the app's blocking calls never starve them.  One such thread serves every
service of the process and lives as long as it does: gevent never frees the
hub of a thread that ended, so a thread per forwarder would leak one each time.

Objects of a hub must only be touched from its own thread: other threads
cross with `loop.run_callback_threadsafe` and wait on a real lock (a gevent
Event only wakes greenlets of its own hub).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

import gevent
import gevent.monkey

T = TypeVar("T")
allocate_lock = gevent.monkey.get_original("_thread", "allocate_lock")
thread_id = gevent.monkey.get_original("_thread", "get_ident")  # per OS thread, even patched


class Latch:
    """Set once, awaited from any thread: a real lock held until `set()`."""

    def __init__(self) -> None:
        self._lock = allocate_lock()
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


class HubThread:
    """The native thread, with a hub of its own, that serves a plain app's services."""

    _shared: HubThread | None = None
    _lock = allocate_lock()

    @classmethod
    def shared(cls) -> HubThread:
        """The process's one hub thread, started on first use."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    @classmethod
    def forget(cls) -> None:
        """In a forked child: the parent's hub thread does not exist here."""
        cls._lock = allocate_lock()
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


def settle(timeout: float) -> None:
    """Wait, up to `timeout` seconds, until the hub thread (if any) has run what it was
    given so far and can go back to waiting.  At exit: a daemon thread that runs
    Python once the interpreter finalizes is cut short in the middle, and a greenlet's
    stack does not survive that (a crash)."""
    shared = HubThread._shared
    if shared is None or is_mine(shared.hub):
        return
    done = Latch()
    shared.hub.loop.run_callback_threadsafe(done.set)  # after every callback queued before
    done.wait(timeout)


def home() -> Any:
    """The hub a service started now belongs to (see the module's docstring).

    With `threading` patched, a thread of our own would only be a greenlet of
    the caller's hub, so that case joins the caller's hub openly.
    """
    if (
        gevent.monkey.is_module_patched("socket")
        or gevent.monkey.is_module_patched("threading")
        or gevent.getcurrent().parent is not None
    ):
        return gevent.get_hub()
    return HubThread.shared().hub


def is_shared(hub: Any) -> bool:
    """Whether `hub` is the one of the "gforward hub" thread (a plain process's)."""
    shared = HubThread._shared
    return shared is not None and hub is shared.hub


def is_mine(hub: Any) -> bool:
    """Whether the calling thread is `hub`'s own, where its objects may be touched."""
    return bool(hub.thread_ident == thread_id())


def run_in(hub: Any, fn: Callable[[], T]) -> T:
    """`fn()` run in a greenlet of `hub`, its result (or exception) handed to the caller,
    whatever thread that is.  In the hub's own thread it simply runs in the caller."""
    if is_mine(hub):
        return fn()
    done = Latch()
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:  # handed to the caller's thread
            outcome.append((False, exc))
        finally:
            done.set()

    hub.loop.run_callback_threadsafe(gevent.spawn, run)
    done.wait(None)
    ok, value = outcome[0]
    if not ok:
        raise value
    result: T = value
    return result


def soon(hub: Any, fn: Callable[[], object]) -> None:
    """`fn()` started in a greenlet of `hub`, from any thread, without waiting for it."""
    if is_mine(hub):
        gevent.spawn(fn)
    else:
        hub.loop.run_callback_threadsafe(gevent.spawn, fn)
