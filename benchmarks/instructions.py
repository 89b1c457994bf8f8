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
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
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


def callgrind(argv: list[str], tree: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """`argv` under callgrind, importing gforward from `tree`; the process and its count file."""
    handle, name = tempfile.mkstemp(prefix="callgrind.")
    os.close(handle)
    out = Path(name)
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
        env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, out


def counted(out: Path) -> int:
    """The instruction total callgrind wrote (its "summary:" line), and the file gone."""
    try:
        match = re.search(r"^summary:\s*(\d+)", out.read_text(), re.MULTILINE)
    finally:
        out.unlink(missing_ok=True)
    if match is None:
        raise SystemExit(f"instructions: no count from callgrind in {out}")
    return int(match.group(1))


def pump_count(tree: Path, count: int, direct: bool) -> int:
    # This file runs as a script, so that `tree`'s gforward is the one imported, even for a
    # revision from before this file.
    proc, out = callgrind([sys.executable, __file__, "--pump-run", str(count)]
                          + (["--direct"] if direct else []), tree)
    try:
        failed = proc.wait() != 0
    finally:
        stop(proc)  # interrupted meanwhile: no callgrind left running
    if failed:
        out.unlink(missing_ok=True)
        raise SystemExit(f"instructions: the pump run failed in {tree}")
    return counted(out)


def stop(proc: subprocess.Popen[bytes], grace: float = 60.0) -> None:
    """End `proc` (SIGTERM, then SIGKILL after `grace` seconds) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120  # a python under callgrind starts slowly
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), 1.0).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"instructions: {what} did not listen on port {port}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tunnel_count(tree: Path, count: int) -> int:
    """Instructions of the forwarder process over `count` tunnels (and its start)."""
    with echo_guest() as guest:
        daemon_port, port = free_port(), free_port()
        daemon = subprocess.Popen(
            [sys.executable, "-m", "gforward.daemon", "--listen", f"127.0.0.1:{daemon_port}",
             "--token", TOKEN], env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(daemon_port, daemon, "the daemon")
            proc, out = callgrind(
                [sys.executable, "-m", "gforward", "--url", f"http://127.0.0.1:{daemon_port}",
                 "--token", TOKEN, "--ping-interval", "0", "vm",
                 f"127.0.0.1:{port}:127.0.0.1:{guest}"], tree)
            try:
                wait_port(port, proc, "the forwarder")
                for _ in range(count):
                    with socket.create_connection(("127.0.0.1", port), 30) as sock:
                        sock.sendall(b"x")
                        if sock.recv(1) != b"x":
                            raise SystemExit("instructions: a tunnel did not echo")
            except BaseException:
                stop(proc)  # before its file goes: callgrind writes it as the program exits
                out.unlink(missing_ok=True)
                raise
            finally:
                stop(proc)  # callgrind writes its count as the program exits
        finally:
            stop(daemon, 30.0)
    return counted(out)


def per_operation(measure: Callable[[int], int], small: int, large: int) -> float:
    """(count at `large` - count at `small`) / (large - small): start-up cancels."""
    return (measure(large) - measure(small)) / (large - small)


def figures(tree: Path, requests: int, tunnels: int) -> dict[str, float]:
    pump = per_operation(lambda n: pump_count(tree, n, False), requests // 5, requests)
    direct = per_operation(lambda n: pump_count(tree, n, True), requests // 5, requests)
    return {"request": pump - direct, "tunnel": per_operation(
        lambda n: tunnel_count(tree, n), tunnels // 5, tunnels)}


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
    mine = figures(ROOT, args.requests, args.tunnels)
    rows = [("working tree", mine)]
    if args.base:
        with checkout(args.base) as tree:
            rows.append((args.base, figures(tree, args.requests, args.tunnels)))
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
