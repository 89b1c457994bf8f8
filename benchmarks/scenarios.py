"""The workloads of a run, each in every column, and the order they run in.

`SCENARIOS` names them (`--only` picks some). The first ones share one set of
forwarders on the daemon; `frames`, `tls` and `idle` start their own (against
the frames daemon, an https daemon, and fresh processes whose memory is then
all theirs). A scenario for something new is one function here, its figures in
`benchmarks.report`.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from benchmarks import loadgen, procfs, profiling
from benchmarks.children import BenchError, Child
from benchmarks.columns import Column, Endpoint
from benchmarks.protocol import GiB, MiB
from benchmarks.session import Run, log

FDS_PER_TUNNEL = "1 in the load generator, 2 in the forwarder, 2 in the daemon, 1 in the guest"
FD_SPARE = 32  # descriptors kept free beyond those a process has open now


# How one result reads in the progress log ------------------------------------------------


def rate(r: dict[str, Any]) -> str:
    text = f"{r['bytes'] / r['seconds'] / 1e6:8.0f} MB/s  ({r['seconds']:.2f} s"
    if r.get("forwarder_cpu") is not None:
        text += f", forwarder {r['forwarder_cpu'] / (r['bytes'] / GiB):.2f} s/GiB"
    return text + ")"


def per_second(unit: str, per: str) -> Callable[[dict[str, Any]], str]:
    def describe(r: dict[str, Any]) -> str:
        text = f"{r['count'] / r['seconds']:8.0f} {unit}  ({r['count']} in {r['seconds']:.2f} s"
        if r.get("forwarder_cpu") is not None and r["count"]:
            text += f", forwarder {r['forwarder_cpu'] / r['count'] * 1e6:.1f} us/{per}"
        return text + ")"

    return describe


def latencies(r: dict[str, Any]) -> str:
    return f"median {r['median_us']:.1f} us, p99 {r['p99_us']:.1f} us"


# The scenarios on the run's daemon, sharing its forwarders --------------------------------


def bulk(run: Run, endpoints: list[Endpoint]) -> None:
    for streams in (1, 8):
        for kind in ("upload", "download"):
            log(f"{kind}, {streams} stream(s) x {run.p.size / MiB:g} MiB")
            run.run_load(f"{kind}_{streams}", endpoints,
                         {"kind": kind, "streams": streams, "size": run.p.size}, rate)


def echo(run: Run, endpoints: list[Endpoint]) -> None:
    log(f"echo round trips: {run.p.rtt_count} (after {run.p.rtt_warmup} to warm up)")
    run.run_load("echo", endpoints,
                 {"kind": "echo", "count": run.p.rtt_count, "warmup": run.p.rtt_warmup},
                 latencies)


def setup(run: Run, endpoints: list[Endpoint]) -> None:
    for key, concurrency in (("setup_seq", 1), ("setup_conc", run.p.concurrency)):
        log(f"tunnel setup (connect, 1-byte echo, close): {run.p.setup_count} connections,"
            f" {concurrency} at a time")
        run.run_load(key, endpoints, {"kind": "setup", "count": run.p.setup_count,
                                      "concurrency": concurrency},
                     per_second("conn/s", "connection"))


def requests(run: Run, endpoints: list[Endpoint]) -> None:
    p = run.p
    for size in p.request_sizes:
        log(f"requests of {size} B (reply {size} B), one at a time on each of"
            f" {p.concurrency} keep-alive connections, {p.seconds:g} s")
        _timed(run, endpoints, f"requests_{size}", "requests", size, "request", depth=1)


def pipelined(run: Run, endpoints: list[Endpoint]) -> None:
    p = run.p
    log(f"pipelined requests of {p.pipelined_size} B, {p.depth} in flight on each of"
        f" {p.concurrency} connections, {p.seconds:g} s")
    _timed(run, endpoints, "pipelined", "requests", p.pipelined_size, "request", depth=p.depth)


def per_request(run: Run, endpoints: list[Endpoint]) -> None:
    p = run.p
    log(f"one connection per request of {p.per_request_size} B, {p.concurrency} at a time,"
        f" {p.seconds:g} s")
    _timed(run, endpoints, "per_request", "per_request", p.per_request_size, "tunnel",
           limit=25000)  # ephemeral ports: TIME_WAIT outlives a fast direct run


def _timed(run: Run, endpoints: list[Endpoint], key: str, kind: str, size: int, per: str,
           **more: Any) -> None:
    """A request workload (`kind`) of `size`-byte requests and replies on `concurrency`
    clients, warmed up, then measured for `seconds`; its rate is requests per second."""
    p = run.p
    run.run_load(key, endpoints, {
        "kind": kind, "clients": p.concurrency, "request": size, "reply": size,
        "warmup": p.warmup, "seconds": p.seconds, **more},
        per_second("req/s", per))


def busy(run: Run, endpoints: list[Endpoint]) -> None:
    """A plain app with one thread busy in pure Python and another doing 1-byte round
    trips, then small requests on a few keep-alive connections: straight to the guest,
    through a forwarder process beside it, or through gforward in the app (in each
    isolation). Each column gets a fresh app, once a round (the GIL's handovers, and so
    these figures, follow whatever else the machine's two cores do)."""
    p = run.p
    log(f"round trips from an app, idle then beside a busy thread: {p.busy_count} each"
        f" (at most {p.busy_seconds:g} s); then requests of {p.busy_request} B on"
        f" {p.busy_clients} keep-alive connections, {p.busy_window:g} s")
    command = {"op": "busy", "count": p.busy_count, "warmup": 10, "seconds": p.busy_seconds,
               "requests": {"kind": "requests", "clients": p.busy_clients,
                            "request": p.busy_request, "reply": p.busy_request, "depth": 1,
                            "warmup": p.busy_warmup, "seconds": p.busy_window}}

    def work(endpoint: Endpoint) -> dict[str, Any]:
        with run.procs.fresh_app(f"app-busy-{endpoint.column.key}") as app:
            target: dict[str, Any] = {"addr": list(endpoint.addr)}
            if endpoint.column.in_app:
                mine = run.procs.open(endpoint.column, run.daemon(), run.guest_addr, "busy",
                                      app)
                target = {"forwarder": mine.name}
            before = procfs.snapshot({}, os.getpid())
            result = app.request({**command, "target": target}, run.remaining())
            return {**result, **procfs.window(before, procfs.snapshot({}, os.getpid()))}

    def describe(r: dict[str, Any]) -> str:
        return (f"idle {latencies(r['idle'])}, {requests_rate(r['idle_requests'])};"
                f" busy {latencies(r['busy'])}, {requests_rate(r['busy_requests'])}")

    run.run_rounds("busy", endpoints, work, describe)


def requests_rate(r: dict[str, Any]) -> str:
    return f"{r['count'] / r['seconds']:.0f} req/s"


MAIN: dict[str, Callable[[Run, list[Endpoint]], None]] = {
    "bulk": bulk, "echo": echo, "setup": setup, "requests": requests, "pipelined": pipelined,
    "per-request": per_request, "busy": busy,
}


# Scenarios with forwarders of their own ------------------------------------------------------


def frames(run: Run) -> None:
    """A download of 32 KiB frames from a daemon that costs nothing: the client's own cost."""
    log(f"download of 32 KiB frames from the frames daemon, {run.p.frames_size / MiB:g} MiB")
    daemon = run.procs.frames_daemon()
    app = run.procs.app("app-frames") if run.in_app else None
    endpoints = run.open_all(daemon, "frames", run.forwarding, app)
    run.run_load("frames", endpoints, {"kind": "drain", "size": run.p.frames_size}, rate)
    retire(run, endpoints, app)
    run.children.retire(daemon.child)


def tls(run: Run) -> None:
    log(f"through an https daemon: upload and download, 1 stream x {run.p.tls_size / MiB:g} MiB")
    daemon = run.procs.daemon(run.args.tls_daemon, "tls-daemon", tls=True)
    log(f"https daemon at {daemon.url} (pid {daemon.child.pid})")
    app = run.procs.app("app-tls") if run.in_app else None
    endpoints = run.open_all(daemon, "tls", run.forwarding, app)
    for kind in ("upload", "download"):
        run.run_load(f"tls_{kind}_1", endpoints,
                     {"kind": kind, "streams": 1, "size": run.p.tls_size}, rate)
    retire(run, endpoints, app)
    run.children.retire(daemon.child)


def idle_plan(run: Run, fds_per_tunnel: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """The idle steps the fd limit allows; a refused step is run at the most it allows.

    `fds_per_tunnel` maps a process name to (pid, fds each tunnel costs it).
    """
    room = {name: (run.nofile - procfs.open_fds(pid) - FD_SPARE) // per
            for name, (pid, per) in fds_per_tunnel.items()}
    tightest = min(room, key=lambda name: room[name])
    most = max(room[tightest], 0) // 100 * 100
    plan: list[dict[str, Any]] = []
    for step in run.p.idle_steps:
        if step <= most:
            plan.append({"n": step, "open": step, "note": ""})
            continue
        per = fds_per_tunnel[tightest][1]
        why = (f"the machine refuses: RLIMIT_NOFILE is {run.nofile} (hard limit, cannot be"
               f" raised here) and {step} tunnels need {step * per}+ fds in the {tightest}"
               f" process alone")
        previous = plan[-1]["open"] if plan else 0
        if most > previous:
            plan.append({"n": step, "open": most, "note": f"{why}; measured at {most}"})
        else:
            plan.append({"n": step, "open": 0, "note": why})
    return plan


def idle(run: Run) -> None:
    """RSS of a fresh forwarder with idle tunnels open, in each forwarding column."""
    p, daemon = run.p, run.daemon()
    log(f"idle tunnels: {', '.join(map(str, p.idle_steps))} (each holds 6 fds:"
        f" {FDS_PER_TUNNEL}; RLIMIT_NOFILE {run.nofile})")
    shared = {"daemon": (daemon.child.pid, 2), "guest": (run.guest.pid, 1)}
    daemon_fds = procfs.open_fds(daemon.child.pid)
    for column in run.forwarding:

        def work(column: Column = column) -> dict[str, Any]:
            if column.in_app:  # the RSS of the app, and of its helper if it has one
                with run.procs.fresh_app(f"app-idle-{column.key}") as app:
                    mine = run.procs.open(column, daemon, run.guest_addr, "idle", app)
                    fds = ({"app": (app.pid, 1), "helper": (mine.helper, 2)} if mine.helper
                           else {"app": (app.pid, 3)})
                    plan = idle_plan(run, {**fds, **shared})
                    return app.request({"op": "idle", "target": {"forwarder": mine.name},
                                        "plan": plan, "settle": p.settle,
                                        "tree": bool(mine.helper)}, run.remaining())
            endpoint = run.procs.open(column, daemon, run.guest_addr, "idle")
            assert endpoint.forwarder is not None
            pid = endpoint.forwarder.pid
            try:
                plan = idle_plan(run, {"forwarder": (pid, 2), **shared,
                                       "load generator": (os.getpid(), 1)})
                return loadgen.idle_steps(endpoint.addr, plan,
                                          lambda: procfs.tree_rss_kib(pid), p.io_timeout,
                                          p.settle)
            finally:
                run.procs.close(endpoint)

        result = run.attempt("idle", column, work)
        if result is not None:
            run.keep("idle", column, result)
            log_idle(column, result)
        wait_quiet(daemon.child.pid, daemon_fds)


def log_idle(column: Column, result: dict[str, Any]) -> None:
    for step in result["steps"]:
        if "skipped" in step:
            log(f"idle {column.title}: {step['n']} tunnels skipped: {step['skipped']}")
            continue
        if step["note"]:
            log(f"idle {column.title}: {step['n']} tunnels: {step['note']}")
        log(f"idle {column.title}: {step['held']} tunnels held, RSS"
            f" {step['rss_kib'] / 1024:.1f} MiB (from {result['rss0_kib'] / 1024:.1f})"
            + (f"; stopped: {step['error']}" if step["error"] else ""))


def wait_quiet(pid: int, baseline: int) -> None:
    """After idle tunnels close, wait until the daemon has let go of them."""
    end = time.monotonic() + 30
    while time.monotonic() < end and procfs.open_fds(pid) > baseline + 16:
        time.sleep(0.2)


def start(run: Run) -> None:
    """What gforward.start() costs a fresh app, in each isolation: its time (the first,
    and again), close()'s, and the memory it adds (the app's growth, plus the helper's
    RSS with isolation="process")."""
    p, daemon = run.p, run.daemon()
    log(f"start() and close() in a fresh app: the first, then {p.start_repeat} more")
    for column in run.in_app:

        def work(column: Column = column) -> dict[str, Any]:
            with run.procs.fresh_app(f"app-start-{column.key}") as app:
                return app.request({"op": "start", "url": daemon.url,
                                    "spec": f"127.0.0.1:0:{run.guest_addr[0]}:"
                                            f"{run.guest_addr[1]}",
                                    "token": run.procs.values.get("token", ""),
                                    "isolation": column.isolation, "repeat": p.start_repeat,
                                    "settle": p.settle}, run.remaining())

        result = run.attempt("start", column, work)
        if result is not None:
            later = "-" if result["later_ms"] is None else f"{result['later_ms']:.1f}"
            run.record("start", column, result,
                       f"import {result['import_ms']:.0f} ms, start() {result['first_ms']:.1f}"
                       f" ms first, {later} ms later, close() {result['close_ms']:.1f} ms;"
                       f" memory {result['memory_kib'] / 1024:.1f} MiB (app"
                       f" +{result['app_delta_kib'] / 1024:.1f}, helper"
                       f" {result['helper_kib'] / 1024:.1f})")


OWN: dict[str, Callable[[Run], None]] = {"frames": frames, "tls": tls, "idle": idle,
                                          "start": start}
SCENARIOS = [*MAIN, *OWN]


def run_all(run: Run) -> None:
    """Every selected scenario, in `SCENARIOS` order (profiling after the shared ones).
    A scenario whose processes cannot start is recorded as failed; the others go on."""
    run.start_guest()
    wanted = [name for name in MAIN if name in run.args.only]
    if wanted or run.args.profile:
        try:
            shared(run, wanted)
        except BenchError as exc:
            run.failures.append(f"{', '.join(wanted)}: {exc}")
            log(f"FAILED: {exc}")
    for name, scenario in OWN.items():
        if name in run.args.only:
            started = time.monotonic()
            try:
                scenario(run)
            except BenchError as exc:
                run.failures.append(f"{name}: {exc}")
                log(f"{name} FAILED: {exc}")
            timed(run, name, started)


def timed(run: Run, name: str, started: float) -> None:
    """Log how long a scenario took, and keep it: what a default run costs is planned
    from these."""
    seconds = time.monotonic() - started
    run.info.setdefault("scenario_seconds", {})[name] = round(seconds, 1)
    log(f"{name} took {seconds:.1f} s")


def shared(run: Run, wanted: list[str]) -> None:
    """The scenarios that share one forwarder per column, then the profile."""
    daemon = run.daemon()
    app = run.procs.app("app") if run.in_app else None
    endpoints = run.open_all(daemon, "main", run.columns, app)
    try:
        for name in wanted:
            started = time.monotonic()
            MAIN[name](run, endpoints)
            timed(run, name, started)
        if run.args.profile:
            process = [e for e in endpoints if e.column.key == "process"]
            if process and process[0].forwarder is not None:
                profiling.profile(run, process[0].addr, process[0].forwarder.pid)
    except BenchError:
        retire(run, endpoints, app)
        raise
    retire(run, endpoints, app)  # (after a timeout or Ctrl-C, the run stops every child)


def retire(run: Run, endpoints: list[Endpoint], app: Child | None) -> None:
    run.close_all(endpoints)
    if app is not None:
        run.children.retire(app)
