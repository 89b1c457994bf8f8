"""Operating a forwarder from the app's other threads: stats, and a draining close.

    python tests/apps/operate.py plain|patched

A guest that answers one second after a request ends, the reference daemon and
a forwarder, all in this process (patched by gevent first, if asked: threads
are then greenlets).  One thread sends a request; another watches stats()
until the tunnel is open, then closes the forwarder with drain=10 while the
reply is still coming.  The reply must arrive whole, the close must have
waited for it, a connection tried during the drain must be refused, and the
stats must count one tunnel, none failed, every byte.  Exits 0 if all held.
"""

import sys

if sys.argv[1:] == ["patched"]:
    from gevent import monkey

    monkey.patch_all()

import socket
import socketserver
import threading
import time

import support

import gforward
import gforward.daemon

REQUEST = b"what is the answer?"
REPLY = b"42, after some thought"


class _Thinker(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        got = b""
        while chunk := self.request.recv(1024):
            got += chunk
        time.sleep(1.0)
        self.request.sendall(REPLY if got == REQUEST else b"?")


def main() -> int:
    support.watchdog(40)
    problems: list[str] = []
    guest = support.start_guest(_Thinker)
    daemon = gforward.daemon.start()
    fwd = gforward.start(base_url=daemon.url, vm_name="ops",
                         specs=[f"127.0.0.1:0:{guest}"])
    port = fwd.listeners[0].port
    replies: list[bytes] = []

    def client() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(REQUEST)
            sock.shutdown(socket.SHUT_WR)
            replies.append(support.recv_exactly(sock, len(REPLY)))

    asking = threading.Thread(target=client)
    asking.start()
    deadline = time.monotonic() + 10
    while fwd.stats().tunnels_open != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    drained: list[float] = []

    def operator() -> None:
        began = time.monotonic()
        fwd.close(drain=10.0)
        drained.append(time.monotonic() - began)

    closing = threading.Thread(target=operator)
    closing.start()
    time.sleep(0.2)
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        problems.append("a connection during the drain was accepted")
    except ConnectionRefusedError:
        support.say("a connection during the drain: refused")
    asking.join(15)
    closing.join(15)
    stats = fwd.stats()
    support.say(f"reply: {replies}; close(drain=10) took {drained}")
    support.say(f"stats: total={stats.tunnels_total} failed={stats.tunnels_failed} "
                f"up={stats.bytes_up} down={stats.bytes_down}")
    if replies != [REPLY]:
        problems.append(f"the reply was {replies!r}")
    if not drained or not 0.5 < drained[0] < 10:
        problems.append(f"the drain took {drained}")
    if (stats.tunnels_total, stats.tunnels_failed, stats.tunnels_open) != (1, 0, 0):
        problems.append(f"stats counted {stats}")
    if (stats.bytes_up, stats.bytes_down) != (len(REQUEST), len(REPLY)):
        problems.append(f"stats counted {stats.bytes_up} up, {stats.bytes_down} down")
    daemon.close()
    return support.verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
