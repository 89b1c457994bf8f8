"""An idle process with open forwarders uses next to no CPU: no hub spins.

Starts the reference daemon and two forwarders (TCP and unix listeners),
carries some traffic, leaves one tunnel open and idle, lets everything settle,
then sleeps WALL seconds and measures the CPU time the whole process used
meanwhile (getrusage), and, in a plain process, each hub thread's own
(/proc/self/task/TID/stat): a hub that held the GIL in a busy loop would show
there.  Prints what it measured and, last, a JSON line for the test, which
asserts a generous bound; this is not a timing benchmark.

    python tests/apps/idle_cpu.py plain|patched DIR
"""

import sys

if sys.argv[1] == "patched":
    from gevent import monkey

    monkey.patch_all()

import json
import os
import socket
import threading
import time

import gevent.monkey
import support

import gforward
import gforward.daemon

WALL = 2.0
SETTLE = 0.5


def main() -> int:
    support.watchdog(30)
    tmp = sys.argv[2]
    patched = gevent.monkey.is_module_patched("socket")
    support.say(f"patched: {patched}")
    with support.echo_guest() as echo, gforward.daemon.start() as daemon, \
            gforward.start(base_url=daemon.url, vm_name="idle-a",
                           specs=[f"127.0.0.1:0:{echo}", f"{tmp}/a.sock:{echo}"]) as first, \
            gforward.start(base_url=daemon.url, vm_name="idle-b",
                           specs=[f"{tmp}/b.sock:{echo}"]) as second:
        for listener in [*first.listeners, *second.listeners]:
            family = socket.AF_INET if listener.port else socket.AF_UNIX
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(("127.0.0.1", listener.port) if listener.port else listener.local)
                support.exchange(sock, os.urandom(1 << 20))
        with socket.create_connection(("127.0.0.1", first.listeners[0].port), timeout=10) as idle:
            support.exchange(idle, b"then nothing")
            time.sleep(SETTLE)
            hubs = {t.name: t.native_id for t in threading.enumerate()
                    if t.name.startswith("gforward") and t.native_id is not None}
            cpu_before = support.cpu_seconds()
            hub_before = {name: support.thread_cpu_seconds(tid) for name, tid in hubs.items()}
            began = time.monotonic()
            time.sleep(WALL)
            wall = time.monotonic() - began
            cpu = support.cpu_seconds() - cpu_before
            hub_cpu = {name: round(support.thread_cpu_seconds(tid) - hub_before[name], 3)
                       for name, tid in hubs.items()}
            support.exchange(idle, b"still there")  # the idle tunnel was alive all along
    support.say(f"idle for {wall:.2f} s with 3 services and an open tunnel: process CPU "
                f"{cpu:.3f} s; hub threads' CPU {hub_cpu or '(none: one hub, the main one)'}")
    support.say(json.dumps({"patched": patched, "wall": wall, "cpu": cpu, "hub_cpu": hub_cpu}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
