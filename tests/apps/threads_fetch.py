"""Many threads of a plain app fetching through one forwarder at the same time.

Plain process (gevent not patched): the reference daemon, an HTTP guest and
one forwarder with a TCP and a unix listener, all in this process, the
forwarder in its own hub thread.  THREADS threads start together at a
barrier; each fetches ROUNDS pages of its own sizes, alternating urllib
through the TCP listener and http.client through the unix listener, every
byte checked.  Prints what it checked and exits 0 only if every fetch
succeeded.

    python tests/apps/threads_fetch.py THREADS
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time

import gevent.monkey
import support

import gforward
import gforward.daemon

ROUNDS = 4
MAX_SIZE = 192 * 1024


def main() -> int:
    count = int(sys.argv[1])
    support.watchdog(40)
    say = support.say
    say(f"patched: {gevent.monkey.is_module_patched('socket')}")
    with tempfile.TemporaryDirectory(prefix="gf-", dir="/tmp") as tmp, \
            support.http_guest() as guest, gforward.daemon.start() as daemon:
        unix = os.path.join(tmp, "web.sock")
        fwd = gforward.start(base_url=daemon.url, vm_name="threads",
                             specs=[f"127.0.0.1:0:{guest}", f"{unix}:{guest}"])
        with fwd:
            port = fwd.listeners[0].port
            go = threading.Barrier(count, timeout=20)
            lock = threading.Lock()
            checked = [0, 0]  # fetches, bytes
            errors: list[str] = []

            def client(i: int) -> None:
                try:
                    go.wait()
                    for r in range(ROUNDS):
                        seed = i * ROUNDS + r
                        size = 1 + seed * 7919 % MAX_SIZE
                        got = support.fetch(port if (i + r) % 2 == 0 else unix, seed, size)
                        with lock:
                            checked[0] += 1
                            checked[1] += got
                except BaseException as exc:  # reported below, with the thread's number
                    go.abort()
                    with lock:
                        errors.append(f"thread {i}: {exc!r}")

            began = time.monotonic()
            threads = support.run_threads(client, count, "client", 30)
            alive = sum(thread.is_alive() for thread in threads)
            say(f"{count} threads x {ROUNDS} fetches at once (TCP and unix listener): "
                f"{checked[0]} fetched, {checked[1]} bytes checked, {len(errors)} failed, "
                f"{alive} still running, in {support.elapsed(began)}")
            for error in errors[:5]:
                say(f"  {error}")
            ok = not errors and not alive and checked[0] == count * ROUNDS
        say(f"forwarder closed: {fwd.wait(0)}; unix socket file removed: "
            f"{not os.path.lexists(unix)}")
        ok = ok and fwd.wait(0) and not os.path.lexists(unix)
    say("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
