"""A fork while a connection is accepted but its tunnel not yet open, in a plain process.

In a plain process the forwarder runs in gforward's hub thread, which a forked
child does not have: nothing of that hub runs there, so whatever the child does
not release at once it holds until it exits.  Two moments matter:

- greenlet: the daemon is named by a host name, so its dial runs in a greenlet;
  the listener has accepted a connection and spawned that greenlet, which has
  not run yet.  To fork exactly then, the forwarder's pool's spawn is wrapped so
  that the hub thread waits there until the main thread has forked.
- hub: the daemon is at an IP address, so the hub's callbacks dial it; the fork
  comes once the (silent) daemon has accepted that dial, while the upgrade's
  answer is awaited.  The child must let go of the dialled socket too: the
  daemon sees its end when the parent closes.
- daemon: the reference daemon, whose handler greenlet (held as in "greenlet")
  has the accepted socket among its arguments and nowhere else yet.

The child must have let go of the accepted socket: when the parent closes the
forwarder (or daemon), its client sees the end at once, though the child lives
on.  Exit 0 only if it does.

    python tests/apps/fork_pending.py greenlet|hub|daemon
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import warnings
from typing import Any, Callable

import support

import gforward
import gforward.daemon

# Python 3.12+ warns on fork() in a process with threads (the hub thread): the point here.
warnings.filterwarnings("ignore", r".*use of fork\(\) may lead to deadlocks",
                        DeprecationWarning)


def held_after_spawn(spawn: Callable[..., Any], spawned: threading.Event,
                     forked: threading.Event) -> Callable[..., Any]:
    """`spawn`, after which the hub thread waits until the main thread has forked."""

    def wrapper(*args: Any) -> Any:
        handler = spawn(*args)
        spawned.set()
        forked.wait(10)
        return handler

    return wrapper


def main(moment: str) -> int:
    support.watchdog(30)
    problems: list[str] = []
    silent = socket.socket()  # a daemon that accepts and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    service: Any
    if moment == "daemon":
        service = gforward.daemon.start()
        port = int(service.url.rsplit(":", 1)[1])
    else:
        host = "localhost" if moment == "greenlet" else "127.0.0.1"
        service = gforward.start(base_url=f"http://{host}:{silent.getsockname()[1]}",
                                 vm_name="fork", specs=["127.0.0.1:0:127.0.0.1:9"])
        port = service.listeners[0].port
    spawned, forked = threading.Event(), threading.Event()
    if moment == "hub":
        forked.set()
    else:
        service._pool.spawn = held_after_spawn(service._pool.spawn, spawned, forked)
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    dialled = None
    if moment != "hub":
        if not spawned.wait(10):
            problems.append("the connection was never accepted")
            return support.verdict(problems)
    else:
        silent.settimeout(10)
        dialled, _ = silent.accept()
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:
        mine.close()
        theirs.sendall(b"R")  # ready
        theirs.recv(1)  # lives until the parent is done
        os._exit(0)
    theirs.close()
    forked.set()
    try:
        mine.settimeout(10)
        mine.recv(1)
        time.sleep(0.1)  # the parent's greenlet (if held) runs
        began = time.monotonic()
        service.close()
        end = support.ending(client, 5)
        support.say(f"forked with a connection not yet open ({moment}); closed while the "
                    f"child lives: the client saw {end} {support.elapsed(began)} after close()")
        if end not in ("eof", "reset") or time.monotonic() - began > 2:
            problems.append("the child held the accepted connection open")
        if dialled is not None and support.ending(dialled, 2) not in ("eof", "reset"):
            problems.append("the child held the dialled connection open")
    finally:
        mine.close()  # the child's recv() returns: it exits
        os.waitpid(pid, 0)
        service.close()
        client.close()
        if dialled is not None:
            dialled.close()
        silent.close()
    return support.verdict(problems)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
