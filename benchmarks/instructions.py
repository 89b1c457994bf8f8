#!/usr/bin/env python3
"""gforward's own CPU work, counted in instructions: small changes, shown despite the noise.

    python benchmarks/instructions.py                 # the working tree
    python benchmarks/instructions.py --base HEAD~3   # ... beside an earlier revision

On a shared machine a timed figure moves by tens of percent from minute to
minute, so a change that saves 5% of the forwarder's CPU cannot be seen in
benchmarks/throughput.py. valgrind's callgrind counts the instructions a
process runs in user space instead: the same count for the same code and
inputs, whatever else the machine does. Two figures, each for the working tree
and, with `--base REV`, for that revision (checked out in a temporary git
worktree) in the same run:

* per small request: a Pump's two events of one 64 B request and its 64 B
  reply (socket pairs, the pump's callbacks called by hand, no event loop),
  less the same socket calls made without a pump ("direct");
* per tunnel: the `gforward` command line's process while it opens, uses
  (a 1-byte echo) and closes tunnels one at a time through the reference
  daemon.

Each is the difference between two runs of different lengths divided by the
difference in operations, so start-up cancels out. Kernel time is not counted
(it is the same recv and send calls either way). Needs valgrind (Debian's
package); about a minute per tree.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
# After PYTHONPATH: the measured child imports gforward from the tree it is given there.
sys.path.append(str(ROOT))

from benchmarks.children import BenchError, Child  # noqa: E402
from benchmarks.columns import free_port  # noqa: E402

TOKEN = "instructions-benchmark-token"
REQUEST = 64


# The measured programs, run under callgrind -----------------------------------------------


def pump_requests(count: int, direct: bool) -> None:
    """`count` request/reply pairs through a Pump (or, `direct`, the same socket calls)."""
    from gforward.proto import frames
    from gforward.proto.records import Counters
    from gforward.proto.tunnel import Tunnel
    from gforward.pump import Pump

    client, plain = socket.socketpair()
    ws, daemon = socket.socketpair()
    plain.setblocking(False)
    ws.setblocking(False)
    reply = frames.encode_frame(frames.OP_BINARY, b"r" * REQUEST, mask=False)
    request = b"q" * REQUEST
    if direct:
        buf = bytearray(256 * 1024)
        masked = frames.encode_frame(frames.OP_BINARY, request, mask=True)
        for _ in range(count):
            client.send(request)
            plain.recv_into(buf)
            ws.send(masked)
            daemon.recv(4096)
            daemon.send(reply)
            ws.recv_into(buf)
            plain.send(memoryview(buf)[2:2 + REQUEST])
            client.recv(4096)
        return
    import gevent

    gevent.get_hub()  # the pump's watchers belong to this thread's loop, which never runs
    pump = Pump(plain, ws, Tunnel(client=True), lambda _: None, (Counters(), Counters()))
    pump.start()
    for _ in range(count):
        client.send(request)
        pump._plain_readable()
        daemon.recv(4096)
        daemon.send(reply)
        pump._ws_readable()
        client.recv(4096)


# Running them ---------------------------------------------------------------------------

START = 120.0  # seconds for a python under callgrind to listen: it starts slowly
STOP = 60.0  # seconds for it to exit on SIGTERM, writing its count as it does


def under_callgrind(name: str, argv: list[str], tree: Path, logdir: Path) -> tuple[Child, Path]:
    """`argv` under callgrind, importing gforward from `tree`: the child and the file its
    count goes to as it exits."""
    out = logdir / f"{name}.callgrind"
    child = Child(name, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
                  logdir, talks=False, env={"PYTHONPATH": str(tree)}, cwd=tree)
    return child, out


def counted(out: Path) -> int:
    """The instruction total callgrind wrote (its "summary:" line)."""
    match = re.search(r"^summary:\s*(\d+)", out.read_text(), re.MULTILINE)
    if match is None:
        raise BenchError(f"no count from callgrind in {out}")
    return int(match.group(1))


def pump_count(tree: Path, count: int, direct: bool, logdir: Path) -> int:
    # This file runs as a script, so that `tree`'s gforward is the one imported, even for a
    # revision from before this file.
    child, out = under_callgrind("pump", [sys.executable, __file__, "--pump-run", str(count),
                                          *(["--direct"] if direct else [])], tree, logdir)
    try:
        status = child.proc.wait()
    finally:
        child.stop(STOP)  # interrupted meanwhile: no callgrind left running
    if status != 0:
        raise BenchError(f"the pump run failed in {tree}{child.log_tail()}")
    return counted(out)


@contextmanager
def echo_guest() -> Iterator[int]:
    """A 1-byte echo guest on loopback, in threads here: its port."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def tunnel_count(tree: Path, count: int, logdir: Path) -> int:
    """Instructions of the forwarder process over `count` tunnels (and its start)."""
    with echo_guest() as guest:
        daemon_port, port = free_port(), free_port()
        daemon = Child("daemon", [sys.executable, "-m", "gforward.daemon", "--listen",
                                  f"127.0.0.1:{daemon_port}", "--token", TOKEN],
                       logdir, talks=False)
        try:
            daemon.wait_listening(daemon_port, START)
            forwarder, out = under_callgrind(
                "forwarder", [sys.executable, "-m", "gforward", "--url",
                              f"http://127.0.0.1:{daemon_port}", "--token", TOKEN,
                              "--ping-interval", "0", "vm",
                              f"127.0.0.1:{port}:127.0.0.1:{guest}"], tree, logdir)
            try:
                forwarder.wait_listening(port, START)
                for _ in range(count):
                    with socket.create_connection(("127.0.0.1", port), 30) as sock:
                        sock.sendall(b"x")
                        if sock.recv(1) != b"x":
                            raise BenchError(f"a tunnel did not echo{forwarder.log_tail()}")
            finally:
                forwarder.stop(STOP)
        finally:
            daemon.stop()
    return counted(out)


def per_operation(measure: Callable[[int], int], small: int, large: int) -> float:
    """(count at `large` - count at `small`) / (large - small): start-up cancels."""
    return (measure(large) - measure(small)) / (large - small)


def figures(tree: Path, requests: int, tunnels: int, logdir: Path) -> dict[str, float]:
    pump = per_operation(lambda n: pump_count(tree, n, False, logdir), requests // 5, requests)
    direct = per_operation(lambda n: pump_count(tree, n, True, logdir), requests // 5, requests)
    return {"request": pump - direct, "tunnel": per_operation(
        lambda n: tunnel_count(tree, n, logdir), tunnels // 5, tunnels)}


@contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """`rev` in a temporary git worktree, removed afterwards."""
    where = Path(tempfile.mkdtemp(prefix="gforward-base."))
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(where), rev], cwd=ROOT,
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT,
                       check=False)
        shutil.rmtree(where, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--base", metavar="REV", help="also count this git revision")
    parser.add_argument("--requests", type=int, default=20000,
                        help="requests in the longer pump run (default 20000)")
    parser.add_argument("--tunnels", type=int, default=500,
                        help="tunnels in the longer setup run (default 500)")
    parser.add_argument("--pump-run", type=int, help=argparse.SUPPRESS)  # the measured child
    parser.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pump_run is not None:
        pump_requests(args.pump_run, args.direct)
        return 0
    if shutil.which("valgrind") is None:
        print("instructions: needs valgrind (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="gforward-instructions.") as logs:
        logdir = Path(logs)  # the children's logs and callgrind's files
        try:
            rows = [("working tree", figures(ROOT, args.requests, args.tunnels, logdir))]
            if args.base:
                with checkout(args.base) as tree:
                    rows.append((args.base, figures(tree, args.requests, args.tunnels, logdir)))
        except BenchError as exc:
            print(f"instructions: {exc}", file=sys.stderr)
            return 1
    print("instructions in user space (callgrind), per operation:")
    labels = {"request": f"pump, one {REQUEST} B request and its reply (less direct)",
              "tunnel": "forwarder process, one tunnel (open, 1-byte echo, close)"}
    for key, label in labels.items():
        cells = [f"{name} {figures_[key]:,.0f}" for name, figures_ in rows]
        if len(rows) > 1:
            cells.append(f"ratio {rows[0][1][key] / rows[1][1][key]:.2f}x")
        print(f"  {label}: " + ", ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
