"""Load: a thousand tunnels at once, nothing lost, twisted or left behind.

One thread drives every client and guest socket (the load generator's
benchmarks.loadloop.StreamLoop) and the reference daemon runs in a process of
its own: the forwarder under test shares this interpreter only with that
thread, and the run fits two cores.

"Left behind" is counted twice: file descriptors in /proc/self/fd, and
greenlet objects found by a garbage-collector scan (every greenlet of the
forwarder's hub is one, the hub itself included).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import greenlet
import pytest

import gforward
from benchmarks.loadloop import Rotations, Stream, StreamLoop
from tests.peers.fake_daemon import FakeDaemon, Peer
from tests.peers.programs import daemon_process
from tests.peers.server import reset_on_close

TUNNELS = 1000
SIZE = 1 << 20  # bytes each way per tunnel
BUSY = 100  # tunnels streaming both ways when close() is called
CLOSE_BOUND = 2.0  # seconds close() may take with them
LOAD_BLOCK = 64 * 1024  # what a busy tunnel's ends send, over and over
# Descriptors this process needs at the peak: per tunnel the client's socket, the
# guest's, and the forwarder's two (local + daemon); the rest is slack.
NEEDED_FDS = 4 * TUNNELS + 500
# What a closed forwarder may leave: its hub thread's Hub and main greenlet, both
# dead. greenlet frees a finished thread's greenlets lazily, from another thread,
# so the last hub's pair is still found by the scan right after close().
HUB_THREAD_GREENLETS = 2
SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"


@dataclass
class Holdings:
    """What the process holds: open descriptors (fd -> target) and greenlet objects."""

    fds: dict[int, str]
    live_greenlets: int
    greenlets: int


def holdings() -> Holdings:
    """Taken alike before and after; the calling thread's own main greenlet (which
    start() brings into being when it asks which greenlet it runs in) counts in both."""
    greenlet.getcurrent()
    gc.collect()
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own fd, closed by now
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    found = [o for o in gc.get_objects() if isinstance(o, greenlet.greenlet)]
    if os.environ.get("GF_DEBUG_GREENLETS"):
        print([(type(g).__name__, g.dead) for g in found])
    return Holdings(fds, sum(not g.dead for g in found), len(found))


def assert_nothing_left(before: Holdings, after: Holdings) -> None:
    extra = {fd: what for fd, what in after.fds.items() if before.fds.get(fd) != what}
    assert not extra, f"descriptors left open: {extra}"
    assert after.live_greenlets <= before.live_greenlets, (before, after)
    assert after.greenlets <= before.greenlets + HUB_THREAD_GREENLETS, (before, after)


@pytest.fixture(scope="module")
def nofile() -> Iterator[None]:
    """RLIMIT_NOFILE raised to the hard limit for this module (and the daemon it starts)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NEEDED_FDS:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {NEEDED_FDS} needed")
    resource.setrlimit(resource.RLIMIT_NOFILE,
                       (hard if hard != resource.RLIM_INFINITY else 1 << 16, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module", autouse=True)
def first_forwarder() -> None:
    """One forwarder started and closed before any test here counts: the first in a
    process leaves an epoll and an eventfd open for good (a one-time cost, not a leak per
    forwarder), which made a test that counted from there fail when run alone."""
    with socket.socket() as guest:
        guest.bind(("127.0.0.1", 0))
        forward_to("http://127.0.0.1:9", guest).close()


@pytest.fixture(scope="module")
def daemon_url(nofile: None) -> Iterator[str]:
    with daemon_process() as url:
        yield url


@pytest.fixture
def guest_listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(TUNNELS + 24)
    try:
        yield sock
    finally:
        sock.close()


def forward_to(daemon_url: str, guest: socket.socket) -> gforward.Forwarder:
    port = guest.getsockname()[1]
    return gforward.start(base_url=daemon_url, vm_name="load",
                          specs=[f"127.0.0.1:0:127.0.0.1:{port}"])


@pytest.mark.timeout(150)
def test_1000_tunnels_each_moving_1_mib_both_ways(
    daemon_url: str, guest_listener: socket.socket
) -> None:
    """All at once (the guest answers no one before all 1,000 have arrived, and shuts its
    side only after the client's: a WebSocket cannot carry a guest's half-close while the
    client still sends), sha256 each way per tunnel; then close() leaves no descriptor and
    no greenlet behind."""
    up, down = Rotations(SIZE), Rotations(SIZE)
    guests: list[Stream] = []

    def guest(sock: socket.socket) -> Stream:
        def answer(stream: Stream, head: bytes) -> None:
            (i,) = struct.unpack("!Q", head)
            stream.send_later([down[i]])

        stream = Stream(sock, prefix=8, on_head=answer, hold=len(guests) + 1 < TUNNELS,
                        shut_after_eof=True)
        guests.append(stream)
        if len(guests) == TUNNELS:
            loop.release()
        return stream

    with StreamLoop() as loop:
        loop.listen(guest_listener, guest)
        before = holdings()
        fwd = forward_to(daemon_url, guest_listener)
        try:
            address = ("127.0.0.1", fwd.listeners[0].port)
            began = time.monotonic()
            clients = [loop.connect(address, [struct.pack("!Q", i), up[i]])
                       for i in range(TUNNELS)]
            finished = loop.run(lambda: len(guests) == TUNNELS and not loop.open_streams, 120)
            took = time.monotonic() - began
        finally:
            fwd.close()
        outcomes = {(c.outcome, c.sent, c.received) for c in clients}
        assert finished, (f"{loop.open_streams} streams still open, "
                          f"{len(guests)} tunnels reached the guest; clients: {outcomes}")
    print(f"\n{TUNNELS} tunnels x {SIZE >> 20} MiB each way: {took:.1f} s")
    assert outcomes == {("EOF", SIZE + 8, SIZE)}, outcomes
    for i, client in enumerate(clients):
        assert client.digest.hexdigest() == down.digest(i), f"tunnel {i}: wrong bytes down"
    ids = sorted(struct.unpack("!Q", g.head)[0] for g in guests)
    assert ids == list(range(TUNNELS)), "a client reached the guest twice, or never"
    for g in guests:
        (i,) = struct.unpack("!Q", g.head)
        assert (g.outcome, g.received) == ("EOF", SIZE), (i, g.outcome, g.received)
        assert g.digest.hexdigest() == up.digest(i), f"tunnel {i}: wrong bytes up"
    assert_nothing_left(before, holdings())


@pytest.mark.timeout(60)
def test_close_with_100_busy_tunnels_returns_within_2_s(
    daemon_url: str, guest_listener: socket.socket
) -> None:
    """Every tunnel streams both ways (the guest too) when close() is called from another
    thread; close() returns in time and every client sees its tunnel end by then."""
    block = os.urandom(LOAD_BLOCK)
    guests: list[Stream] = []

    def guest(sock: socket.socket) -> Stream:
        guests.append(Stream(sock, [block], repeat=True))
        return guests[-1]

    with StreamLoop() as loop:
        loop.listen(guest_listener, guest)
        fwd = forward_to(daemon_url, guest_listener)
        address = ("127.0.0.1", fwd.listeners[0].port)
        clients = [loop.connect(address, [block], repeat=True) for _ in range(BUSY)]

        def busy() -> bool:
            return all(c.received >= 4 * LOAD_BLOCK and c.sent >= 4 * LOAD_BLOCK
                       for c in clients) and all(g.received >= 4 * LOAD_BLOCK for g in guests)

        closed = threading.Event()
        worker = threading.Thread(target=loop.run, daemon=True, args=(
            lambda: closed.is_set() and not loop.open_streams, 40))
        try:
            worker.start()
            deadline = time.monotonic() + 30
            while not busy():
                assert time.monotonic() < deadline, "the tunnels never all carried data"
                assert worker.is_alive()
                time.sleep(0.05)
            began = time.monotonic()
            fwd.close()
            took = time.monotonic() - began
            closed.set()
            worker.join(30)
        finally:
            fwd.close()
            loop.stop()
            closed.set()
            worker.join(30)
        assert not worker.is_alive(), f"{loop.open_streams} streams never ended"
    ends = [c.ended - began for c in clients if c.ended is not None]
    print(f"\nclose() with {BUSY} busy tunnels: {took:.3f} s; the last client saw its end "
          f"{max(ends):.3f} s after close() began")
    assert took < CLOSE_BOUND, f"close() took {took:.2f} s with {BUSY} busy tunnels"
    seen = {c.outcome for c in clients}
    assert seen <= {"EOF", "reset", "broken pipe"}, seen
    late = [t for t in ends if t > took + 1]
    assert len(ends) == BUSY and not late, f"clients saw the end {late} s after close() began"


def _refuse(peer: Peer) -> None:
    peer.read_request()
    peer.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")


def _upgrade_then_break(peer: Peer) -> None:
    peer.read_request()
    peer.accept()
    peer.send(b"\x82\x05hello\x83\x00")  # data, then an unknown opcode: a protocol error


def _upgrade_then_drop(peer: Peer) -> None:
    peer.read_request()
    peer.accept()
    peer.send(b"\x82\x7e\x10\x00partial")  # 4096 bytes announced, 7 sent, then gone


def _upgrade_then_read(peer: Peer) -> None:
    peer.read_request()
    peer.accept()
    peer.send(b"\x82\x05hello")
    peer.wait_eof()


@pytest.mark.timeout(60)
def test_failed_tunnels_leave_nothing_behind() -> None:
    """Refusals, protocol errors, dropped daemons and clients that reset, 50 of each."""
    rounds = 50
    scripts = [_refuse, _upgrade_then_break, _upgrade_then_drop, _upgrade_then_read]
    before = holdings()
    with FakeDaemon(*scripts * rounds) as fake:
        fwd = gforward.start(base_url=fake.url, vm_name="leaks", dial_timeout=5,
                             specs=["127.0.0.1:0:127.0.0.1:9"])
        try:
            address = ("127.0.0.1", fwd.listeners[0].port)
            for _ in range(rounds):
                for script in scripts:
                    try:
                        sock = socket.create_connection(address, timeout=10)
                    except ConnectionResetError:
                        # A tunnel cut (a protocol error, a dropped daemon) may end before
                        # connect() returns here: the client sees the reset from connect.
                        assert script is not _upgrade_then_read
                        continue
                    with sock:
                        if script is _upgrade_then_read:  # the client resets mid-stream
                            sock.recv(5)
                            sock.sendall(b"unread by anyone")
                            reset_on_close(sock)
                        else:
                            _until_end(sock)
        finally:
            fwd.close()
    assert_nothing_left(before, holdings())


def _until_end(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


@pytest.mark.timeout(60)
def test_repeated_start_and_close_leave_nothing_behind(daemon_url: str) -> None:
    """A forwarder's fixed overhead is freed by the next one: five in a row hold no more."""
    with socket.socket() as guest:
        guest.bind(("127.0.0.1", 0))
        guest.listen(8)
        forward_to(daemon_url, guest).close()  # imports and one-time caches
        before = holdings()
        for _ in range(5):
            with forward_to(daemon_url, guest) as fwd, socket.create_connection(
                ("127.0.0.1", fwd.listeners[0].port), timeout=10
            ) as sock:
                guest.settimeout(10)
                accepted, _ = guest.accept()  # the tunnel reached the guest: fully open
                accepted.close()
                _until_end(sock)
    assert_nothing_left(before, holdings())


@pytest.mark.timeout(60)
def test_soak_benchmark_runs(tmp_path: Path) -> None:
    """benchmarks/soak.py (a minute, by hand) must not rot: three seconds of it here."""
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--seconds", "3", "--sample", "1", "--concurrency", "16",
         "--json", str(out)],
        capture_output=True, text=True, timeout=50, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["tunnels"] > 0 and report["error_count"] == 0, report
    assert report["rss_start_kib"] > 0 and report["rss_end_kib"] > 0
    assert report["fds_end"] == report["fds_start"], report
    assert "| forwarder RSS end |" in proc.stdout
