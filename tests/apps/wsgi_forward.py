"""A gevent WSGI app that opens a forward per request, in a patched or a plain process.

gevent.pywsgi serves the app in greenlets of the main hub.  Each request to
/tunnel/N calls gforward.start() from its request greenlet, so the forwarder
joins the server's hub (in a plain process too: no thread of its own), sends
data through it to an echo guest, checks it, and closes it.  Meanwhile:

* a ticker greenlet of the app ticks every 10 ms: it must never stall for
  long and must outlive every close();
* a /slow request keeps a forwarder of its own open, exchanging a message
  through it every 25 ms while the others open and close theirs: each of
  its exchanges must succeed;
* at the end the server still answers a plain request.

Clients speak HTTP/1.0 over gevent sockets, cooperative in both processes.
Prints what it checked; exit 0 only if every check held.

    python tests/apps/wsgi_forward.py plain|patched
"""

import sys

if sys.argv[1] == "patched":
    from gevent import monkey

    monkey.patch_all()

import hashlib
import json
import logging
import threading
import time
from typing import Any, Callable

import gevent
import gevent.monkey
import gevent.pywsgi
import support
from gevent import socket

import gforward
import gforward.daemon

REQUESTS = 12
SLOW_ROUNDS = 40
where: dict[str, str] = {}  # the daemon's URL and the echo guest, once started


def exchange_through(fwd: gforward.Forwarder, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", fwd.listeners[0].port), timeout=10) as sock:
        support.exchange(sock, payload)


class _Threads(logging.Handler):
    """Which thread (greenlet, when patched) each record came from."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int | None] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.add(record.thread)


def open_forward(name: str) -> tuple[gforward.Forwarder, bool]:
    """start() from this request's greenlet; also whether it bound its listeners
    elsewhere (another thread's hub) rather than here, in the caller's hub."""
    threads = _Threads()
    logger = logging.getLogger(f"wsgi_forward.{name}")
    logger.addHandler(threads)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fwd = gforward.start(base_url=where["daemon"], vm_name=name,
                         specs=[f"127.0.0.1:0:{where['echo']}"], logger=logger)
    own_thread = threads.seen != {threading.get_ident()}  # "listening on" came from elsewhere
    return fwd, own_thread


def tunnel(n: int) -> dict[str, Any]:
    fwd, own_thread = open_forward(f"req-{n}")
    try:
        payload = hashlib.sha256(b"%d" % n).digest() * (500 + n)
        exchange_through(fwd, payload)
    finally:
        fwd.close()
    return {"own_thread": own_thread, "closed": fwd.wait(0), "bytes": len(payload)}


def slow() -> dict[str, Any]:
    fwd, own_thread = open_forward("slow")
    done = 0
    with fwd, socket.create_connection(("127.0.0.1", fwd.listeners[0].port), timeout=10) as sock:
        for i in range(SLOW_ROUNDS):
            support.exchange(sock, b"slow round %d " % i * 100)
            done += 1
            gevent.sleep(0.025)
    return {"own_thread": own_thread, "closed": fwd.wait(0), "rounds": done}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    path = environ["PATH_INFO"]
    if path.startswith("/tunnel/"):
        body = json.dumps(tunnel(int(path.rsplit("/", 1)[1]))).encode()
    elif path == "/slow":
        body = json.dumps(slow()).encode()
    else:
        body = b"hello"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]


def http_get(port: int, path: str) -> tuple[str, bytes]:
    """A cooperative HTTP/1.0 GET; returns the status line and the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode(), body


def main() -> int:
    support.watchdog(30)
    say = support.say
    say(f"patched: {gevent.monkey.is_module_patched('socket')}")
    problems: list[str] = []
    ticks: list[float] = []

    def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            gevent.sleep(0.01)

    with support.echo_guest() as echo, gforward.daemon.start() as daemon:
        where.update(daemon=daemon.url, echo=echo)
        server = gevent.pywsgi.WSGIServer(("127.0.0.1", 0), app, log=None)
        server.start()
        port = server.server_port
        tick = gevent.spawn(ticker)
        try:
            slow_job = gevent.spawn(http_get, port, "/slow")
            gevent.sleep(0.1)
            began = time.monotonic()
            jobs = [gevent.spawn(http_get, port, f"/tunnel/{n}") for n in range(REQUESTS)]
            gevent.joinall(jobs, timeout=20)
            took = support.elapsed(began)
            slow_job.join(timeout=10)
            results = []
            for n, job in enumerate(jobs):
                if not job.successful():
                    problems.append(f"/tunnel/{n}: {job.exception!r}")
                    continue
                status, body = job.value
                if not status.endswith("200 OK"):
                    problems.append(f"/tunnel/{n}: {status} {body[:200]!r}")
                    continue
                results.append(json.loads(body))
            if any(r["own_thread"] for r in results) or not all(r["closed"] for r in results):
                problems.append(f"tunnel results: {results}")
            say(f"{len(results)} of {REQUESTS} concurrent requests each started a forward in "
                f"its request greenlet (in the server's hub, no thread of its own), carried "
                f"{sum(r['bytes'] for r in results)} bytes through it and closed it, in "
                f"{took}")
            status, body = slow_job.value if slow_job.successful() else ("failed", b"{}")
            slow_result = json.loads(body or b"{}")
            say(f"/slow kept its own forward open meanwhile: {status}, {slow_result}")
            if slow_result != {"own_thread": False, "closed": True, "rounds": SLOW_ROUNDS}:
                problems.append(f"/slow: {status} {body[:200]!r}")
            status, body = http_get(port, "/")
            say(f"the server still answers: {status} {body!r}")
            if body != b"hello":
                problems.append(f"plain request: {status} {body!r}")
            gaps = [b - a for a, b in zip(ticks, ticks[1:])]
            say(f"ticker greenlet alive: {not tick.dead}, {len(ticks)} ticks, "
                f"longest gap {max(gaps):.3f} s")
            if tick.dead or max(gaps) > 1.0:
                problems.append("the ticker greenlet stalled or died")
        finally:
            tick.kill()
            server.stop(timeout=5)
    return support.verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
