"""Several forwarders in one process, started and closed from different threads, in any order.

Six forwarders (a TCP and a unix listener each, to an echo guest) are
started at the same time from six threads, which then end.  Each gets an
open tunnel and a thread blocked in wait(30).  They are closed in a shuffled
order by threads that did not start them: the first half one by one, each by
two threads calling close() at the same moment, checking after each that the
others still carry data; the rest all at once, two closing threads each.
After every close(), each closing thread sees it closed, the port free and
the unix socket file gone; the waiting thread returns True; the open tunnel
ends.  At the end no hub thread is left (a plain process has one per
forwarder, a patched one none).

    python tests/apps/many_forwarders.py plain|patched [SEED]

Prints what it checked; exit 0 only if every check held.
"""

import sys

if sys.argv[1] == "patched":
    from gevent import monkey

    monkey.patch_all()

import os
import random
import socket
import tempfile
import threading
import time

import gevent.monkey
import support

import gforward
import gforward.daemon

COUNT = 6
say = support.say
one_probe_at_a_time = threading.Lock()  # two probes binding one port at once would clash


class Subject:
    """One forwarder under test, with its open tunnel and the thread waiting on it."""

    def __init__(self, index: int, fwd: gforward.Forwarder, started_in: str) -> None:
        self.index = index
        self.fwd = fwd
        self.started_in = started_in
        self.port = fwd.listeners[0].port
        self.unix = fwd.listeners[1].local
        self.tunnel = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        support.exchange(self.tunnel, b"open tunnel %d" % index)
        self.waited: list[tuple[bool, float]] = []
        self.waiter = threading.Thread(target=self._wait, name=f"waiter {index}")
        self.waiter.start()

    def _wait(self) -> None:
        self.waited.append((self.fwd.wait(30), time.monotonic()))

    def echoes(self) -> bool:
        """Whether both listeners still carry data."""
        payload = os.urandom(50_000)
        for family, where in ((socket.AF_INET, ("127.0.0.1", self.port)),
                              (socket.AF_UNIX, self.unix)):
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(where)
                support.exchange(sock, payload)
        return True

    def closers(self, seen: list[str]) -> list[threading.Thread]:
        """Two threads that will call close() at the same moment, and record what they saw."""
        go = threading.Barrier(2, timeout=10)

        def close() -> None:
            go.wait()
            self.fwd.close()
            closed, file_left = self.fwd.wait(0), os.path.lexists(self.unix)
            with one_probe_at_a_time:
                port_free = support.can_bind(self.port)
            seen.append(f"{self.index}: closed={closed} port_free={port_free} "
                        f"file_left={file_left} by {threading.current_thread().name}")

        return [threading.Thread(target=close, name=f"closer {self.index}{side}")
                for side in "ab"]

    def after_close(self, closed_at: float) -> list[str]:
        """What is wrong once close() returned in both closing threads."""
        problems = []
        self.waiter.join(10)
        if not self.waited or not self.waited[0][0]:
            problems.append(f"{self.index}: wait(30) in a third thread gave {self.waited}")
        elif self.waited[0][1] - closed_at > 2:
            problems.append(f"{self.index}: wait() returned {self.waited[0][1] - closed_at:.1f}"
                            " s after close()")
        end = support.ending(self.tunnel, 10)
        self.tunnel.close()
        if end not in ("eof", "reset"):
            problems.append(f"{self.index}: the open tunnel saw {end}")
        return problems


def start_all(daemon_url: str, echo: str, tmp: str) -> list[Subject]:
    """Start COUNT forwarders at the same time, each from a thread of its own."""
    go = threading.Barrier(COUNT, timeout=10)
    made: dict[int, tuple[gforward.Forwarder, str]] = {}

    def starter(i: int) -> None:
        go.wait()
        fwd = gforward.start(base_url=daemon_url, vm_name=f"vm-{i}",
                             specs=[f"127.0.0.1:0:{echo}", f"{tmp}/f{i}.sock:{echo}"])
        made[i] = (fwd, threading.current_thread().name)

    support.run_threads(starter, COUNT, "starter", 20)
    assert sorted(made) == list(range(COUNT)), f"started only {sorted(made)}"
    return [Subject(i, *made[i]) for i in range(COUNT)]


def close_together(subjects: list[Subject]) -> list[str]:
    """Close these forwarders at the same time, two threads each; returns what went wrong."""
    seen: list[str] = []
    threads = [t for subject in subjects for t in subject.closers(seen)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    closed_at = time.monotonic()
    problems = [f"close() did not return in {t.name}" for t in threads if t.is_alive()]
    problems += [line for line in seen if "closed=True port_free=True file_left=False" not in line]
    if len(seen) != len(threads):
        problems.append(f"{len(threads)} closing threads, {len(seen)} reports: {seen}")
    for subject in subjects:
        problems += subject.after_close(closed_at)
    return problems


def main() -> int:
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else random.randrange(10_000)
    support.watchdog(40)
    say(f"patched: {gevent.monkey.is_module_patched('socket')}")
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="gf-", dir="/tmp") as tmp, \
            support.echo_guest() as echo, gforward.daemon.start() as daemon:
        subjects = start_all(daemon.url, echo, tmp)
        started_in = {subject.started_in for subject in subjects}
        assert all(subject.echoes() for subject in subjects)
        hubs = sum(t.name.startswith("gforward") for t in threading.enumerate())
        say(f"{COUNT} forwarders started at once from {len(started_in)} threads "
            f"(now ended), {hubs} hub threads; each carries data over TCP and unix")
        order = list(range(COUNT))
        random.Random(seed).shuffle(order)
        say(f"close order (seed {seed}): {order}")
        for probe in subjects:
            early = probe.fwd.wait(0.05)
            if early:
                problems.append(f"{probe.index}: wait(0.05) returned True before close()")
        one_by_one, together = order[: COUNT // 2], order[COUNT // 2 :]
        for index in one_by_one:
            problems += close_together([subjects[index]])
            still = [s for s in subjects if not s.fwd.wait(0)]
            assert all(s.echoes() for s in still)
            say(f"forwarder {index} closed by two threads at once; wait(30) in a third "
                f"returned True; its open tunnel ended; the other {len(still)} still carry data")
        problems += close_together([subjects[i] for i in together])
        say(f"forwarders {together} closed at the same time by {2 * len(together)} threads")
    # One shared "gforward hub" thread serves a plain process's forwarders and stays,
    # idle, after they close; no other gforward thread may be left.
    gforward_threads = [t.name for t in threading.enumerate() if t.name.startswith("gforward")]
    hub_threads = [name for name in gforward_threads if name != "gforward hub"]
    say(f"hub threads left after closing: {len(hub_threads)}")
    if hub_threads or len(gforward_threads) > 1:
        problems.append(f"gforward threads left: {gforward_threads}")
    return support.verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
