"""A pre-fork server: forwarders started in the parent, then workers forked.

This is what gunicorn's sync worker model does with anything started at
import time or in the master.  The parent starts the reference daemon and a
forwarder (a TCP and a unix listener to an HTTP guest, one to an echo guest
with a tunnel open through it; the guests run in a process of their own),
then forks WORKERS children.  Each child:

* finds the inherited forwarder and daemon detached: closed as far as the
  child goes, wait() true at once, close() returning at once and leaving the
  parent's unix socket file alone;
* holds no descriptor of the parent's gforward sockets (/proc/self/fd);
* fetches through the parent's forwarder, which the parent goes on serving;
* starts, uses and closes a forwarder of its own, and leaves another one
  open, which its exit hook closes when it exits (normally, via sys.exit).

Meanwhile the parent's open tunnel still carries data, its forwarder still
serves, and closing it while the children live frees the port, removes the
unix file and ends the open tunnel at once: no child holds any of them.
Prints what it checked (children prefix their lines); exit 0 only if the
parent's and every child's checks held.

    python tests/apps/prefork.py plain|patched DIR
"""

import sys

if sys.argv[1] == "patched":
    from gevent import monkey

    monkey.patch_all()

import contextlib
import os
import socket
import time
import warnings

import gevent.monkey
import support

import gforward
import gforward.daemon
from gforward.service import Service

WORKERS = 2
say = support.say
# Python 3.12+ warns on fork() in a process with threads, as a plain app with a forwarder
# open is (its hub thread, here also the daemon's): forking such an app is the point here.
warnings.filterwarnings("ignore", r".*use of fork\(\) may lead to deadlocks",
                        DeprecationWarning)


def gforward_inodes(*services: Service) -> set[int]:
    """Inodes of the sockets these services hold: listeners and tunnels (private state)."""
    sockets = [door.bound.sock for s in services for door in s._doors]
    sockets += [sock for s in services for door in s._doors for c in door.connections
                for sock in c.sockets]
    return {os.fstat(sock.fileno()).st_ino for sock in sockets if sock.fileno() >= 0}


class Parent:
    """What the parent made before forking, and what a child needs to know of it."""

    def __init__(self, tmp: str) -> None:
        self.tmp = tmp
        self.guests = support.GuestProcess()
        self.guest, self.echo = self.guests.http, self.guests.echo
        self.daemon = gforward.daemon.start()
        self.unix = os.path.join(tmp, "parent.sock")
        self.fwd = gforward.start(base_url=self.daemon.url, vm_name="prefork", specs=[
            f"127.0.0.1:0:{self.guest}", f"{self.unix}:{self.guest}", f"127.0.0.1:0:{self.echo}"])
        self.port = self.fwd.listeners[0].port
        support.fetch(self.port, 1, 10_000)
        support.fetch(self.unix, 2, 10_000)
        self.tunnel = socket.create_connection(("127.0.0.1", self.fwd.listeners[2].port),
                                               timeout=10)
        support.exchange(self.tunnel, b"before fork")
        self.inherited = gforward_inodes(self.fwd, self.daemon)


def worker(n: int, parent: Parent, line: socket.socket) -> int:
    """A forked child's life; returns its exit status."""
    support.watchdog(20)
    problems = []

    def check(ok: bool, what: str) -> None:
        say(f"child {n}: {what}: {'yes' if ok else 'NO'}")
        if not ok:
            problems.append(what)

    fwd, daemon = parent.fwd, parent.daemon
    check(fwd.detached and daemon.detached and fwd.closed and fwd.wait(0) and fwd.wait(),
          "inherited forwarder and daemon are detached, closed here, wait() true at once")
    began = time.monotonic()
    fwd.close()
    daemon.close()
    check(time.monotonic() - began < 0.5 and os.path.exists(parent.unix),
          "close() of the inherited ones returns at once and leaves the parent's unix file")
    held = support.socket_inodes() & parent.inherited
    check(not held, f"holds none of the parent's {len(parent.inherited)} gforward sockets")
    support.fetch(parent.port, 100 + n, 50_000)
    support.fetch(parent.unix, 200 + n, 50_000)
    check(True, "fetched through the parent's forwarder, TCP and unix")
    own_unix = os.path.join(parent.tmp, f"child-{n}.sock")
    with gforward.start(base_url=daemon.url, vm_name=f"worker-{n}",
                        specs=[f"127.0.0.1:0:{parent.guest}", f"{own_unix}:{parent.guest}"]) as own:
        support.fetch(own.listeners[0].port, 300 + n, 50_000)
        support.fetch(own_unix, 400 + n, 50_000)
    check(not os.path.lexists(own_unix) and support.can_bind(own.listeners[0].port),
          "started, used and closed a forwarder of its own")
    left = gforward.start(base_url=daemon.url, vm_name=f"worker-{n}-left",
                          specs=[f"{parent.tmp}/child-{n}-left.sock:{parent.guest}"])
    support.fetch(left.listeners[0].local, 500 + n, 50_000)
    line.sendall(b"F" if problems else b"R")  # ready
    line.recv(1)  # the parent is done: exit, with `left` still open
    return 1 if problems else 0


def main() -> int:
    support.watchdog(40)
    tmp = sys.argv[2]
    say(f"patched: {gevent.monkey.is_module_patched('socket')}")
    parent_pid = os.getpid()
    parent = Parent(tmp)
    children: dict[int, socket.socket] = {}
    problems: list[str] = []
    try:
        for n in range(WORKERS):
            mine, theirs = socket.socketpair()
            pid = os.fork()
            if pid == 0:
                mine.close()
                sys.exit(worker(n, parent, theirs))  # runs the exit hooks, as a worker's exit does
            theirs.close()
            children[pid] = mine
        say(f"forked {WORKERS} workers after start()")
        for line in children.values():
            line.settimeout(20)
            if line.recv(1) != b"R":
                problems.append("a child's checks failed")
        support.exchange(parent.tunnel, b"after fork")
        support.fetch(parent.port, 3, 100_000)
        support.fetch(parent.unix, 4, 100_000)
        say(f"parent: forwarder not detached ({not parent.fwd.detached}); its tunnel open before"
            " the forks still carries data; it still serves TCP and unix")
        began = time.monotonic()
        parent.fwd.close()
        freed = support.can_bind(parent.port) and not os.path.lexists(parent.unix)
        end = support.ending(parent.tunnel, 5)
        say(f"parent: closed while the workers live: port free and unix file gone: {freed}; "
            f"its open tunnel ended: {end}, {support.elapsed(began)} after close()")
        if not freed or end not in ("eof", "reset") or time.monotonic() - began > 2:
            problems.append("the parent's close() was held up by a child")
        for line in children.values():
            with contextlib.suppress(OSError):  # a child that died early
                line.sendall(b"G")  # go: exit
        for pid in list(children):
            _, status = os.waitpid(pid, 0)
            children.pop(pid).close()
            if status != 0:
                problems.append(f"child {pid} exited with status {status:#x}")
        left = [f"child-{n}-left.sock" for n in range(WORKERS)
                if os.path.lexists(os.path.join(tmp, f"child-{n}-left.sock"))]
        say(f"parent: workers exited 0: {not problems}; their exit hooks removed the unix files"
            f" of the forwarders they left open: {not left}")
        if left:
            problems.append(f"left behind by the children: {left}")
    finally:
        if os.getpid() == parent_pid:
            for pid in children:  # only after a failure: nothing is left waiting for them
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            parent.fwd.close()
            parent.daemon.close()
            parent.guests.stop()
    return support.verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
