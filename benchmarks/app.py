"""The "app": a plain (unpatched) Python process, as legacy apps are: `python -m benchmarks.app`.

It calls `gforward.start()` when told to and runs the load generator itself, so
that the "gforward (in-app)" column measures gforward sharing a process, and its
interpreter lock, with the app (isolation="thread"), and "gforward (in-app,
isolated)" the same call with isolation="process" (the tunnels in a helper
process). The same process with no forwarder of its own is the app of the
"busy" scenario for the other columns: one thread busy in pure Python while
another does 1-byte round trips, then small requests, through whatever it is
pointed at. A fresh one measures what start() costs ("start").

Commands come on stdin, one JSON object a line; each answer is one line
``BENCH {json}`` on stdout, with "ok" false and "error" when it failed:

* ``{"op": "forward", "name": N, "url": U, "spec": S, "isolation": I}``: start a
  forwarder; its "port" and "helper" (the helper's pid, 0 in thread isolation);
* ``{"op": "unforward", "name": N}``: close it;
* ``{"op": "load", "target": T, "spec": L, "pids": {...}, "root": PID}``: one
  `benchmarks.loadgen.run_load`, with CPU figures (``T`` is ``{"forwarder": N}`` or
  ``{"addr": [HOST, PORT]}``);
* ``{"op": "idle", "target": T, "plan": [...], "settle": S, "tree": B}``: idle tunnels,
  this process's RSS with each step (with its children's, a helper's, if B);
* ``{"op": "busy", "target": T, "count": C, "warmup": W, "seconds": S, "requests": R}``:
  round trips and then requests (R: `loadgen.run_load`'s "requests" spec), idle, then
  beside a busy thread;
* ``{"op": "start", "url": U, "spec": S, "isolation": I, "repeat": N, "settle": S}``:
  in a fresh app, the cost of gforward: import, start() and close() times, memory;
* ``{"op": "quit"}`` (or EOF): close everything and exit.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import sys
import threading
import time
from typing import Any

from benchmarks import loadgen, procfs
from benchmarks.children import BenchError, child_arguments, child_setup
from benchmarks.columns import VM


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write("BENCH " + json.dumps(obj) + "\n")
    sys.stdout.flush()


def spin(stop: threading.Event) -> None:
    """Pure Python, holding the interpreter lock but for the switch interval's handovers."""
    total = 0
    while not stop.is_set():
        for i in range(10000):
            total += i * i


def busy_app(addr: tuple[str, int], command: dict[str, Any], timeout: float
             ) -> dict[str, Any]:
    """1-byte round trips and small requests from this process: idle, then while another
    thread spins. The requests are driven from this (non-busy) thread, one epoll loop
    with a handful of keep-alive connections, as an app's request handlers would wait
    on their database: "idle" and "busy" hold the round trips' latencies,
    "idle_requests" and "busy_requests" the requests' count and seconds."""

    def phase() -> tuple[dict[str, float], dict[str, Any]]:
        rtt = loadgen.latency(loadgen.round_trips(addr, command["count"], command["warmup"],
                                                  timeout, command["seconds"]))
        load = loadgen.run_load(addr, command["requests"], lambda: None, timeout)
        return rtt, {"count": load["count"], "seconds": load["seconds"]}

    out: dict[str, Any] = {}
    out["idle"], out["idle_requests"] = phase()
    stop = threading.Event()
    spinner = threading.Thread(target=spin, args=(stop,), name="busy", daemon=True)
    spinner.start()
    try:
        out["busy"], out["busy_requests"] = phase()
    finally:
        stop.set()
        spinner.join()
    return out


def start_forwarder(command: dict[str, Any]) -> Any:
    """A forwarder as a "forward" or "start" command asks for it (gforward imported late:
    "start" measures that import)."""
    import gforward

    return gforward.start(base_url=command["url"], vm_name=VM, specs=[command["spec"]],
                          token=command.get("token", ""),
                          isolation=command.get("isolation", "thread"))


def start_cost(command: dict[str, Any], timeout: float) -> dict[str, Any]:
    """What gforward costs a fresh app: `import gforward`, the first start() (and one
    tunnel through it, for lazy imports and first allocations), the RSS it added to
    the app and its helper's RSS (isolation="process"), then close(), and `repeat`
    more start() and close() pairs. Times in ms, memory in KiB."""
    pid = os.getpid()
    rss0 = procfs.rss_kib(pid)
    began = time.perf_counter()
    importlib.import_module("gforward")  # timed: the first import pays for gevent's too
    imported = time.perf_counter() - began

    def start() -> tuple[Any, float]:
        began = time.perf_counter()
        fwd = start_forwarder(command)
        return fwd, time.perf_counter() - began

    def close(fwd: Any) -> float:
        began = time.perf_counter()
        fwd.close()
        return time.perf_counter() - began

    fwd, first = start()
    with loadgen.connect(("127.0.0.1", fwd.listeners[0].port), timeout) as sock:
        loadgen.echo_hello(sock)
    time.sleep(command["settle"])
    app_kib = procfs.rss_kib(pid)
    helper_kib = procfs.tree_rss_kib(pid, itself=False)  # read apart: the app's RSS moves
    closes = [close(fwd)]
    later = []
    for _ in range(command["repeat"]):
        fwd, took = start()
        later.append(took)
        closes.append(close(fwd))
    return {"import_ms": imported * 1e3, "first_ms": first * 1e3,
            "later_ms": statistics.median(later) * 1e3 if later else None,
            "close_ms": statistics.median(closes) * 1e3, "rss0_kib": rss0,
            "app_kib": app_kib, "app_delta_kib": app_kib - rss0, "helper_kib": helper_kib,
            "memory_kib": app_kib - rss0 + helper_kib}


class App:
    """The app's forwarders, by name, and what each command does."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.forwarders: dict[str, Any] = {}

    def addr(self, target: dict[str, Any]) -> tuple[str, int]:
        if "forwarder" in target:
            return ("127.0.0.1", self.forwarders[target["forwarder"]].listeners[0].port)
        host, port = target["addr"]
        return (str(host), int(port))

    def run(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "forward":
            fwd = start_forwarder(command)
            self.forwarders[command["name"]] = fwd
            return {"port": fwd.listeners[0].port, "helper": getattr(fwd, "helper_pid", 0)}
        if op == "unforward":
            self.forwarders.pop(command["name"]).close()
            return {}
        if op == "start":
            return start_cost(command, self.timeout)
        addr = self.addr(command["target"])
        if op == "load":
            pids = {**command["pids"], "app": os.getpid()}
            result = loadgen.run_load(
                addr, command["spec"], lambda: procfs.snapshot(pids, command["root"]),
                self.timeout)
            return loadgen.account(result, in_app="app")
        if op == "idle":
            rss = procfs.tree_rss_kib if command.get("tree") else procfs.rss_kib
            return loadgen.idle_steps(addr, command["plan"], lambda: rss(os.getpid()),
                                      self.timeout, command["settle"])
        if op == "busy":
            return busy_app(addr, command, self.timeout)
        raise BenchError(f"unknown op {op!r}")

    def close(self) -> None:
        for fwd in self.forwarders.values():
            fwd.close()
        self.forwarders.clear()


def main() -> int:
    args = child_arguments(__doc__.split("\n\n")[0]).parse_args()
    child_setup(args.deadline_at, args.nofile, watch_stdin=False)
    app = App(args.io_timeout)
    reply({"pid": os.getpid()})
    try:
        for line in sys.stdin:
            command = json.loads(line)
            if command["op"] == "quit":
                break
            try:
                reply({"ok": True, **app.run(command)})
            except Exception as exc:
                reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        app.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
