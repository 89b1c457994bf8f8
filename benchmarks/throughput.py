#!/usr/bin/env python3
"""gforward's throughput benchmark: the direct path to a guest, gforward, and other forwarders.

    python benchmarks/throughput.py                  # full run (~7 min with one peer)
    python benchmarks/throughput.py --quick          # a few seconds: the CI smoke test
    python benchmarks/throughput.py --only requests,echo \
        --peer slicer='slicer vm forward {vm} -L {spec} --url {url} --token-file {token_file}'
    python benchmarks/throughput.py --json out.json --plot out.png --profile prof/

Everything runs on loopback, each part in its own process, as in real use: a
guest service (benchmarks/guest.py), the daemon (the reference one,
`python -m gforward.daemon`, unless --daemon), gforward as a process (its
command line), an "app" that calls gforward.start() and runs the load itself
(once with each isolation: its tunnels in a thread of the app, or in a helper
process), and any other forwarder given with --peer. Each rate-like workload
(benchmarks/scenarios.py) runs in --rounds rounds, every column once a round,
the columns' order rotating from round to round; the table gives the median
over rounds, and ratios as the median of each round's ratio, so that the
machine's drift from minute to minute cancels. It puts gforward beside the
direct path (the limit) and beside the first peer, against the project's targets.

Command templates take placeholders. --peer: {python} (this interpreter),
{url} (the daemon), {token}, {token_file}, {vm}, {spec} (127.0.0.1:PORT:GUEST,
PORT free), {port}, {guest} (GUESTHOST:PORT); the benchmark waits until PORT
listens. --daemon and --tls-daemon: {python}, {listen} (127.0.0.1:PORT), {port},
{token}, {token_file}, {tls_cert}, {tls_key}; the URL is then http(s)://{listen}.
Every forwarder gets SSL_CERT_FILE, the run's CA, for the TLS rows.

CPU is utime+stime of each process tree from /proc (in the app: the app's less
the load generator's own). CPU that the machine spent outside the run during a
workload is reported ("other load"): such figures are pessimistic.
MB = 10**6 bytes, MiB/GiB = 2**20/2**30 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import ceilings, procfs, report, scenarios
from benchmarks.children import ROOT, BenchError, BenchTimeout
from benchmarks.columns import (
    BUILTIN,
    DAEMON_PLACEHOLDERS,
    REFERENCE_DAEMON,
    REFERENCE_TLS_DAEMON,
    check_placeholders,
    peer_column,
)
from benchmarks.protocol import GiB, MiB
from benchmarks.session import Params, Run, log

FD_MARGIN = 256  # descriptors a process needs besides its tunnels


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M, 65536)")
    size = int(float(match.group(1)) * {"": 1, "k": 1 << 10, "m": MiB, "g": GiB}[
        match.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return size


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:4]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--quick", action="store_true",
        help="a few seconds: small sizes, short windows, 100 idle tunnels")
    add("--only", metavar="NAME[,NAME]",
        help=f"run only these scenarios: {','.join(scenarios.SCENARIOS)}")
    add("--peer", action="append", default=[], metavar="NAME=COMMAND",
        help="another forwarder, side by side (repeatable; targets use the first)")
    add("--daemon", default=REFERENCE_DAEMON, metavar="COMMAND",
        help=f"the daemon (default: {REFERENCE_DAEMON})")
    add("--tls-daemon", default=REFERENCE_TLS_DAEMON, metavar="COMMAND",
        help="the https daemon of the tls scenario (default: the reference daemon's own TLS)")
    add("--modes", default=",".join(c.key for c in BUILTIN),
        help="built-in columns to run, comma-separated: direct,process,app,isolated (app:"
        " gforward.start() in the app, its tunnels in a hub thread; isolated: the same with"
        " isolation='process', its tunnels in a helper process)")
    add("--json", metavar="FILE", help="write the raw figures as JSON")
    add("--plot", metavar="FILE.png", help="plot throughput (needs matplotlib)")
    add("--size", type=parse_size, help="bytes per bulk stream (default 512M; 32M quick)")
    add("--round-trips", type=int, help="echo round trips (default 5000)")
    add("--connections", type=int, help="connections per setup scenario (default 2000)")
    add("--clients", type=int, default=50,
        help="concurrent connections of the request and setup workloads (default 50)")
    add("--depth", type=int, default=8, help="requests in flight per pipelined connection")
    add("--seconds", type=float, help="measured window per request workload (default 2)")
    add("--rounds", type=int, help="rounds of each rate-like workload, every column once a"
        " round in a rotating order; figures are medians (default 3; 1 with --quick)")
    add("--idle", type=int, help="one idle-tunnel step of this many instead")
    add("--no-memory", action="store_true", help="skip the idle-tunnel scenario")
    add("--profile", metavar="DIR", help="also py-spy the gforward process (benchmarks/"
        "profiling.py)")
    add("--profile-size", type=parse_size,
        help="with --profile: bytes per profiled transfer (default 4G)")
    add("--profile-native", action="store_true", help="with --profile: include C frames")
    add("--deadline", type=float,
        help="bound on the whole run, seconds (default 1800; 120 with --quick)")
    args = parser.parse_args(argv)
    if args.deadline is None:
        args.deadline = 120.0 if args.quick else 1800.0
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds takes a number of rounds, 1 or more")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if set(args.modes) - {c.key for c in BUILTIN}:
        parser.error("--modes takes some of direct,process,app,isolated")
    try:
        args.peers = [peer_column(text) for text in args.peer]
        check_placeholders(args.daemon, DAEMON_PLACEHOLDERS, "--daemon")
        check_placeholders(args.tls_daemon, DAEMON_PLACEHOLDERS, "--tls-daemon")
    except ValueError as exc:
        parser.error(str(exc))
    if len({c.key for c in args.peers}) < len(args.peers):
        parser.error("--peer: two peers of the same NAME")
    only = [n.strip() for n in (args.only or ",".join(scenarios.SCENARIOS)).split(",")]
    unknown = [n for n in only if n not in scenarios.SCENARIOS]
    if unknown or not only:
        parser.error(f"--only takes some of {','.join(scenarios.SCENARIOS)}")
    args.only = [n for n in only if not (args.no_memory and n == "idle")]
    if args.profile and "process" not in args.modes:
        parser.error("--profile needs the process column")
    return args


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii",
                                            errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gevent_version = ""
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        gevent_version = version("gevent")
    try:
        import websockets.speedups  # noqa: F401

        fast_mask = True
    except ImportError:
        fast_mask = False
    found = re.search(r'__version__\s*=\s*"([^"]+)"',
                      (ROOT / "gforward" / "_version.py").read_text())
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gforward"], cwd=ROOT,
                               text=True, capture_output=True, timeout=10, check=True).stdout
        commit = head + ("+uncommitted changes in gforward/" if dirty.strip() else "")
    return {"gforward_version": found.group(1) if found else "?", "commit": commit,
            "cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "gevent": gevent_version,
            "websockets_speedups": fast_mask}


@contextlib.contextmanager
def global_deadline(seconds: float) -> Iterator[None]:
    """SIGALRM raises BenchTimeout in the main thread once `seconds` have passed."""

    def expire(_signum: int, _frame: Any) -> None:
        raise BenchTimeout(f"the run took longer than its deadline of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def terminate(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # the same teardown as Ctrl-C

    signal.signal(signal.SIGTERM, terminate)
    params = Params.of(args)
    nofile = procfs.raise_nofile(max(max(params.idle_steps) * 3 + FD_MARGIN, 4096))
    columns = [c for c in BUILTIN if c.key in args.modes] + args.peers
    status = 0
    with tempfile.TemporaryDirectory(prefix="gforward-bench-") as tmp:
        try:
            run = Run(args, Path(tmp), columns, params, time.time() + args.deadline, nofile)
        except BenchError as exc:
            log(f"benchmark failed: {exc}")
            return 1
        run.info.update(machine_info(), nofile=nofile)
        log(f"{run.info['cpus']} CPUs, {run.info['cpu_model']}; Python"
            f" {platform.python_version()}; columns: {', '.join(c.title for c in columns)};"
            f" scenarios: {', '.join(args.only)}")
        try:
            with global_deadline(args.deadline):
                scenarios.run_all(run)
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except (BenchError, BenchTimeout) as exc:
            log(f"benchmark failed: {exc}")
            run.failures.append(f"the run stopped: {exc}")
        finally:
            run.stop_all()
        figs, table = report.compute(run)
        report.print_table(run, figs, table)
        ceilings.print_ceilings(run, table)
        if args.json:
            report.write_json(Path(args.json), run, table)
        if args.plot:
            report.write_plot(Path(args.plot), run, table)
        if run.failures:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
