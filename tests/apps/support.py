"""What the app scripts share: guests, checks, a watchdog, process measures.

Each script beside this one is a whole app, run as a subprocess by
tests/test_apps.py (the script's directory is first on sys.path, so
`import support` finds this).  A gevent-patched script imports it after
`monkey.patch_all()`, like any other module, and then the guests below run as
greenlets instead of threads.

The guests stand in for services inside the VM: an HTTP server whose bodies
are derived from the path (so a client checks every byte it gets), and an
echo server (the scripts run without pytest, so they cannot use the suite's
fixtures; this one is small and thread- or greenlet-based as the app is).
"""

from __future__ import annotations

import http.client
import os
import random
import resource
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import gevent.monkey

HUNG = 3  # exit status of a script that the watchdog ended


def watchdog(seconds: float) -> None:
    """End the process with status HUNG unless it is done within `seconds`.

    A real OS thread, even in a patched process, so that a blocked hub cannot
    stop it: a hang shows as a clean failure with a message, not a test
    timeout.  A forked child has no thread of its parent's: it starts its own.
    """
    sleep = gevent.monkey.get_original("time", "sleep")

    def expire() -> None:
        sleep(seconds)
        say(f"HUNG: pid {os.getpid()} not done within {seconds:g} s")
        os._exit(HUNG)

    gevent.monkey.get_original("_thread", "start_new_thread")(expire, ())


def say(*parts: object) -> None:
    """Print a line of what was checked, at once and in one write.

    Forked children share this stdout; print() may write the text and its
    newline separately, letting another process's line land in between.
    """
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (" ".join(map(str, parts)) + "\n").encode())


def verdict(problems: list[str]) -> int:
    """Print each problem and the last line the tests read ("ok" or "FAILED"); the exit status."""
    for problem in problems:
        say(f"PROBLEM {problem}")
    say("FAILED" if problems else "ok")
    return 1 if problems else 0


def run_threads(target: Callable[[int], object], count: int, name: str,
                timeout: float) -> list[threading.Thread]:
    """Threads "NAME 0" to "NAME count-1" running target(i), all started, then each
    joined for at most `timeout` seconds; the caller counts those still alive."""
    threads = [threading.Thread(target=target, args=(i,), name=f"{name} {i}")
               for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return threads


# Guests ---------------------------------------------------------------------------------


def blob(seed: int, size: int) -> bytes:
    """The HTTP guest's body for /blob/SEED/SIZE."""
    return random.Random(seed).randbytes(size)


class _BlobPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        try:
            _, kind, seed, size = self.path.split("/")
            if kind != "blob":
                raise ValueError(kind)
            body = blob(int(seed), int(size))
        except ValueError:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _HTTPGuest(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # dozens of tunnels dial it at once


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echo until EOF, then half-close."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while True:
                data = sock.recv(256 * 1024)
                if not data:
                    break
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _TCPGuest(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


def _start(server: socketserver.BaseServer) -> str:
    """Serve in a daemon thread (a greenlet when patched); returns "127.0.0.1:port"."""
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    host, port = server.server_address[:2]  # type: ignore[misc]
    return f"{host}:{port}"


def start_http_guest() -> str:
    """An HTTP guest serving blob(), until the process ends; returns its "127.0.0.1:port".

    For apps that fork or exit with it running; others use `http_guest()`.
    """
    return _start(_HTTPGuest(("127.0.0.1", 0), _BlobPage))


def start_guest(handler: type[socketserver.BaseRequestHandler]) -> str:
    """A TCP guest, a thread (greenlet) per connection running `handler`, until the
    process ends; returns its "127.0.0.1:port"."""
    return _start(_TCPGuest(("127.0.0.1", 0), handler))


def start_echo_guest() -> str:
    """An echo guest, until the process ends; returns its "127.0.0.1:port"."""
    return start_guest(_EchoHandler)


class GuestProcess:
    """Both guests in a process of their own, as a VM's services are.

    For apps that fork: a forked child inherits none of their server state
    (with `threading` patched, guest threads finishing in a child trip over
    the child's reset thread table).  Ends when stop() closes its stdin, or
    when this process dies.
    """

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "serve"], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.http = self.proc.stdout.readline().split()[1]
        self.echo = self.proc.stdout.readline().split()[1]

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def _serving(server: socketserver.BaseServer) -> Iterator[str]:
    try:
        yield _start(server)
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def http_guest() -> Iterator[str]:
    """An HTTP guest serving blob(); yields its "127.0.0.1:port"."""
    with _serving(_HTTPGuest(("127.0.0.1", 0), _BlobPage)) as where:
        yield where


@contextmanager
def echo_guest() -> Iterator[str]:
    """An echo guest; yields its "127.0.0.1:port"."""
    with _serving(_TCPGuest(("127.0.0.1", 0), _EchoHandler)) as where:
        yield where


# Clients --------------------------------------------------------------------------------


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket: what a client of a unix listener does."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def fetch(where: int | str, seed: int, size: int, timeout: float = 15.0) -> int:
    """GET /blob/SEED/SIZE through a listener (a TCP port or a unix path); checks every byte.

    Returns the number of bytes checked; raises AssertionError on any difference.
    """
    fetch_headers(where, seed, size, timeout)
    return size  # the body equalled blob(seed, size)


def fetch_headers(where: int | str, seed: int, size: int,
                  timeout: float = 15.0) -> http.client.HTTPMessage:
    """fetch(), returning the reply's headers instead."""
    path = f"/blob/{seed}/{size}"
    if isinstance(where, int):
        with urllib.request.urlopen(f"http://127.0.0.1:{where}{path}", timeout=timeout) as resp:
            status, headers, body = resp.status, resp.headers, resp.read()
    else:
        conn = _UnixHTTPConnection(where, timeout)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            status, headers, body = resp.status, resp.headers, resp.read()
        finally:
            conn.close()
    assert status == 200, f"{path} via {where}: status {status}"
    assert body == blob(seed, size), f"{path} via {where}: {len(body)} bytes, content differs"
    return headers


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        data = sock.recv(min(n - got, 256 * 1024))
        if not data:
            raise EOFError(f"EOF after {got} of {n} bytes")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def exchange(sock: socket.socket, message: bytes) -> None:
    """Send `message` through an echo tunnel and check that it comes back whole."""
    sock.sendall(message)
    assert recv_exactly(sock, len(message)) == message, "echo differs"


def ending(sock: socket.socket, timeout: float) -> str:
    """How a stream ends, reading (and dropping) what is still in flight: eof, reset, or timeout."""
    sock.settimeout(timeout)
    try:
        while sock.recv(256 * 1024):
            pass
    except socket.timeout:
        return "timeout"
    except OSError:
        return "reset"
    return "eof"


def can_bind(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now (as in tests/test_forwarder.py)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        except OSError:
            return False
        return True


# Process measures -----------------------------------------------------------------------


def cpu_seconds() -> float:
    """User + system CPU time of the whole process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def thread_cpu_seconds(native_id: int) -> float:
    """User + system CPU time of one OS thread of this process, from /proc."""
    with open(f"/proc/self/task/{native_id}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_state(pid: int) -> str:
    """"gone" (no such process, not even a zombie), or its state letter (Z: a zombie).
    tests/test_isolation.py asks it too."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def socket_inodes() -> set[int]:
    """Inodes of every socket this process has a descriptor for."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def elapsed(since: float) -> str:
    return f"{time.monotonic() - since:.2f} s"



if __name__ == "__main__" and sys.argv[1:] == ["serve"]:  # GuestProcess
    print(f"http {start_http_guest()}", flush=True)
    print(f"echo {start_echo_guest()}", flush=True)
    sys.stdin.read()
