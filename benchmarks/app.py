"""The "app": a plain (unpatched) Python process, as legacy apps are: `python -m benchmarks.app`.

It calls `gforward.start()` when told to and runs the load generator itself, so
that the "gforward (in-app)" column measures gforward sharing a process, and its
interpreter lock, with the app. The same process with no forwarder of its own
is the app of the "busy" scenario for the other columns: one thread busy in pure
Python while another does 1-byte round trips, through whatever it is pointed at.

Commands come on stdin, one JSON object a line; each answer is one line
``BENCH {json}`` on stdout, with "ok" false and "error" when it failed:

* ``{"op": "forward", "name": N, "url": U, "spec": S}``: start a forwarder; its "port";
* ``{"op": "unforward", "name": N}``: close it;
* ``{"op": "load", "target": T, "spec": L, "pids": {...}, "root": PID}``: one
  `benchmarks.loadgen.run_load`, with CPU figures (``T`` is ``{"forwarder": N}`` or
  ``{"addr": [HOST, PORT]}``);
* ``{"op": "idle", "target": T, "plan": [...], "settle": S}``: idle tunnels, this
  process's RSS with each step;
* ``{"op": "busy", "target": T, "count": C, "warmup": W, "seconds": S}``: round trips
  idle, then beside a busy thread;
* ``{"op": "quit"}`` (or EOF): close everything and exit.
"""

from __future__ import annotations

import json
import os
import sys
import threading
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


def busy_round_trips(addr: tuple[str, int], count: int, warmup: int, seconds: float,
                     timeout: float) -> dict[str, Any]:
    """1-byte round trips from this process: idle, then while another thread spins."""
    idle = loadgen.latency(loadgen.round_trips(addr, count, warmup, timeout, seconds))
    stop = threading.Event()
    spinner = threading.Thread(target=spin, args=(stop,), name="busy", daemon=True)
    spinner.start()
    try:
        busy = loadgen.latency(loadgen.round_trips(addr, count, warmup, timeout, seconds))
    finally:
        stop.set()
        spinner.join()
    return {"idle": idle, "busy": busy}


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
            import gforward

            fwd = gforward.start(base_url=command["url"], vm_name=VM, specs=[command["spec"]],
                                 token=command.get("token", ""))
            self.forwarders[command["name"]] = fwd
            return {"port": fwd.listeners[0].port, "version": gforward.__version__}
        if op == "unforward":
            self.forwarders.pop(command["name"]).close()
            return {}
        addr = self.addr(command["target"])
        if op == "load":
            pids = {**command["pids"], "app": os.getpid()}
            result = loadgen.run_load(
                addr, command["spec"], lambda: procfs.snapshot(pids, command["root"]),
                self.timeout)
            return loadgen.account(result, in_app="app")
        if op == "idle":
            return loadgen.idle_steps(addr, command["plan"], lambda: procfs.rss_kib(os.getpid()),
                                      self.timeout, command["settle"])
        if op == "busy":
            return busy_round_trips(addr, command["count"], command["warmup"],
                                    command["seconds"], self.timeout)
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
