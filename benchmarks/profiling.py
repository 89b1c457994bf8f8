"""`--profile DIR`: where the forwarder process spends its time, by py-spy.

It records the `gforward (process)` forwarder during a 1-stream upload, a
1-stream download, a sequential tunnel setup and small requests on keep-alive
connections, writes collapsed stacks to DIR (speedscope.app opens them) and
prints the top hot spots. `--profile-native` adds C frames (py-spy then pauses
the process at each sample: the speed shown is not representative).
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from benchmarks import loadgen, procfs
from benchmarks.children import BenchError, die_with_parent
from benchmarks.protocol import GiB
from benchmarks.session import Run, log

RATE = 500  # samples per second


def workloads(run: Run) -> dict[str, tuple[dict[str, Any], str]]:
    """What to profile: name -> (load spec, title)."""
    quick, p = run.args.quick, run.p
    size = run.args.profile_size or (p.size if quick else 4 * GiB)
    count = p.setup_count if quick else max(p.setup_count, 3000)
    seconds = p.seconds if quick else 5.0
    return {
        "upload": ({"kind": "upload", "streams": 1, "size": size}, "1-stream upload"),
        "download": ({"kind": "download", "streams": 1, "size": size}, "1-stream download"),
        "setup": ({"kind": "setup", "count": count, "concurrency": 1},
                  f"sequential tunnel setup ({count} connections)"),
        "requests": ({"kind": "requests", "clients": p.concurrency, "request": 512,
                      "reply": 512, "depth": 1, "warmup": p.warmup, "seconds": seconds},
                     f"512 B requests on {p.concurrency} keep-alive connections"),
    }


def profile(run: Run, addr: tuple[str, int], pid: int) -> None:
    """py-spy the forwarder `pid` (listening on `addr`) during each workload."""
    spy = shutil.which("py-spy")
    if spy is None:
        run.notes.append("--profile: py-spy not found (pip install py-spy); no profile")
        log(run.notes[-1])
        return
    outdir = Path(run.args.profile)
    outdir.mkdir(parents=True, exist_ok=True)
    profiles = {}
    for kind, (spec, title) in workloads(run).items():
        out = outdir / f"forwarder-{kind}.txt"
        argv = [spy, "record", "-p", str(pid), "-o", str(out), "--format", "raw", "--rate",
                str(RATE), "--native" if run.args.profile_native else "--nonblocking"]
        log(f"profiling the forwarder during a {title}: {out}")
        work = functools.partial(loadgen.run_load, addr, spec, lambda: None, run.p.io_timeout)
        result, cpu = record(argv, run.logdir / f"py-spy-{kind}.log", work, pid,
                             native=run.args.profile_native)
        if "bytes" in result:
            speed = f"{result['bytes'] / result['seconds'] / 1e6:.0f} MB/s"
        else:
            speed = f"{result['count'] / result['seconds']:.0f} per s"
        summary = summarize(out)
        if "error" in summary:
            summary["error"] += ": " + (run.logdir / f"py-spy-{kind}.log").read_text(
                errors="replace")[-800:]
        summary.update(title=title, speed=speed, seconds=result["seconds"], forwarder_cpu=cpu)
        profiles[kind] = summary
        print_summary(summary)
    run.info["profile"] = profiles


def record(argv: list[str], log_path: Path, work: Callable[[], dict[str, Any]], pid: int, *,
           native: bool) -> tuple[dict[str, Any], float]:
    """Run `work()` in a thread while py-spy records: its result and the forwarder's CPU."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            outcome["result"] = work()
        except BaseException as exc:
            outcome["error"] = exc

    loader = threading.Thread(target=body, name="profiled-load", daemon=True)
    before = procfs.tree_cpu(pid)
    if native:  # native unwinding fails on an idle gevent hub: attach once the load runs
        loader.start()
        time.sleep(0.3)
    for _attempt in range(5):  # py-spy sometimes fails while attaching
        with open(log_path, "wb") as spy_log:
            recorder = subprocess.Popen(argv, stdout=spy_log, stderr=spy_log,
                                        preexec_fn=die_with_parent)
        with contextlib.suppress(subprocess.TimeoutExpired):
            recorder.wait(1.0)
        if recorder.poll() is None:
            break
    try:
        if not native:
            loader.start()
        loader.join()
        cpu = procfs.tree_cpu(pid) - before
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            recorder.wait(30)
        except subprocess.TimeoutExpired:
            recorder.kill()
            recorder.wait(5)
    if "error" in outcome:
        raise BenchError(f"profiled load: {outcome['error']}")
    return outcome["result"], cpu


def summarize(path: Path, top: int = 15) -> dict[str, Any]:
    """Hot spots from py-spy's raw (collapsed) output: self time by line, total by function."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return {"error": str(exc)}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for function in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            total[function] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100.0 * n / samples) for name, n in counter.most_common(top)]

    return {"samples": samples, "busy_seconds": samples / RATE, "file": str(path),
            "self": share(own) if samples else [], "total": share(total) if samples else []}


def print_summary(summary: dict[str, Any]) -> None:
    kind = summary["title"]
    if "error" in summary or not summary["samples"]:
        print(f"\nprofile of the forwarder, {kind}: no samples ({summary.get('error', '')})")
        return
    print(f"\nprofile of the forwarder, {kind}: {summary['speed']},"
          f" forwarder CPU {summary['forwarder_cpu']:.2f} s in {summary['seconds']:.2f} s,"
          f" {summary['samples']} busy samples ({summary['file']})")
    print("  self time (by line):")
    for name, pct in summary["self"]:
        print(f"    {pct:5.1f}%  {name}")
    print("  total time (by function, callees included):")
    for name, pct in summary["total"]:
        print(f"    {pct:5.1f}%  {name}")
