"""What a forked child does with the services it inherits: lets go of them at once.

A child inherits copies of every open service, sharing the parent's listening
and tunnel sockets.  Those belong to the parent, so right after the fork the
child drops its hold on the sockets (the parent's port or unix file is not
held open by the child, and a tunnel's EOF is not delayed by it), serves
nothing of them, and treats them as closed, without touching the parent's
files or hub.  `on_fork` registers what detaches one service.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from gevent import socket

from .hub import HubThread

_hooks: list[Callable[[], None]] = []
_orphans: list[Any] = []  # detached services whose hub is gone: their greenlets never freed


def on_fork(hook: Callable[[], None]) -> None:
    """Run `hook` in every forked child, right after the fork."""
    _hooks.append(hook)


def keep(service: Any) -> None:
    """Hold a detached service for ever: its hub's thread does not exist in the child, so
    nothing of that hub may run, not even the collection of its greenlets."""
    _orphans.append(service)


def release(sockets: list[Any]) -> None:
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


def accepted_sockets(handler: Any) -> list[socket.socket]:
    """The accepted socket a handler greenlet holds before it has run (Service._accept
    spawns it with the socket among its arguments)."""
    return [arg for arg in handler.args if isinstance(arg, socket.socket)]


def _after_fork_in_child() -> None:
    HubThread.forget()
    for hook in _hooks:
        hook()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)
