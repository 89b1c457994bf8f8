"""An app that returns from main with forwarders still open: the exit hook closes them.

Two forwarders (one with a TCP and a unix listener, one with a unix
listener) and the reference daemon are left open when main() returns.  With
`busy`, two tunnels are working at that moment: one streaming both ways
through an echo guest, one stuck writing to a local client that never reads
(a source guest sends without end).  An exit hook registered before gforward
is imported runs after gforward's own, and reports what the exit left: the
services closed, the unix socket files gone, no hub thread alive, each busy
tunnel ended.  The test checks the report, the exit status and an empty
stderr (no traceback, no warning), and that the run ends in a few seconds.

    python tests/apps/exit_open.py plain|patched idle|busy DIR
"""

import sys

if sys.argv[1] == "patched":
    from gevent import monkey

    monkey.patch_all()

import atexit
import os
import socket
import threading
import time
from typing import Any

import gevent.monkey
import support

left: dict[str, Any] = {}  # what main() leaves open, for the report


def report() -> None:
    """Runs after gforward's exit hook (atexit runs hooks last-registered first)."""
    say = support.say
    took = time.monotonic() - left["returned"]
    say(f"gforward's exit hook done {took:.2f} s after main returned")
    services = left["services"]
    say(f"services closed at exit: {[service.closed for service in services]}")
    say(f"unix socket files left: {[p for p in left['unix'] if os.path.lexists(p)]}")
    # The shared "gforward hub" thread outlives its services (idle, a daemon thread);
    # no other gforward thread may be left.
    hubs = [t.name for t in threading.enumerate()
            if t.name.startswith("gforward") and t.name != "gforward hub"]
    say(f"hub threads alive: {hubs}")
    for outcome in left["tunnels"].values():
        outcome["drain"].set()
    for name, outcome in left["tunnels"].items():
        finished = outcome["done"].wait(5)
        say(f"{name} tunnel: {outcome.get('end', 'no end seen') if finished else 'still open'}")


atexit.register(report)  # before gforward's hook is registered, so that it runs after it

import gforward  # noqa: E402
import gforward.daemon  # noqa: E402

CHUNK = 64 * 1024


def source_guest() -> str:
    """A guest that sends to each connection until it fails; returns its "127.0.0.1:port"."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    block = b"\x5a" * CHUNK

    def pour(conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    conn.sendall(block)
            except OSError:
                pass

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=pour, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}"


def streaming(port: int, outcome: dict[str, Any]) -> None:
    """Echo CHUNKs through a tunnel as fast as it goes, until the tunnel ends."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    payload = os.urandom(CHUNK)
    try:
        support.exchange(sock, payload)
        outcome["flowing"].set()
        while True:
            support.exchange(sock, payload)
    except EOFError:
        outcome["end"] = "eof"
    except ConnectionError:  # reset, or a broken pipe while sending
        outcome["end"] = "reset"
    except (OSError, AssertionError) as exc:
        outcome["end"] = f"failed: {exc!r}"
    finally:
        sock.close()
        outcome["done"].set()


def stuck(port: int, outcome: dict[str, Any]) -> None:
    """Read nothing until the tunnel is full and gforward blocked writing; at exit, its end."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        support.recv_exactly(sock, 1)
        time.sleep(0.5)
        outcome["flowing"].set()
        outcome["drain"].wait()  # set by the exit report, after gforward's hook
        outcome["end"] = support.ending(sock, 5)
    finally:
        sock.close()
        outcome["done"].set()


def main() -> int:
    load, tmp = sys.argv[2:4]
    support.watchdog(30)
    support.say(f"patched: {gevent.monkey.is_module_patched('socket')}")
    unix = [os.path.join(tmp, "a.sock"), os.path.join(tmp, "b.sock")]
    echo = support.start_echo_guest()
    source = source_guest()
    daemon = gforward.daemon.start()
    first = gforward.start(base_url=daemon.url, vm_name="exit-a",
                           specs=[f"127.0.0.1:0:{echo}", f"{unix[0]}:{echo}",
                                  f"127.0.0.1:0:{source}"])
    second = gforward.start(base_url=daemon.url, vm_name="exit-b", specs=[f"{unix[1]}:{echo}"])
    assert all(os.path.exists(path) for path in unix)
    left.update(services=[first, second, daemon], unix=unix, tunnels={})
    if load == "busy":
        for name, run, port in (("streaming", streaming, first.listeners[0].port),
                                ("stuck", stuck, first.listeners[2].port)):
            outcome = left["tunnels"][name] = {
                event: threading.Event() for event in ("flowing", "drain", "done")}
            # Daemon threads (greenlets when patched): nothing the exit waits for.
            threading.Thread(target=run, args=(port, outcome), daemon=True).start()
            assert outcome["flowing"].wait(10), f"{name} tunnel never got going"
        support.say("two tunnels busy: one streaming both ways, one stuck writing")
    support.say(f"returning from main with {len(left['services'])} services open")
    left["returned"] = time.monotonic()
    return 0


if __name__ == "__main__":
    sys.exit(main())
