"""The load generator: every workload the benchmarks drive, on the client side.

`run_load(addr, spec, mark, timeout)` runs one workload against `addr` (the
guest itself, or a forwarder's listener) and returns its figures. Two engines:

* plain blocking sockets, one thread per stream, for bulk transfers and the
  1-byte echo round trip: a blocking send/recv is the cheapest way to move a
  GiB or to wait for one byte;
* one thread with an epoll loop (`benchmarks.loadloop`) for many connections at
  once: small requests on keep-alive connections (pipelined or not), one
  connection per request, tunnel setup. A few microseconds of Python per
  request, or the load generator, not the forwarder, would set the pace.

`mark()` is called at the edges of the measured window (after any warm-up) and
its two results are returned as "marks": the caller reads the forwarder's CPU
there (`benchmarks.procfs.snapshot`). Idle tunnels (`idle_steps`) are here too;
the checked streams of benchmarks/soak.py are in `benchmarks.loadloop`.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable

from benchmarks import procfs
from benchmarks import protocol as p
from benchmarks.children import BenchError
from benchmarks.loadloop import SETTLE, Client, KeepAlive, Load, Mark, OneShot, drive

_PAYLOAD = memoryview(os.urandom(p.CHUNK))


# Blocking sockets, a thread per stream ------------------------------------------------


def connect(addr: tuple[str, int], timeout: float) -> socket.socket:
    """A connected TCP socket, blocking, with kernel send/receive timeouts (no poll per call)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        sock.connect(addr)
        sock.settimeout(None)
        whole = int(timeout)
        timeval = struct.pack("ll", whole, int((timeout - whole) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except BaseException:
        sock.close()
        raise
    return sock


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise BenchError(f"connection closed after {len(data)} of {n} bytes")
        data += more
    return data


def echo_hello(sock: socket.socket) -> None:
    """Pick echo mode and wait for its echo: the tunnel is then up end to end."""
    sock.sendall(p.ECHO)
    if recv_exact(sock, 1) != p.ECHO:
        raise BenchError("the guest did not echo")


def upload_one(addr: tuple[str, int], size: int, timeout: float) -> None:
    with connect(addr, timeout) as sock:
        sock.sendall(p.UPLOAD + p.SIZE.pack(size))
        left = size
        while left >= p.CHUNK:
            sock.sendall(_PAYLOAD)
            left -= p.CHUNK
        if left:
            sock.sendall(_PAYLOAD[:left])
        if recv_exact(sock, 1) != p.UPLOADED:
            raise BenchError("the guest did not acknowledge the upload")


def download_one(addr: tuple[str, int], size: int, timeout: float, *, ask: bool = True) -> int:
    """Read `size` bytes; the bytes read. With `ask=False` the far end (the frames daemon)
    sends without being asked and without end: once `size` bytes are in, half-close and
    read on until its EOF, so that the tunnel ends cleanly rather than reset."""
    buf = bytearray(p.CHUNK)
    with connect(addr, timeout) as sock:
        if ask:
            sock.sendall(p.DOWNLOAD + p.SIZE.pack(size))
        got = 0
        while got < size:
            n = sock.recv_into(buf, min(p.CHUNK, size - got))
            if not n:
                raise BenchError(f"download ended after {got} of {size} bytes")
            got += n
        if not ask:
            sock.shutdown(socket.SHUT_WR)
            while n := sock.recv_into(buf):
                got += n
        return got


def in_threads(n: int, work: Callable[[int], Any], name: str, mark: Mark,
               settle: float = SETTLE) -> tuple[float, list[Any], float, list[Any]]:
    """work(0..n-1) in n threads started together: (wall seconds, results, their CPU,
    marks taken just before they start and `settle` seconds after they are done)."""
    barrier = threading.Barrier(n + 1)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []
    cpu = [0.0] * n
    ends = [0.0] * n

    def body(i: int) -> None:
        start_cpu = time.thread_time()
        try:
            barrier.wait(timeout=60)
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            ends[i] = time.perf_counter()
            cpu[i] = time.thread_time() - start_cpu

    threads = [threading.Thread(target=body, args=(i,), name=f"{name}-{i}", daemon=True)
               for i in range(n)]
    for thread in threads:
        thread.start()
    marks = [mark()]
    main_cpu = time.thread_time()
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=60)
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        first = errors[0]
        raise BenchError(f"{name}: {type(first).__name__}: {first}") from first
    time.sleep(settle)
    marks.append(mark())
    return max(ends) - start, results, sum(cpu) + time.thread_time() - main_cpu, marks


def round_trips(addr: tuple[str, int], count: int, warmup: int, timeout: float,
                max_seconds: float = math.inf) -> list[int]:
    """Nanoseconds of each 1-byte echo round trip on one connection (at most
    `max_seconds` of them, when a busy process makes each one slow)."""
    with connect(addr, timeout) as sock:
        echo_hello(sock)
        for _ in range(warmup):
            sock.sendall(b"x")
            recv_exact(sock, 1)
        times = []
        clock = time.perf_counter_ns
        stop = clock() + max_seconds * 1e9
        for _ in range(count):
            start = clock()
            sock.sendall(b"x")
            if not sock.recv(1):
                raise BenchError("echo connection closed")
            times.append(clock() - start)
            if start > stop:
                break
        return times


def latency(times: Sequence[int]) -> dict[str, float]:
    """Median, p99 and mean of round trips in nanoseconds, in microseconds."""
    ordered = sorted(times)
    return {"count": len(ordered), "median_us": ordered[len(ordered) // 2] / 1000,
            "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1000,
            "mean_us": sum(ordered) / len(ordered) / 1000}


# One workload ----------------------------------------------------------------------------


def run_load(addr: tuple[str, int], spec: dict[str, Any], mark: Mark, timeout: float
             ) -> dict[str, Any]:
    """One workload against `addr`; `spec["kind"]` names it (see the module doc)."""
    kind, settle = spec["kind"], spec.get("settle", SETTLE)
    if kind in ("upload", "download"):
        streams, size = spec["streams"], spec["size"]
        one = upload_one if kind == "upload" else download_one
        seconds, _, cpu, marks = in_threads(streams, lambda _i: one(addr, size, timeout), kind,
                                            mark, settle)
        return {"seconds": seconds, "bytes": streams * size, "loadgen_cpu": cpu, "marks": marks}
    if kind == "drain":
        seconds, results, cpu, marks = in_threads(
            1, lambda _i: download_one(addr, spec["size"], timeout, ask=False), kind, mark,
            settle)
        return {"seconds": seconds, "bytes": results[0], "loadgen_cpu": cpu, "marks": marks}
    if kind == "echo":
        seconds, results, cpu, marks = in_threads(
            1, lambda _i: round_trips(addr, spec["count"], spec["warmup"], timeout), kind, mark,
            settle)
        return {"seconds": seconds, "loadgen_cpu": cpu, "marks": marks, **latency(results[0])}
    if kind == "setup":  # connect, 1-byte echo, close; `concurrency` at a time
        load = Load(addr, p.ECHO, 0, 1, 0)
        load.limit = spec["count"]
        return drive(load, spec["concurrency"], OneShot, mark, warmup=0.0, seconds=math.inf,
                     count=spec["count"], timeout=timeout, settle=settle)
    if kind in ("requests", "per_request"):
        request, reply = spec["request"], spec["reply"]
        head = p.requests_head(request, reply)
        if kind == "requests":
            load = Load(addr, head, request, reply, spec["depth"])
            client: type[Client] = KeepAlive
        else:
            load = Load(addr, head + b"x" * request, request, reply, 0)
            client = OneShot
        return drive(load, spec["clients"], client, mark, warmup=spec["warmup"],
                     seconds=spec["seconds"], count=spec.get("limit", math.inf),
                     timeout=timeout)
    raise BenchError(f"unknown load kind {kind!r}")


# Idle tunnels -----------------------------------------------------------------------------


class IdleTunnels:
    """Idle connections, each confirmed by one echo, held open until close()."""

    def __init__(self, addr: tuple[str, int], timeout: float) -> None:
        self.addr = addr
        self.timeout = timeout
        self.socks: list[socket.socket] = []
        self._lock = threading.Lock()

    def open_up_to(self, total: int, threads: int = 8) -> str:
        """Open tunnels until `total` are held; "" or the error that stopped it."""
        need = total - len(self.socks)
        if need <= 0:
            return ""
        shares = [need // threads + (1 if i < need % threads else 0) for i in range(threads)]
        failure: list[str] = []

        def work(i: int) -> None:
            for _ in range(shares[i]):
                if failure:
                    return
                try:
                    sock = connect(self.addr, self.timeout)
                    with self._lock:
                        self.socks.append(sock)
                    echo_hello(sock)
                except (OSError, BenchError) as exc:
                    failure.append(f"{type(exc).__name__}: {exc}")
                    return

        in_threads(threads, work, "idle", lambda: None, settle=0.0)
        return failure[0] if failure else ""

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks.clear()


def idle_steps(addr: tuple[str, int], plan: Sequence[dict[str, Any]],
               rss_kib: Callable[[], int], timeout: float, settle: float) -> dict[str, Any]:
    """RSS with no tunnel and with each planned count of idle tunnels open.

    Each step of `plan` is {"n": asked, "open": how many to open (0: skip), "note": why
    fewer}; the result's steps add "held", "rss_kib" and "error" (or "skipped").
    """
    with connect(addr, timeout) as sock:  # one tunnel first: lazy imports, first allocations
        echo_hello(sock)
    time.sleep(settle)
    out: dict[str, Any] = {"rss0_kib": rss_kib(), "steps": []}
    tunnels = IdleTunnels(addr, timeout)
    try:
        for step in plan:
            if not step["open"]:
                out["steps"].append({**step, "skipped": step["note"]})
                continue
            error = tunnels.open_up_to(step["open"])
            time.sleep(settle)
            out["steps"].append({**step, "held": len(tunnels.socks), "rss_kib": rss_kib(),
                                 "error": error})
            if error:
                break
    finally:
        tunnels.close()
    return out


def account(result: dict[str, Any], in_app: str = "") -> dict[str, Any]:
    """Turn a load's marks into CPU figures (`benchmarks.procfs.window`), the forwarder's
    as "forwarder_cpu". In an app (`in_app` names its own entry), the forwarder's CPU is
    the app's less the load generator's own."""
    result.update(procfs.window(*result.pop("marks")))
    cpu = result["cpu"]
    if in_app:
        cpu["forwarder"] = max(cpu.pop(in_app) - result["loadgen_cpu"], 0.0)
        result["cpu_sys"].pop(in_app, None)  # not split between the two
    result["forwarder_cpu"] = cpu.get("forwarder")
    return result
