"""One benchmark run: its sizes, its processes, and what every column measured.

`Run.measure` runs one workload in one column (here for the direct, process and
peer columns; in the app for the in-app one) and reads every process's CPU at
the edges of the measured window; `Run.attempt` records a column's failure and
lets the run go on, so that one peer that cannot do something costs only its
own cells. `Run.run_load` measures a workload in rounds: every column once per
round, in an order that rotates from round to round, because a shared machine's
speed drifts by tens of percent from minute to minute and columns measured at
different moments would compare the moments, not the forwarders.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks import loadgen, procfs
from benchmarks.children import BenchError, Child, Children
from benchmarks.columns import (
    Column,
    Daemon,
    Endpoint,
    Processes,
    credentials,
    make_certificates,
)
from benchmarks.protocol import MiB

START_TIME = time.monotonic()


def log(message: str) -> None:
    """Progress, on stderr, with the time since the start."""
    print(f"[{time.monotonic() - START_TIME:7.1f}s] {message}", file=sys.stderr, flush=True)


@dataclass
class Params:
    """Sizes and durations: the full run's, or --quick's few-second ones."""

    size: int  # bytes per bulk stream
    rtt_count: int
    rtt_warmup: int
    setup_count: int
    concurrency: int  # connections at a time: keep-alive clients, setup, one per request
    idle_steps: list[int]
    seconds: float  # measured window of the request workloads
    warmup: float  # before that window
    depth: int  # requests in flight per connection, pipelined
    request_sizes: list[int]
    pipelined_size: int
    per_request_size: int
    frames_size: int  # bytes read through the frames daemon
    tls_size: int
    busy_count: int  # round trips beside a busy thread (each phase)
    busy_seconds: float  # at most this long per phase
    busy_clients: int  # keep-alive connections of the busy app's requests
    busy_request: int  # bytes of each of those requests (and of each reply)
    busy_window: float  # measured window of those requests (each phase)
    busy_warmup: float  # before that window
    start_repeat: int  # start() and close() pairs after the first, in a fresh app
    io_timeout: float
    settle: float  # with idle tunnels open, before reading RSS
    load_settle: float  # after a load, before its last CPU reading: tunnels wind down
    rounds: int  # of every rate-like workload, each column once per round

    @classmethod
    def of(cls, args: argparse.Namespace) -> Params:
        quick = args.quick
        # With 3 rounds and one peer, these sizes and windows keep a full run near 7 minutes
        # (1 GiB per stream and 3 s windows took about 10).
        size = args.size or (32 * MiB if quick else 512 * MiB)
        return cls(
            size=size,
            rtt_count=args.round_trips or (300 if quick else 5000),
            rtt_warmup=50 if quick else 500,
            setup_count=args.connections or (100 if quick else 2000),
            concurrency=args.clients,
            idle_steps=[args.idle] if args.idle else ([100] if quick else [1000, 10000]),
            seconds=args.seconds or (0.2 if quick else 2.0),
            warmup=0.05 if quick else 0.5,
            depth=args.depth,
            request_sizes=[64, 512, 4096],
            pipelined_size=64,
            per_request_size=512,
            frames_size=size,
            tls_size=size,
            busy_count=20 if quick else 1000,
            busy_seconds=1.0 if quick else 5.0,
            busy_clients=4,
            busy_request=512,
            busy_window=0.2 if quick else 1.0,
            busy_warmup=0.05 if quick else 0.3,
            start_repeat=2 if quick else 5,
            io_timeout=10.0 if quick else 30.0,
            settle=0.3 if quick else 1.0,
            load_settle=0.05 if quick else 0.2,
            rounds=args.rounds or (1 if quick else 3),
        )


@dataclass
class Run:
    """The run's state; scenarios (benchmarks.scenarios) add to `raw`."""

    args: argparse.Namespace
    logdir: Path
    columns: list[Column]
    p: Params
    deadline_at: float
    nofile: int
    # column -> result key -> its results, one a round (None: not run that round); a
    # single-shot workload (memory, busy) has one
    raw: dict[str, dict[str, list[dict[str, Any] | None]]] = field(default_factory=dict)
    missing: dict[str, dict[str, str]] = field(default_factory=dict)  # ... -> why none
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    contended: list[str] = field(default_factory=list)  # shared the machine with other work
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.children = Children(self.logdir, {})
        values = credentials(self.logdir)
        if "tls" in self.args.only:
            values.update(make_certificates(self.logdir))
            # OpenSSL's default verify paths and Go's crypto/x509 both read it.
            self.children.env["SSL_CERT_FILE"] = values["ca"]
        self.procs = Processes(self.children, deadline_at=self.deadline_at, nofile=self.nofile,
                               io_timeout=self.io_timeout_children(), values=values)
        for column in self.columns:
            self.raw.setdefault(column.key, {})
            self.missing.setdefault(column.key, {})
        self.guest: Child
        self.guest_addr = ("127.0.0.1", 0)
        self._daemon: Daemon | None = None

    def io_timeout_children(self) -> float:
        """Children wait as long as the run may last: the benchmark decides when they end."""
        return max(float(self.args.deadline), 60.0)

    @property
    def peers(self) -> list[Column]:
        return [c for c in self.columns if c.is_peer]

    @property
    def forwarding(self) -> list[Column]:
        """The columns with a forwarder."""
        return [c for c in self.columns if c.key != "direct"]

    def remaining(self) -> float:
        return max(self.deadline_at - time.time(), 1.0)

    def start_guest(self) -> None:
        self.guest, self.guest_addr = self.procs.guest()
        log(f"guest service on {self.guest_addr[0]}:{self.guest_addr[1]}"
            f" (pid {self.guest.pid})")

    def daemon(self) -> Daemon:
        """The daemon (the reference one unless --daemon), started on first use."""
        if self._daemon is None:
            self._daemon = self.procs.daemon(self.args.daemon, "daemon")
            log(f"daemon at {self._daemon.url} (pid {self._daemon.child.pid})")
        return self._daemon

    def has(self, key: str) -> bool:
        return any(c.key == key for c in self.columns)

    @property
    def in_app(self) -> list[Column]:
        """The columns whose forwarder the app starts (one per isolation)."""
        return [c for c in self.columns if c.in_app]

    # Measuring ------------------------------------------------------------------

    def measure(self, endpoint: Endpoint, spec: dict[str, Any]) -> dict[str, Any]:
        """One workload in one column, with the CPU of every process of the way."""
        spec = {"settle": self.p.load_settle, **spec}
        pids = {"guest": self.guest.pid}
        if endpoint.daemon is not None:
            pids["daemon"] = endpoint.daemon.child.pid
        if endpoint.forwarder is not None:
            pids["forwarder"] = endpoint.forwarder.pid
        if endpoint.app is not None:
            return endpoint.app.request(
                {"op": "load", "target": {"forwarder": endpoint.name}, "spec": spec,
                 "pids": pids, "root": os.getpid()}, self.remaining())
        result = loadgen.run_load(endpoint.addr, spec,
                                  lambda: procfs.snapshot(pids, os.getpid()), self.p.io_timeout)
        return loadgen.account(result)

    def attempt(self, key: str, column: Column, work: Callable[[], Any]) -> Any:
        """work(), or None once its failure is recorded (the run goes on)."""
        try:
            return work()
        except (BenchError, OSError) as exc:
            text = f"{type(exc).__name__}: {exc}" if isinstance(exc, OSError) else str(exc)
            self.failures.append(f"{key}, {column.title}: {text}")
            self.missing[column.key][key] = "failed (see below)"
            log(f"{key:<11} {column.title:<27} FAILED: {text}")
            return None

    def keep(self, key: str, column: Column, result: dict[str, Any]) -> None:
        """Keep the result of a single-shot workload: a round of its own."""
        self.raw[column.key][key] = [result]

    def record(self, key: str, column: Column, result: dict[str, Any], text: str) -> None:
        """Keep a single-shot result, and log it."""
        self.keep(key, column, result)
        self.report(key, column, result, text)

    def report(self, key: str, column: Column, result: dict[str, Any], text: str,
               label: str = "") -> None:
        """Log a result with what else the machine was doing meanwhile (`label`: its round)."""
        where = f"{key} ({label}), {column.title}" if label else f"{key}, {column.title}"
        if "window" in result:
            busy = result["other_cpu"] / max(result["window"], 1e-9)
            if result["other_cpu"] >= 0.1 and busy >= 0.1:  # above /proc's 10 ms ticks
                text += f"  [other load on the machine: {busy:.1f} cores]"
                self.contended.append(f"{where}: {busy:.1f} cores busy with processes not"
                                      " of this run")
            steal = result["steal"] / max(result["window"], 1e-9)
            if result["steal"] >= 0.05 and steal >= 0.05:
                text += f"  [steal {steal:.1f} cores]"
        log(f"{key:<11} {label + ' ' if label else ''}{column.title:<27} {text}")

    def run_load(self, key: str, endpoints: list[Endpoint], spec: dict[str, Any],
                 describe: Callable[[dict[str, Any]], str]) -> None:
        """One workload in `rounds` rounds, each column once per round (`run_rounds`)."""
        self.run_rounds(key, endpoints, functools.partial(self.measure, spec=spec), describe)

    def run_rounds(self, key: str, endpoints: list[Endpoint],
                   measure: Callable[[Endpoint], dict[str, Any]],
                   describe: Callable[[dict[str, Any]], str]) -> None:
        """measure(endpoint) in `rounds` rounds, each column once per round. The order
        rotates (A B C, then B C A, ...) so that no column always runs first or last; a
        column that fails is not tried again in later rounds of the workload (its failure
        is recorded)."""
        rounds = self.p.rounds
        results: dict[str, list[dict[str, Any] | None]] = {
            e.column.key: [None] * rounds for e in endpoints}
        for column_key, per_round in results.items():
            self.raw[column_key][key] = per_round
        failed: set[str] = set()
        for index in range(rounds):
            shift = index % max(len(endpoints), 1)
            for position, endpoint in enumerate(endpoints[shift:] + endpoints[:shift]):
                column = endpoint.column
                if column.key in failed:
                    continue
                result = self.attempt(key, column, functools.partial(measure, endpoint))
                if result is None:
                    failed.add(column.key)
                    continue
                result.update(round=index + 1, position=position + 1)
                results[column.key][index] = result
                label = f"round {index + 1}/{rounds}" if rounds > 1 else ""
                self.report(key, column, result, describe(result), label)

    # Endpoints --------------------------------------------------------------------

    def open_all(self, daemon: Daemon, label: str, columns: list[Column],
                 app: Child | None = None) -> list[Endpoint]:
        """Every column's way through `daemon`; a column that cannot start is left out
        (and its failure recorded)."""
        endpoints = []
        for column in columns:
            endpoint = self.attempt(label, column, functools.partial(
                self.procs.open, column, daemon, self.guest_addr, label, app))
            if endpoint is not None:
                if endpoint.forwarder is not None:
                    log(f"{column.title} ({label}) on port {endpoint.addr[1]}"
                        f" (pid {endpoint.forwarder.pid})")
                endpoints.append(endpoint)
        return endpoints

    def close_all(self, endpoints: list[Endpoint]) -> None:
        for endpoint in endpoints:
            with contextlib.suppress(BenchError, OSError):  # it is stopped at the end anyway
                self.procs.close(endpoint)

    def stop_all(self) -> None:
        self.children.stop_all()
