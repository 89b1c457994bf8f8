#!/usr/bin/env python3
"""gforward soak: a minute of tunnels opening, moving checked bytes and closing.

    python benchmarks/soak.py                  # 60 s, 64 tunnels at a time
    python benchmarks/soak.py --seconds 600 --concurrency 200 --json soak.json

Not run in CI (tests/test_load.py runs it for a few seconds so that it does
not rot).  Everything stays on loopback: the reference daemon and the
forwarder (the `gforward` command line) each run in a process of their own,
started as benchmarks/throughput.py starts them, and one thread here drives
every client and guest socket (the load generator's
benchmarks.loadloop.StreamLoop).  Each tunnel sends a random 1 B - 1 MiB up, and
once all of it is in, the guest sends as many bytes down (request, then
reply: a guest that half-closes while the client is still sending loses the
rest of the upload, see tests/test_faults.py); both ends check the bytes
with sha256, and a slot whose tunnel ended opens the next one at once.

What it reports is the forwarder process's RSS (and open descriptors) at
the start, every few seconds and at the end: a leak shows as a steady
climb, while buffers reused from one tunnel to the next do not.  The exit
status is 1 if any tunnel lost, doubled or garbled a byte, 0 otherwise;
RSS growth is reported, not judged.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import procfs
from benchmarks.children import Children
from benchmarks.columns import PROCESS, REFERENCE_DAEMON, Processes, credentials
from benchmarks.loadloop import Rotations, Stream, StreamLoop

MAX_SIZE = 1 << 20
HEAD = struct.Struct("!QQ")  # tunnel id, bytes each way


def process_status(pid: int) -> dict[str, int]:
    """RSS and peak RSS in KiB, and open descriptors, of a process."""
    return {**procfs.memory_kib(pid), "fds": procfs.open_fds(pid)}


class Soak:
    """Keeps `concurrency` tunnels busy through `port` until told to stop; checks each."""

    def __init__(self, loop: StreamLoop, port: int, concurrency: int, seed: int) -> None:
        self.loop, self.port = loop, port
        self.up, self.down = Rotations(MAX_SIZE), Rotations(MAX_SIZE)
        self.random = random.Random(seed)
        self.next_id = 0
        self.active: dict[int, tuple[Stream, int]] = {}  # id -> (client, size)
        self.guests: dict[int, Stream] = {}
        self.done = self.bytes = 0
        self.errors: list[str] = []
        for _ in range(concurrency):
            self.open_one()

    def guest(self, sock: socket.socket) -> Stream:
        """Request, then reply: the guest answers once the whole upload is in."""
        def prepare(stream: Stream, head: bytes) -> None:
            tunnel, size = HEAD.unpack(head)
            self.guests[tunnel] = stream
            stream.send_later([self.down[tunnel][:size]])
            answer(stream)

        def answer(stream: Stream) -> None:
            if len(stream.head) == HEAD.size and stream.received >= HEAD.unpack(stream.head)[1]:
                stream.hold = False

        return Stream(sock, prefix=HEAD.size, on_head=prepare, on_read=answer, hold=True)

    def open_one(self) -> None:
        tunnel, self.next_id = self.next_id, self.next_id + 1
        size = self.random.randint(1, MAX_SIZE)
        client = self.loop.connect(("127.0.0.1", self.port),
                                   [HEAD.pack(tunnel, size), self.up[tunnel][:size]])
        self.active[tunnel] = (client, size)

    def reap(self, refill: bool) -> None:
        """Check every tunnel whose client and guest are both over; open the next ones."""
        for tunnel, (client, size) in list(self.active.items()):
            guest = self.guests.get(tunnel)
            if client.ended is None or (guest is not None and guest.ended is None):
                continue
            del self.active[tunnel]
            self.guests.pop(tunnel, None)
            problem = self.check(tunnel, size, client, guest)
            if problem:
                self.errors.append(f"tunnel {tunnel} ({size} B): {problem}")
            else:
                self.done += 1
                self.bytes += 2 * size
            if refill:
                self.open_one()

    def check(self, tunnel: int, size: int, client: Stream, guest: Stream | None) -> str:
        if guest is None:
            return f"never reached the guest; client saw {client.outcome}"
        if (client.outcome, guest.outcome) != ("EOF", "EOF"):
            return f"client saw {client.outcome}, guest saw {guest.outcome}"
        if (client.received, guest.received) != (size, size):
            return f"{guest.received} B up and {client.received} B down"
        if guest.digest.hexdigest() != self.up.digest(tunnel, size):
            return "wrong bytes up"
        if client.digest.hexdigest() != self.down.digest(tunnel, size):
            return "wrong bytes down"
        return ""


def churn(args: argparse.Namespace, guest: socket.socket, port: int, pid: int
          ) -> tuple[list[dict[str, Any]], Soak]:
    """Tunnels through the forwarder (`port`, process `pid`) for args.seconds, then until
    every one has ended; the forwarder's samples, and what the soak saw."""
    samples: list[dict[str, Any]] = []
    with StreamLoop() as loop:
        began = time.monotonic()

        def sample(soak: Soak | None) -> None:
            status: dict[str, Any] = dict(process_status(pid))
            status.update(t=round(time.monotonic() - began, 1),
                          tunnels=soak.done if soak else 0, errors=len(soak.errors) if soak else 0)
            samples.append(status)
            print(f"{status['t']:6.1f} s  RSS {status['VmRSS'] / 1024:7.1f} MiB  "
                  f"fds {status['fds']:5d}  tunnels {status['tunnels']:7d}  "
                  f"errors {status['errors']}", file=sys.stderr, flush=True)

        sample(None)
        soak = Soak(loop, port, args.concurrency, args.seed)
        loop.listen(guest, soak.guest)
        next_sample = began + args.sample
        while time.monotonic() - began < args.seconds:
            loop.run(lambda: False, min(0.2, args.sample))
            soak.reap(refill=True)
            if time.monotonic() >= next_sample:
                sample(soak)
                next_sample += args.sample

        def drained() -> bool:
            soak.reap(refill=False)
            return not soak.active

        if not loop.run(drained, 60):
            soak.errors.append(f"{len(soak.active)} tunnels did not end within 60 s")
        time.sleep(0.5)  # the forwarder's last tunnels close after their clients saw EOF
        sample(soak)
    return samples, soak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = parser.parse_args(argv)
    # Descriptors for this process and, inherited, the other two.
    nofile = procfs.raise_nofile(4 * args.concurrency + 256)
    with tempfile.TemporaryDirectory(prefix="gforward-soak-") as tmp, socket.socket() as guest:
        guest.bind(("127.0.0.1", 0))
        guest.listen(1024)
        children = Children(Path(tmp), {})
        procs = Processes(children, deadline_at=time.time() + args.seconds + 300, nofile=nofile,
                          io_timeout=60.0, values=credentials(Path(tmp)))
        try:
            daemon = procs.daemon(REFERENCE_DAEMON, "daemon")
            endpoint = procs.open(PROCESS, daemon, guest.getsockname(), "soak")
            forwarder = endpoint.forwarder
            assert forwarder is not None
            samples, soak = churn(args, guest, endpoint.addr[1], forwarder.pid)
            forwarder.proc.terminate()
            status = forwarder.proc.wait(15)
            if soak.errors or status:
                print(forwarder.log_tail(), file=sys.stderr)
        finally:
            children.stop_all()

    start, end = samples[0], samples[-1]
    report = {
        "seconds": round(end["t"], 1), "concurrency": args.concurrency, "tunnels": soak.done,
        "bytes": soak.bytes, "errors": soak.errors[:20], "error_count": len(soak.errors),
        "rss_start_kib": start["VmRSS"], "rss_end_kib": end["VmRSS"],
        "rss_peak_kib": end["VmHWM"], "fds_start": start["fds"], "fds_end": end["fds"],
        "forwarder_exit": status, "samples": samples,
    }
    print(f"| figure | value |\n|---|---|\n"
          f"| duration | {report['seconds']} s, {args.concurrency} tunnels at a time |\n"
          f"| tunnels checked | {soak.done} ({soak.bytes / 1e9:.2f} GB moved) |\n"
          f"| errors | {len(soak.errors)} |\n"
          f"| forwarder RSS start | {start['VmRSS'] / 1024:.1f} MiB |\n"
          f"| forwarder RSS end | {end['VmRSS'] / 1024:.1f} MiB |\n"
          f"| forwarder RSS peak | {end['VmHWM'] / 1024:.1f} MiB |\n"
          f"| forwarder fds start / end | {start['fds']} / {end['fds']} |\n"
          f"| forwarder exit status | {status} |")
    for error in soak.errors[:20]:
        print(f"error: {error}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if soak.errors or status != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
