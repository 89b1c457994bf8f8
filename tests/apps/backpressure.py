"""A local client that does not read while the guest sends: gforward must not buffer it all.

Run by tests/test_forwarder.py as a subprocess (plain process, no gevent
patching): reference daemon + forwarder + a TCP guest that sends TOTAL bytes
as fast as the tunnel takes them.  The client connects, reads nothing until
the guest stops making progress, and only then reads everything.  tracemalloc
measures the Python heap of the whole process meanwhile.  Prints one JSON
line; exit status 0 means the script itself ran to the end.

    python tests/apps/backpressure.py [TOTAL_MIB]
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import tracemalloc

import gforward
import gforward.daemon

CHUNK = 1024 * 1024
STALL = 2.0  # seconds without progress that count as "the guest is held back"
MAX_WAIT = 60.0


def main() -> int:
    total = int(sys.argv[1]) * CHUNK if len(sys.argv) > 1 else 256 * CHUNK
    tracemalloc.start()
    block = memoryview(b"\xa5" * CHUNK)
    sent = [0]
    done = threading.Event()

    guest = socket.socket()
    guest.bind(("127.0.0.1", 0))
    guest.listen(1)

    def serve() -> None:
        conn, _ = guest.accept()
        with conn:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            while sent[0] < total:
                conn.sendall(block[: min(CHUNK, total - sent[0])])
                sent[0] += min(CHUNK, total - sent[0])
        done.set()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    guest_port = guest.getsockname()[1]
    result: dict[str, object] = {"total": total}
    with gforward.daemon.start() as daemon, gforward.start(
        base_url=daemon.url, vm_name="mem", specs=[f"127.0.0.1:0:127.0.0.1:{guest_port}"]
    ) as fwd:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.settimeout(30)
        client.connect(("127.0.0.1", fwd.listeners[0].port))
        baseline = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        # Not reading: wait until the guest stops getting anywhere (or has sent it all).
        last, last_change, began = -1, time.monotonic(), time.monotonic()
        while not done.is_set() and time.monotonic() - began < MAX_WAIT:
            if sent[0] != last:
                last, last_change = sent[0], time.monotonic()
            elif time.monotonic() - last_change >= STALL:
                break
            time.sleep(0.1)
        current, peak = tracemalloc.get_traced_memory()
        result.update(stalled_at=sent[0], guest_finished_unread=done.is_set(),
                      heap_growth_stalled=current - baseline,
                      heap_peak_stalled=peak - baseline)
        # Now read it all: nothing may be lost.
        received = 0
        wrong = 0
        with client:
            while True:
                data = client.recv(CHUNK)
                if not data:
                    break
                received += len(data)
                wrong += len(data) - data.count(0xA5)
        result.update(received=received, wrong_bytes=wrong,
                      heap_peak_total=tracemalloc.get_traced_memory()[1] - baseline)
    server.join(10)
    guest.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
