#!/usr/bin/env python3
"""gforward's throughput benchmark: the direct path to a guest against the tunnel.

    python benchmarks/throughput.py                  # full run (minutes)
    python benchmarks/throughput.py --quick          # a few seconds: the CI smoke test
    python benchmarks/throughput.py --json out.json --plot out.png
    python benchmarks/throughput.py --profile prof/  # also py-spy the forwarder (up/down)

Everything runs on loopback, each part in its own process, as in real use:

* a guest service (this file, ``--role guest``, gevent): the first byte picks
  the mode: ``E`` echoes (the ``E`` itself included) until EOF, ``U`` + 8-byte
  size swallows that many bytes and answers ``K``, ``D`` + 8-byte size sends
  that many bytes, then EOF;
* the reference daemon, ``python -m gforward.daemon``;
* gforward as a process of its own: the ``gforward`` command line
  (``python -m gforward``), or a small runner around ``gforward.start()``
  (``--role forwarder``) where the command line is missing;
* an "app" process (``--role app``): a plain, unpatched process that calls
  ``gforward.start()`` and runs the same load generator against its own
  listener, the way legacy apps use gforward.

The load generator (plain blocking sockets, one thread per stream, kernel
send/receive timeouts on every socket) runs in this process for the "direct"
and "gforward (process)" columns and in the app for "gforward (in-app)".
Each scenario runs in the three columns one after the other. CPU that the
machine spent outside this run's processes during a scenario is reported
("other load"): such figures are pessimistic.

``--profile DIR`` then records the forwarder process with py-spy (``pip install
py-spy``) during a 1-stream upload, a 1-stream download and a sequential
tunnel setup, writes collapsed stacks to DIR (speedscope.app opens them) and
prints the top hot spots; ``--profile-native`` adds C frames (py-spy then
pauses the process at each sample: the speed shown is not representative).

Forwarder CPU: the forwarder process's utime+stime from /proc/PID/stat; in
the app, the process's rusage less the load generator's own thread CPU time.
Memory: the forwarder's VmRSS (in the app: the whole app process, load
generator sockets included) with idle tunnels open, each in a fresh process.
MB = 10**6 bytes, MiB/GiB = 2**20/2**30 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
CHUNK = 1 * MiB  # load generator and guest read/write size
VM = "bench"
SIZE_HEADER = struct.Struct("!Q")
MODES = ("direct", "process", "app")
COLUMNS = {"direct": "direct", "process": "gforward (process)", "app": "gforward (in-app)"}
FDS_PER_TUNNEL = "1 in the load generator, 2 in the forwarder, 2 in the daemon, 1 in the guest"
FD_MARGIN = 256  # fds a process needs besides its tunnels (asked for)
FD_SPARE = 32  # fds kept free beyond those a process has open now (planned with)
START_TIME = time.monotonic()


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


class BenchTimeout(BenchError):
    """The global deadline passed."""


# Figures and targets -------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    has_direct: bool
    digits: int


@dataclass(frozen=True)
class Target:
    value: float
    note: str

    def met(self, figure: Figure, measured: float) -> bool:
        if figure.higher_is_better:
            return measured >= self.value
        return measured <= self.value


def figures(small: int, large: int | None) -> list[Figure]:
    """Every figure the benchmark reports, in table order."""
    return [
        Figure("upload_1", "upload, 1 stream", "MB/s", True, True, 0),
        Figure("download_1", "download, 1 stream", "MB/s", True, True, 0),
        Figure("upload_8", "upload, 8 streams", "MB/s", True, True, 0),
        Figure("download_8", "download, 8 streams", "MB/s", True, True, 0),
        Figure("rtt_median", "1-byte echo round trip, median", "us", False, True, 1),
        Figure("rtt_p99", "1-byte echo round trip, p99", "us", False, True, 1),
        Figure("setup_seq", "tunnel setup, sequential", "conn/s", True, True, 0),
        Figure("setup_conc", "tunnel setup, 50 concurrent", "conn/s", True, True, 0),
        Figure("cpu_upload_1", "forwarder CPU, upload 1 stream", "s/GiB", False, False, 2),
        Figure("cpu_download_1", "forwarder CPU, download 1 stream", "s/GiB", False, False, 2),
        Figure("cpu_upload_8", "forwarder CPU, upload 8 streams", "s/GiB", False, False, 2),
        Figure("cpu_download_8", "forwarder CPU, download 8 streams", "s/GiB", False, False, 2),
        Figure("cpu_per_conn", "forwarder CPU per connection", "ms", False, False, 3),
        Figure("rss_idle_0", "forwarder RSS, no tunnel", "MiB", False, False, 1),
        Figure("rss_idle_small", f"forwarder RSS, {small} idle tunnels", "MiB", False, False, 1),
        Figure("rss_idle_large", f"forwarder RSS, {large or 10000} idle tunnels", "MiB", False,
               False, 1),
        Figure("kib_per_tunnel", "forwarder memory per idle tunnel", "KiB", False, False, 1),
        Figure("tunnels_held", "idle tunnels held", "", True, False, 0),
    ]


# The project's targets, set against the Go reference client, which measured 283/486 MB/s
# (1 stream up/down), 602/796 (8 streams), 152 us echo, 709/834 tunnels/s, ~45 KiB per idle
# tunnel.
TARGETS: dict[str, Target] = {
    "upload_1": Target(566, "2x Go 283"),
    "download_1": Target(729, "1.5x Go 486"),
    "upload_8": Target(1204, "2x Go 602 (derived)"),
    "download_8": Target(1194, "1.5x Go 796 (derived)"),
    "rtt_median": Target(120, "Go 152"),
    "setup_seq": Target(800, "Go 709"),
    "setup_conc": Target(800, "Go 834"),
    "cpu_upload_1": Target(1.0, "Go 2.8"),
    "cpu_download_1": Target(1.0, "Go 1.4"),
    "cpu_upload_8": Target(1.0, ""),
    "cpu_download_8": Target(1.0, ""),
    "kib_per_tunnel": Target(20, "Go ~45"),
    "tunnels_held": Target(10000, ""),
}


# Small helpers ---------------------------------------------------------------


def log(message: str) -> None:
    """Progress, on stderr, with the time since the start."""
    print(f"[{time.monotonic() - START_TIME:7.1f}s] {message}", file=sys.stderr, flush=True)


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE towards `want` (the hard limit too, where allowed); the new soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
        return want
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_parts(pid: int) -> tuple[float, float]:
    """(utime, stime) of a whole process (threads that ended included), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def proc_cpu(pid: int) -> float:
    return sum(proc_cpu_parts(pid))


def machine_cpu() -> tuple[float, float, float]:
    """(process time, irq + softirq time, steal) of the whole machine so far, from /proc/stat.

    Loopback TCP does much of its work in softirqs, which the kernel may count apart
    from any process: that is the run's own work, not other load.
    """
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    steal = fields[7] if len(fields) > 7 else 0
    return (user + nice + system) / tick, (irq + softirq) / tick, steal / tick


def proc_rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)i?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1G, 256M, 65536)")
    scale = {"": 1, "k": 1 << 10, "m": MiB, "g": GiB}[match.group(2).lower()]
    size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return size


def start_watchdog(deadline_at: float) -> None:
    """A child that outlives the run's deadline ends itself."""

    def watch() -> None:
        while time.time() < deadline_at:
            time.sleep(min(1.0, max(deadline_at - time.time(), 0.01)))
        print("deadline passed; exiting", file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=watch, name="deadline", daemon=True).start()


def exit_on_stdin_eof() -> None:
    """A child whose parent is gone (its stdin closed) ends itself."""

    def watch() -> None:
        with contextlib.suppress(OSError):
            while os.read(sys.stdin.fileno(), 4096):
                pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="stdin-eof", daemon=True).start()


# The load generator (plain sockets, threads) ------------------------------------


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
    sock.sendall(b"E")
    if recv_exact(sock, 1) != b"E":
        raise BenchError("the guest did not echo")


_PAYLOAD = memoryview(os.urandom(CHUNK))


def upload_one(addr: tuple[str, int], size: int, timeout: float) -> None:
    with connect(addr, timeout) as sock:
        sock.sendall(b"U" + SIZE_HEADER.pack(size))
        left = size
        while left >= CHUNK:
            sock.sendall(_PAYLOAD)
            left -= CHUNK
        if left:
            sock.sendall(_PAYLOAD[:left])
        if recv_exact(sock, 1) != b"K":
            raise BenchError("the guest did not acknowledge the upload")


def download_one(addr: tuple[str, int], size: int, timeout: float) -> None:
    buf = bytearray(CHUNK)
    with connect(addr, timeout) as sock:
        sock.sendall(b"D" + SIZE_HEADER.pack(size))
        got = 0
        while got < size:
            n = sock.recv_into(buf, min(CHUNK, size - got))
            if not n:
                raise BenchError(f"download ended after {got} of {size} bytes")
            got += n


def in_threads(n: int, work: Callable[[int], Any], name: str) -> tuple[float, list[Any], float]:
    """Run work(0..n-1) in n threads started together: (wall seconds, results, their CPU)."""
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
    with contextlib.suppress(threading.BrokenBarrierError):
        barrier.wait(timeout=60)
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        first = errors[0]
        raise BenchError(f"{name}: {type(first).__name__}: {first}") from first
    return max(ends) - start, results, sum(cpu)


def run_load(addr: tuple[str, int], spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One load scenario against `addr`; spec["kind"] is upload, download, echo or setup."""
    kind = spec["kind"]
    if kind in ("upload", "download"):
        streams, size = spec["streams"], spec["size"]
        one = upload_one if kind == "upload" else download_one
        seconds, _, cpu = in_threads(streams, lambda _i: one(addr, size, timeout), kind)
        return {"seconds": seconds, "bytes": streams * size, "loadgen_cpu": cpu}
    if kind == "echo":
        count, warmup = spec["count"], spec["warmup"]

        def echo(_i: int) -> list[int]:
            with connect(addr, timeout) as sock:
                echo_hello(sock)
                for _ in range(warmup):
                    sock.sendall(b"x")
                    recv_exact(sock, 1)
                times = []
                clock = time.perf_counter_ns
                for _ in range(count):
                    start = clock()
                    sock.sendall(b"x")
                    if not sock.recv(1):
                        raise BenchError("echo connection closed")
                    times.append(clock() - start)
                return times

        seconds, results, cpu = in_threads(1, echo, "echo")
        times = sorted(results[0])
        return {"seconds": seconds, "count": count, "loadgen_cpu": cpu,
                "median_us": times[len(times) // 2] / 1000,
                "p99_us": times[min(len(times) - 1, int(len(times) * 0.99))] / 1000,
                "mean_us": sum(times) / len(times) / 1000}
    if kind == "setup":
        concurrency = spec["concurrency"]
        each = math.ceil(spec["count"] / concurrency)

        def setup(_i: int) -> None:
            for _ in range(each):
                with connect(addr, timeout) as sock:
                    echo_hello(sock)

        seconds, _, cpu = in_threads(concurrency, setup, "setup")
        return {"seconds": seconds, "count": each * concurrency, "loadgen_cpu": cpu}
    raise BenchError(f"unknown load kind {kind!r}")


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

        in_threads(threads, work, "idle")
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


# Child roles ---------------------------------------------------------------------


def guest_main(args: argparse.Namespace) -> int:
    """The guest service: fast, gevent, never the bottleneck."""
    raise_nofile(args.nofile)
    start_watchdog(args.deadline_at)
    exit_on_stdin_eof()
    from gevent import socket as gsocket
    from gevent.server import StreamServer

    payload = memoryview(os.urandom(CHUNK))
    timeout = args.io_timeout

    def handle(sock: Any, _address: Any) -> None:
        sock.settimeout(timeout)
        sock.setsockopt(gsocket.IPPROTO_TCP, gsocket.TCP_NODELAY, 1)
        try:
            mode = sock.recv(1)
            if mode == b"E":
                sock.sendall(b"E")
                while True:
                    data = sock.recv(65536)  # no buffer held while idle
                    if not data:
                        break
                    sock.sendall(data)
            elif mode in (b"U", b"D"):
                head = b""
                while len(head) < SIZE_HEADER.size:
                    more = sock.recv(SIZE_HEADER.size - len(head))
                    if not more:
                        return
                    head += more
                (size,) = SIZE_HEADER.unpack(head)
                if mode == b"U":
                    buf = bytearray(CHUNK)
                    got = 0
                    while got < size:
                        n = sock.recv_into(buf, min(CHUNK, size - got))
                        if not n:
                            return
                        got += n
                    sock.sendall(b"K")
                else:
                    left = size
                    while left >= CHUNK:
                        sock.sendall(payload)
                        left -= CHUNK
                    if left:
                        sock.sendall(payload[:left])
                    sock.shutdown(gsocket.SHUT_WR)
                while sock.recv(65536):  # until the client closes
                    pass
        except OSError:
            pass
        finally:
            sock.close()

    server = StreamServer(("127.0.0.1", 0), handle, backlog=4096)
    server.start()
    print(f"guest 127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()
    return 0


def forwarder_main(args: argparse.Namespace) -> int:
    """gforward in a process of its own, for when `python -m gforward` is missing."""
    raise_nofile(args.nofile)
    start_watchdog(args.deadline_at)
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # the hub thread inherits the mask
    import gforward

    fwd = gforward.start(base_url=args.url, vm_name=VM, specs=[args.spec])
    for listener in fwd.listeners:
        print(f"{listener.local} -> {VM} {listener.remote}", flush=True)
    exit_on_stdin_eof()
    signal.sigwait(stop)
    fwd.close()
    return 0


def app_main(args: argparse.Namespace) -> int:
    """A legacy app: plain process, gforward.start() in it, the load generator beside it."""
    raise_nofile(args.nofile)
    start_watchdog(args.deadline_at)
    import gforward

    fwd = gforward.start(base_url=args.url, vm_name=VM, specs=[args.spec])
    port = fwd.listeners[0].port
    addr = ("127.0.0.1", port)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write("BENCH " + json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"listen": f"127.0.0.1:{port}", "version": gforward.__version__, "pid": os.getpid()})
    try:
        for line in sys.stdin:
            command = json.loads(line)
            op = command["op"]
            if op == "quit":
                break
            try:
                if op == "load":
                    before, main_before = self_cpu(), time.thread_time()
                    result = run_load(addr, command["spec"], args.io_timeout)
                    time.sleep(command.get("settle", 0.2))
                    own = result["loadgen_cpu"] + time.thread_time() - main_before
                    result["forwarder_cpu"] = max(self_cpu() - before - own, 0.0)
                elif op == "idle":
                    result = idle_steps(addr, command["plan"], proc_rss_kib, args.io_timeout,
                                        command["settle"])
                else:
                    raise BenchError(f"unknown op {op!r}")
                reply({"ok": True, **result})
            except Exception as exc:
                reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    finally:
        fwd.close()
    return 0


# Children, seen from the benchmark ---------------------------------------------------


def _die_with_parent() -> None:
    """preexec_fn: the kernel kills the child when the benchmark dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Child:
    """A child process: line-based stdout read with deadlines, stderr kept in a log file."""

    def __init__(self, name: str, argv: list[str], logdir: Path, *, eof_exits: bool) -> None:
        self.name = name
        self.eof_exits = eof_exits  # ends by itself once its stdin closes
        self.log_path = logdir / f"{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "ab") as stderr:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=ROOT,
                env=env, preexec_fn=_die_with_parent,
            )
        self.pid = self.proc.pid
        self._buf = b""

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"\n--- {self.name} log ({self.log_path}) ---\n{tail}" if tail else ""

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no answer within {timeout:g} s{self.log_tail()}")
            if poller.poll(left * 1000):
                data = os.read(fd, 65536)
                if not data:
                    code = self.proc.poll()
                    raise BenchError(f"{self.name} exited (status {code}){self.log_tail()}")
                self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode(errors="replace").rstrip("\r")

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """Read lines until one matches `pattern`."""
        end = time.monotonic() + timeout
        while True:
            line = self.readline(max(end - time.monotonic(), 0.001))
            match = re.search(pattern, line)
            if match:
                return match

    def request(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a JSON command to an app child; its JSON reply."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        self.proc.stdin.flush()
        reply = json.loads(self.expect(r"^BENCH (.*)$", timeout).group(1))
        if not reply.get("ok", True):
            raise BenchError(f"{self.name}: {reply.get('error')}")
        return dict(reply)

    def stop(self) -> None:
        """Close its stdin (our children end on EOF), then SIGTERM, then SIGKILL; reaps."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            if self.eof_exits:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(2)
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)
        for pipe in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()


# The benchmark -----------------------------------------------------------------


@dataclass
class Params:
    size: int
    rtt_count: int
    rtt_warmup: int
    setup_count: int
    concurrency: int
    idle_steps: list[int]
    io_timeout: float
    settle: float


class Bench:
    """The processes of one run, the scenarios, and their raw results."""

    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        self.args = args
        self.logdir = logdir
        quick = args.quick
        self.p = Params(
            size=args.size or (32 * MiB if quick else GiB),
            rtt_count=args.round_trips or (300 if quick else 5000),
            rtt_warmup=50 if quick else 500,
            setup_count=args.connections or (100 if quick else 2000),
            concurrency=50,
            idle_steps=[args.idle] if args.idle else ([100] if quick else [1000, 10000]),
            io_timeout=10.0 if quick else 30.0,
            settle=0.3 if quick else 1.0,
        )
        self.deadline_at = time.time() + args.deadline
        self.children: list[Child] = []
        self.raw: dict[str, dict[str, Any]] = {m: {} for m in MODES}
        self.skipped: dict[str, dict[str, str]] = {m: {} for m in MODES}
        self.notes: list[str] = []
        self.contended: list[str] = []  # scenarios that shared the machine with other work
        self.info: dict[str, Any] = {}
        self.launcher = ""
        self.nofile = 0
        self.guest: Child
        self.daemon: Child
        self.forwarder: Child
        self.app: Child
        self.guest_addr = ("127.0.0.1", 0)
        self.daemon_url = ""
        self.fwd_addr = ("127.0.0.1", 0)

    # Processes -------------------------------------------------------------

    def role_argv(self, role: str, *extra: str) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--role", role,
                "--deadline-at", str(self.deadline_at), "--io-timeout",
                str(max(self.args.deadline, 60)), "--nofile", str(self.nofile), *extra]

    def spawn(self, name: str, argv: list[str], *, eof_exits: bool = True) -> Child:
        child = Child(name, argv, self.logdir, eof_exits=eof_exits)
        self.children.append(child)
        return child

    def retire(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def remaining(self) -> float:
        return max(self.deadline_at - time.time(), 1.0)

    def start_guest(self) -> None:
        self.guest = self.spawn("guest", self.role_argv("guest"))
        match = self.guest.expect(r"^guest (\S+):(\d+)$", 30)
        self.guest_addr = (match.group(1), int(match.group(2)))
        log(f"guest service on {self.guest_addr[0]}:{self.guest_addr[1]} (pid {self.guest.pid})")

    def start_daemon(self) -> None:
        self.daemon = self.spawn("daemon", [sys.executable, "-m", "gforward.daemon",
                                            "--listen", "127.0.0.1:0"], eof_exits=False)
        self.daemon_url = self.daemon.expect(r"^listening on (\S+)$", 30).group(1)
        log(f"reference daemon at {self.daemon_url} (pid {self.daemon.pid})")

    def spec(self) -> str:
        return f"127.0.0.1:0:{self.guest_addr[0]}:{self.guest_addr[1]}"

    def choose_launcher(self) -> str:
        if self.args.forwarder != "auto":
            return str(self.args.forwarder)
        try:
            probe = subprocess.run([sys.executable, "-m", "gforward", "--help"], cwd=ROOT,
                                   capture_output=True, timeout=30, check=False)
        except subprocess.TimeoutExpired:
            return "runner"
        return "cli" if probe.returncode == 0 else "runner"

    def start_forwarder(self, name: str = "forwarder") -> tuple[Child, tuple[str, int]]:
        if self.launcher == "cli":
            argv = [sys.executable, "-m", "gforward", VM, self.spec(), "--url", self.daemon_url]
        else:
            argv = self.role_argv("forwarder", "--url", self.daemon_url, "--spec", self.spec())
        child = self.spawn(name, argv, eof_exits=self.launcher != "cli")
        match = child.expect(r"^(\S+):(\d+) -> ", 30)
        addr = (match.group(1), int(match.group(2)))
        log(f"gforward ({self.launcher}) listening on {addr[0]}:{addr[1]} (pid {child.pid})")
        return child, addr

    def start_app(self, name: str = "app") -> Child:
        child = self.spawn(name, self.role_argv("app", "--url", self.daemon_url,
                                                "--spec", self.spec()))
        hello = json.loads(child.expect(r"^BENCH (.*)$", 30).group(1))
        log(f"app with gforward.start() in-process on {hello['listen']} (pid {child.pid})")
        return child

    def stop_all(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                child.stop()
        self.children.clear()

    # Scenarios ---------------------------------------------------------------

    def load(self, mode: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Run one load scenario in one column; CPU of every process around it."""
        pids = {"daemon": self.daemon.pid, "guest": self.guest.pid}
        if mode == "process":
            pids["forwarder"] = self.forwarder.pid
        if mode == "app":
            pids["app"] = self.app.pid
        before = {name: proc_cpu_parts(pid) for name, pid in pids.items()}
        machine_before, ours_before = machine_cpu(), self.our_cpu()
        window = time.monotonic()
        if mode == "app":
            result = self.app.request({"op": "load", "spec": spec, "settle": 0.2},
                                      self.remaining())
            result.pop("ok", None)
        else:
            addr = self.guest_addr if mode == "direct" else self.fwd_addr
            result = run_load(addr, spec, self.p.io_timeout)
            time.sleep(0.2)  # let the last tunnels wind down before reading CPU
        after = {name: proc_cpu_parts(pid) for name, pid in pids.items()}
        machine_after, ours_after = machine_cpu(), self.our_cpu()
        busy = machine_after[0] - machine_before[0]
        result["other_cpu"] = max(busy - (ours_after - ours_before), 0.0)
        result["irq"] = machine_after[1] - machine_before[1]
        result["steal"] = machine_after[2] - machine_before[2]
        result["window"] = time.monotonic() - window
        cpu = {name: sum(after[name]) - sum(before[name]) for name in pids}
        if mode == "process":
            result["forwarder_cpu"] = cpu["forwarder"]
        result["cpu"] = cpu
        result["cpu_sys"] = {name: after[name][1] - before[name][1] for name in pids}
        return result

    def our_cpu(self) -> float:
        """CPU seconds used so far by this process and every child of the run."""
        total = self_cpu()
        for child in self.children:
            with contextlib.suppress(OSError):
                total += proc_cpu(child.pid)
        return total

    def scenario(self, name: str, spec: dict[str, Any], describe: Callable[[dict[str, Any]], str]
                 ) -> None:
        for mode in self.args.modes:
            result = self.load(mode, spec)
            self.raw[mode][name] = result
            text = describe(result)
            busy = result["other_cpu"] / result["window"]
            if result["other_cpu"] >= 0.1 and busy >= 0.1:  # above /proc's 10 ms ticks
                text += f"  [other load on the machine: {busy:.1f} cores]"
                self.contended.append(f"{name}, {COLUMNS[mode]}: {busy:.1f} cores busy with"
                                      " processes not of this run")
            if result["steal"] >= 0.05:
                text += f"  [steal {result['steal'] / result['window']:.1f} cores]"
            log(f"{name:<11} {COLUMNS[mode]:<19} {text}")

    def run_scenarios(self) -> None:
        p = self.p

        def rate(r: dict[str, Any]) -> str:
            text = f"{r['bytes'] / r['seconds'] / 1e6:8.0f} MB/s  ({r['seconds']:.2f} s"
            if "forwarder_cpu" in r:
                text += f", forwarder {r['forwarder_cpu'] / (r['bytes'] / GiB):.2f} s/GiB"
            return text + ")"

        for streams in (1, 8):
            for kind in ("upload", "download"):
                log(f"{kind}, {streams} stream(s) x {p.size / MiB:g} MiB")
                self.scenario(f"{kind}_{streams}",
                              {"kind": kind, "streams": streams, "size": p.size}, rate)
        log(f"echo round trips: {p.rtt_count} (after {p.rtt_warmup} to warm up)")
        self.scenario("echo", {"kind": "echo", "count": p.rtt_count, "warmup": p.rtt_warmup},
                      lambda r: f"median {r['median_us']:.1f} us, p99 {r['p99_us']:.1f} us")
        for name, concurrency in (("setup_seq", 1), ("setup_conc", p.concurrency)):
            log(f"tunnel setup (connect, 1-byte echo, close): {p.setup_count} connections,"
                f" {concurrency} at a time")
            self.scenario(name, {"kind": "setup", "count": p.setup_count,
                                 "concurrency": concurrency},
                          lambda r: f"{r['count'] / r['seconds']:8.0f} conn/s")

    def idle_plan(self, fds_per_tunnel: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
        """The idle steps the fd limit allows; a refused step is run at the most it allows.

        `fds_per_tunnel` maps a process name to (pid, fds each tunnel costs it).
        """
        room = {name: (self.nofile - proc_fds(pid) - FD_SPARE) // per
                for name, (pid, per) in fds_per_tunnel.items()}
        tightest = min(room, key=lambda name: room[name])
        most = max(room[tightest], 0) // 100 * 100
        plan: list[dict[str, Any]] = []
        for step in self.p.idle_steps:
            if step <= most:
                plan.append({"n": step, "open": step, "note": ""})
                continue
            per = fds_per_tunnel[tightest][1]
            why = (f"the machine refuses: RLIMIT_NOFILE is {self.nofile} (hard limit, cannot be"
                   f" raised here) and {step} tunnels need {step * per}+ fds in the {tightest}"
                   f" process alone")
            previous = plan[-1]["open"] if plan else 0
            if most > previous:
                plan.append({"n": step, "open": most, "note": f"{why}; measured at {most}"})
            else:
                plan.append({"n": step, "open": 0, "note": why})
        return plan

    def wait_daemon_quiet(self, baseline: int) -> None:
        """After idle tunnels close, wait until the daemon has let go of them."""
        end = time.monotonic() + 30
        while time.monotonic() < end and proc_fds(self.daemon.pid) > baseline + 16:
            time.sleep(0.2)

    def run_memory(self) -> None:
        p = self.p
        log(f"idle tunnels: {', '.join(map(str, p.idle_steps))} (each holds 6 fds:"
            f" {FDS_PER_TUNNEL}; RLIMIT_NOFILE {self.nofile})")
        daemon_fds = proc_fds(self.daemon.pid)
        for mode in self.args.modes:
            if mode == "direct":
                continue
            if mode == "process":
                child, addr = self.start_forwarder("forwarder-idle")
                plan = self.idle_plan({"forwarder": (child.pid, 2),
                                       "daemon": (self.daemon.pid, 2),
                                       "guest": (self.guest.pid, 1),
                                       "load generator": (os.getpid(), 1)})
                result = idle_steps(addr, plan, lambda c=child: proc_rss_kib(c.pid),
                                    p.io_timeout, p.settle)
            else:
                child = self.start_app("app-idle")
                plan = self.idle_plan({"app": (child.pid, 3), "daemon": (self.daemon.pid, 2),
                                       "guest": (self.guest.pid, 1)})
                result = child.request({"op": "idle", "plan": plan, "settle": p.settle},
                                       self.remaining())
                result.pop("ok", None)
            self.retire(child)
            self.raw[mode]["idle"] = result
            for step in result["steps"]:
                if "skipped" in step:
                    log(f"idle {COLUMNS[mode]}: {step['n']} tunnels skipped: {step['skipped']}")
                else:
                    if step["note"]:
                        log(f"idle {COLUMNS[mode]}: {step['n']} tunnels: {step['note']}")
                    log(f"idle {COLUMNS[mode]}: {step['held']} tunnels held, RSS"
                        f" {step['rss_kib'] / 1024:.1f} MiB (from {result['rss0_kib'] / 1024:.1f})"
                        + (f"; stopped: {step['error']}" if step["error"] else ""))
            self.wait_daemon_quiet(daemon_fds)

    def run_profile(self, outdir: Path) -> None:
        """py-spy the forwarder process: 1-stream upload, 1-stream download, sequential setup."""
        spy = shutil.which("py-spy")
        if spy is None:
            self.notes.append("--profile: py-spy not found (pip install py-spy); no profile")
            log(self.notes[-1])
            return
        outdir.mkdir(parents=True, exist_ok=True)
        rate = 500
        size = self.args.profile_size or (self.p.size if self.args.quick else 4 * GiB)
        count = self.p.setup_count if self.args.quick else max(self.p.setup_count, 3000)
        specs = {
            "upload": ({"kind": "upload", "streams": 1, "size": size}, "1-stream upload"),
            "download": ({"kind": "download", "streams": 1, "size": size}, "1-stream download"),
            "setup": ({"kind": "setup", "count": count, "concurrency": 1},
                      f"sequential tunnel setup ({count} connections)"),
        }
        profiles = {}
        for kind, (spec, title) in specs.items():
            out = outdir / f"forwarder-{kind}.txt"
            argv = [spy, "record", "-p", str(self.forwarder.pid), "-o", str(out), "--format",
                    "raw", "--rate", str(rate)]
            # --native needs the target paused at each sample (slower, but it shows C frames).
            argv.append("--native" if self.args.profile_native else "--nonblocking")
            log(f"profiling the forwarder during a {title}: {out}")
            spy_log_path = self.logdir / f"py-spy-{kind}.log"
            outcome: dict[str, Any] = {}

            def work(spec: dict[str, Any] = spec, outcome: dict[str, Any] = outcome) -> None:
                try:
                    outcome["result"] = run_load(self.fwd_addr, spec, self.p.io_timeout)
                except BaseException as exc:
                    outcome["error"] = exc

            loader = threading.Thread(target=work, name=f"profile-{kind}", daemon=True)
            before = proc_cpu(self.forwarder.pid)
            if self.args.profile_native:
                # Native unwinding fails on an idle gevent hub: attach once the load runs.
                loader.start()
                time.sleep(0.3)
            for _attempt in range(5):  # and it sometimes fails while attaching anyway
                with open(spy_log_path, "wb") as spy_log:
                    recorder = subprocess.Popen(argv, stdout=spy_log, stderr=spy_log,
                                                preexec_fn=_die_with_parent)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    recorder.wait(1.0)
                if recorder.poll() is None:
                    break
            try:
                if not self.args.profile_native:
                    loader.start()
                loader.join()
                cpu = proc_cpu(self.forwarder.pid) - before
            finally:
                recorder.send_signal(signal.SIGINT)
                try:
                    recorder.wait(30)
                except subprocess.TimeoutExpired:
                    recorder.kill()
                    recorder.wait(5)
            if "error" in outcome:
                raise BenchError(f"profiled {kind}: {outcome['error']}")
            result = outcome["result"]
            if kind == "setup":
                speed = f"{result['count'] / result['seconds']:.0f} conn/s"
            else:
                speed = f"{result['bytes'] / result['seconds'] / 1e6:.0f} MB/s"
            summary = summarize_profile(out, rate)
            if "error" in summary:
                summary["error"] += ": " + spy_log_path.read_text(errors="replace")[-800:]
            summary.update(title=title, speed=speed, seconds=result["seconds"],
                           forwarder_cpu=cpu)
            profiles[kind] = summary
            print_profile(summary)
        self.info["profile"] = profiles

    def run(self) -> None:
        wanted = max(self.p.idle_steps) * 3 + FD_MARGIN
        self.nofile = raise_nofile(max(wanted, 4096))
        self.launcher = self.choose_launcher()
        self.info.update(machine_info())
        self.info.update(launcher=self.launcher, nofile=self.nofile,
                         fds_per_idle_tunnel=FDS_PER_TUNNEL)
        log(f"{self.info['cpus']} CPUs, {self.info['cpu_model']}; Python "
            f"{platform.python_version()}; gforward as a process via the {self.launcher};"
            f" {self.p.size / MiB:g} MiB per stream")
        self.start_guest()
        self.start_daemon()
        if "process" in self.args.modes:
            self.forwarder, self.fwd_addr = self.start_forwarder()
        if "app" in self.args.modes:
            self.app = self.start_app()
        self.run_scenarios()
        if self.args.profile:
            self.run_profile(Path(self.args.profile))
        if "process" in self.args.modes:
            self.retire(self.forwarder)
        if "app" in self.args.modes:
            self.retire(self.app)
        if not self.args.no_memory:
            self.run_memory()


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="ascii",
                                            errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gevent_version = ""
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        gevent_version = version("gevent")
    fast_mask = True
    try:
        import websockets.speedups  # noqa: F401
    except ImportError:
        fast_mask = False
    version = re.search(r'__version__\s*=\s*"([^"]+)"',
                        (ROOT / "gforward" / "_version.py").read_text())
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gforward"], cwd=ROOT,
                               text=True, capture_output=True, timeout=10, check=True).stdout
        commit = head + ("+uncommitted changes in gforward/" if dirty.strip() else "")
    return {
        "gforward_version": version.group(1) if version else "?",
        "commit": commit,
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "gevent": gevent_version,
        "websockets_speedups": fast_mask,
    }


# Profiles --------------------------------------------------------------------------


def summarize_profile(path: Path, rate: int, top: int = 15) -> dict[str, Any]:
    """Hot spots from py-spy's raw (collapsed) output: self time by line, total by function."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return {"error": str(exc)}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for function in {re.sub(r":\d+\)$", ")", f) for f in frames}:
            total[function] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, 100.0 * n / samples) for name, n in counter.most_common(top)]

    return {"samples": samples, "busy_seconds": samples / rate, "file": str(path),
            "self": share(own) if samples else [], "total": share(total) if samples else []}


def print_profile(summary: dict[str, Any]) -> None:
    kind = summary["title"]
    if "error" in summary or not summary["samples"]:
        print(f"\nprofile of the forwarder, {kind}: no samples ({summary.get('error', '')})")
        return
    print(f"\nprofile of the forwarder, {kind}: {summary['speed']},"
          f" forwarder CPU {summary['forwarder_cpu']:.2f} s in {summary['seconds']:.2f} s,"
          f" {summary['samples']} busy samples ({summary['file']})")
    print("  self time (by line):")
    for name, pct in summary["self"]:
        print(f"    {pct:5.1f}%  {name}")
    print("  total time (by function, callees included):")
    for name, pct in summary["total"]:
        print(f"    {pct:5.1f}%  {name}")


# Turning raw results into figures -------------------------------------------------------


def compute(bench: Bench) -> tuple[list[Figure], dict[str, dict[str, Any]]]:
    steps = bench.p.idle_steps
    small = steps[0]
    large = steps[1] if len(steps) > 1 else None
    figs = figures(small, large)
    table: dict[str, dict[str, Any]] = {}
    for fig in figs:
        row: dict[str, Any] = {"label": fig.label, "unit": fig.unit}
        for mode in MODES:
            value, reason = figure_value(bench, mode, fig.key)
            row[mode] = value
            if reason:  # why there is no value, or a note on the value there is
                row.setdefault("skipped" if value is None else "notes", {})[mode] = reason
        for mode in ("process", "app"):
            direct, value = row["direct"], row[mode]
            row[f"ratio_{mode}"] = (value / direct if fig.has_direct and direct and value
                                    is not None else None)
        target = TARGETS.get(fig.key)
        if target is not None:
            row["target"] = target.value
            row["target_note"] = target.note
            for mode in ("process", "app"):
                value = row[mode]
                applicable = not (fig.key == "tunnels_held" and max(steps) < target.value)
                row[f"met_{mode}"] = (target.met(fig, value) if value is not None and applicable
                                      else None)
        table[fig.key] = row
    return figs, table


def figure_value(bench: Bench, mode: str, key: str) -> tuple[float | None, str]:
    """One figure for one column: (value, "") or (None, why not)."""
    if mode not in bench.args.modes:
        return None, "column not run"
    raw = bench.raw[mode]
    cpu_keys = {"cpu_upload_1": "upload_1", "cpu_download_1": "download_1",
                "cpu_upload_8": "upload_8", "cpu_download_8": "download_8"}
    if mode == "direct" and (key.startswith(("cpu_", "rss_", "kib_")) or key == "tunnels_held"):
        return None, "no forwarder"
    if key in ("upload_1", "download_1", "upload_8", "download_8"):
        r = raw[key]
        return r["bytes"] / r["seconds"] / 1e6, ""
    if key in cpu_keys:
        r = raw[cpu_keys[key]]
        return r["forwarder_cpu"] / (r["bytes"] / GiB), ""
    if key == "rtt_median":
        return raw["echo"]["median_us"], ""
    if key == "rtt_p99":
        return raw["echo"]["p99_us"], ""
    if key in ("setup_seq", "setup_conc"):
        return raw[key]["count"] / raw[key]["seconds"], ""
    if key == "cpu_per_conn":
        seq, conc = raw["setup_seq"], raw["setup_conc"]
        return 1000 * (seq["forwarder_cpu"] + conc["forwarder_cpu"]) / (
            seq["count"] + conc["count"]), ""
    idle = raw.get("idle")
    if idle is None:
        return None, "memory not measured (--no-memory)"
    measured = [s for s in idle["steps"] if "held" in s]
    if key == "rss_idle_0":
        return idle["rss0_kib"] / 1024, ""
    if key in ("rss_idle_small", "rss_idle_large"):
        index = 0 if key == "rss_idle_small" else 1
        if index >= len(bench.p.idle_steps):
            return None, "one idle step only (--quick or --idle)"
        if index >= len(idle["steps"]):
            return None, "not reached: the step before it failed"
        step = idle["steps"][index]
        if "skipped" in step:
            return None, step["skipped"]
        if step["held"] < step["open"]:
            return None, f"only {step['held']} held: {step['error']}"
        return step["rss_kib"] / 1024, step["note"]
    if key == "kib_per_tunnel":
        if not measured or not measured[-1]["held"]:
            return None, "no idle tunnel held"
        last = measured[-1]
        return (last["rss_kib"] - idle["rss0_kib"]) / last["held"], ""
    if key == "tunnels_held":
        errors = [f"stopped at {s['held']}: {s['error']}" for s in measured if s["error"]]
        notes = [s.get("note") or s.get("skipped", "") for s in idle["steps"]]
        return (float(max((s["held"] for s in measured), default=0)),
                "; ".join(errors) or next((n for n in notes if n), ""))
    raise KeyError(key)


def fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def print_table(bench: Bench, figs: list[Figure], table: dict[str, dict[str, Any]]) -> None:
    header = ["figure", "unit", COLUMNS["direct"], COLUMNS["process"], COLUMNS["app"],
              "ratio (proc / app)", "target", "met (proc / app)"]
    rows = [header]
    for fig in figs:
        row = table[fig.key]

        def ratio(mode: str, row: dict[str, Any] = row) -> str:
            value = row[f"ratio_{mode}"]
            return "-" if value is None else f"{value:.2f}x"

        def met(mode: str, row: dict[str, Any] = row) -> str:
            value = row.get(f"met_{mode}")
            return "n/a" if value is None else "met" if value else "NOT met"

        target = ""
        if "target" in row:
            sign = ">=" if fig.higher_is_better else "<="
            target = f"{sign} {row['target']:g}"
            if row["target_note"]:
                target += f" ({row['target_note']})"
        def cell(mode: str, row: dict[str, Any] = row, digits: int = fig.digits) -> str:
            marked = mode in row.get("notes", {})
            return fmt(row[mode], digits) + (" *" if marked else "")

        rows.append([
            fig.label, fig.unit, cell("direct"), cell("process"), cell("app"),
            f"{ratio('process')} / {ratio('app')}" if fig.has_direct else "",
            target,
            f"{met('process')} / {met('app')}" if "target" in row else "",
        ])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    right = {2, 3, 4}
    print()
    title = "gforward throughput benchmark" + (" (--quick: indicative only)"
                                                if bench.args.quick else "")
    print(title)
    print(f"machine: {bench.info['cpus']} CPUs ({bench.info['cpu_model']}), kernel"
          f" {bench.info['kernel']}, Python {bench.info['python']}, gevent"
          f" {bench.info['gevent']}, websockets.speedups"
          f" {'yes' if bench.info['websockets_speedups'] else 'no'}; gforward"
          f" {bench.info['gforward_version']} ({bench.info['commit'] or 'no git'}) as a process"
          f" via the {bench.launcher}")
    print(f"sizes: {bench.p.size / MiB:g} MiB per stream, {bench.p.rtt_count} round trips,"
          f" {bench.p.setup_count} connections per setup scenario, idle steps"
          f" {bench.p.idle_steps}")
    for i, row in enumerate(rows):
        cells = [c.rjust(widths[j]) if j in right else c.ljust(widths[j])
                 for j, c in enumerate(row)]
        print("| " + " | ".join(cells) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    reasons = []
    for fig in figs:
        for mode, reason in table[fig.key].get("skipped", {}).items():
            if mode != "direct" and reason not in ("column not run",):
                reasons.append(f"{fig.label}, {COLUMNS[mode]}: {reason}")
    if reasons:
        print("\nnot measured:")
        for reason in dict.fromkeys(reasons):
            print(f"  {reason}")
    marked = [f"{fig.label}, {COLUMNS[mode]}: {note}" for fig in figs
              for mode, note in table[fig.key].get("notes", {}).items()]
    if marked:
        print("\n* about these values:")
        for note in marked:
            print(f"  {note}")
    print_cpu_breakdown(bench)
    print("\nnotes: MB = 10^6 bytes. 'in-app' RSS is the whole app process (its load generator"
          " included);\n  in-app forwarder CPU is the app's rusage less the load generator"
          " threads' own CPU time.\n  Each idle tunnel holds 6 fds: " + FDS_PER_TUNNEL
          + f"; RLIMIT_NOFILE in every process: {bench.nofile}.")
    for note in bench.notes:
        print(f"  {note}")
    if bench.contended:
        print("\nWARNING: other work shared this machine during these scenarios; their figures"
              " are pessimistic:")
        for line in bench.contended:
            print(f"  {line}")


def print_cpu_breakdown(bench: Bench) -> None:
    """CPU of every process per unit of work in each scenario: where the time goes."""
    print("\nCPU by process (utime+stime, of it sys; the daemon is the Python reference one):")
    names = ["forwarder", "daemon", "guest", "load generator"]
    units = {"upload_1": "s/GiB", "download_1": "s/GiB", "upload_8": "s/GiB",
             "download_8": "s/GiB", "echo": "us/round trip", "setup_seq": "ms/conn",
             "setup_conc": "ms/conn"}
    for key, unit in units.items():
        for mode in bench.args.modes:
            r = bench.raw[mode].get(key)
            if r is None:
                continue
            if unit == "s/GiB":
                per = r["bytes"] / GiB
            elif unit == "us/round trip":
                per = (r["count"] + bench.p.rtt_warmup) / 1e6
            else:
                per = r["count"] / 1e3
            cpu = dict(r["cpu"])
            cpu["forwarder"] = r.get("forwarder_cpu")
            cpu["load generator"] = r["loadgen_cpu"]
            system = r.get("cpu_sys", {})
            cells = [f"{n} {cpu[n] / per:.2f}"
                     + (f" (sys {system[n] / per:.2f})" if n in system else "")
                     for n in names if cpu.get(n) is not None]
            print(f"  {key:<10} {unit:<13} {COLUMNS[mode]:<19} " + ", ".join(cells))


def write_json(path: Path, bench: Bench, table: dict[str, dict[str, Any]]) -> None:
    data = {
        "quick": bench.args.quick,
        "params": bench.p.__dict__,
        "info": bench.info,
        "figures": table,
        "raw": bench.raw,
        "notes": bench.notes,
        "contended": bench.contended,
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    log(f"raw figures written to {path}")


def write_plot(path: Path, table: dict[str, dict[str, Any]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot",
              file=sys.stderr)
        return
    keys = ["upload_1", "download_1", "upload_8", "download_8"]
    labels = ["upload\n1 stream", "download\n1 stream", "upload\n8 streams", "download\n8 streams"]
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.27
    for i, mode in enumerate(MODES):
        values = [table[k][mode] or 0 for k in keys]
        bars = ax.bar([x + (i - 1) * width for x in range(len(keys))], values, width,
                      label=COLUMNS[mode])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(keys)), labels)
    ax.set_ylabel("MB/s (10^6 bytes/s)")
    ax.set_title("gforward throughput on loopback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    log(f"plot written to {path}")


# Entry point ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few seconds: small sizes, few round trips, 100 idle tunnels")
    parser.add_argument("--json", metavar="FILE", help="write the raw figures as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="plot throughput (needs matplotlib)")
    parser.add_argument("--size", type=parse_size, help="bytes per stream (default 1G; 32M quick)")
    parser.add_argument("--round-trips", type=int, help="echo round trips (default 5000)")
    parser.add_argument("--connections", type=int,
                        help="connections per setup scenario (default 2000)")
    parser.add_argument("--idle", type=int, help="one idle-tunnel step of this many instead")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="columns to run, comma-separated: direct,process,app")
    parser.add_argument("--no-memory", action="store_true", help="skip the idle-tunnel phase")
    parser.add_argument("--forwarder", choices=("auto", "cli", "runner"), default="auto",
                        help="gforward as a process: the CLI, or a runner around start()")
    parser.add_argument("--profile", metavar="DIR",
                        help="also py-spy the forwarder process in a 1-stream upload and download")
    parser.add_argument("--profile-size", type=parse_size,
                        help="with --profile: bytes per profiled transfer (default 4G)")
    parser.add_argument("--profile-native", action="store_true",
                        help="with --profile: include native (C) frames")
    parser.add_argument("--deadline", type=float,
                        help="bound on the whole run, seconds (default 1800; 50 with --quick)")
    # Internal: the child processes.
    parser.add_argument("--role", choices=("bench", "guest", "forwarder", "app"), default="bench",
                        help=argparse.SUPPRESS)
    parser.add_argument("--deadline-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--io-timeout", type=float, default=30.0, help=argparse.SUPPRESS)
    parser.add_argument("--nofile", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.deadline is None:
        args.deadline = 50.0 if args.quick else 1800.0
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown or not args.modes:
        parser.error(f"--modes takes some of {','.join(MODES)}")
    if args.profile and "process" not in args.modes:
        parser.error("--profile needs the process column")
    return args


@contextlib.contextmanager
def global_deadline(seconds: float) -> Iterator[None]:
    """SIGALRM raises BenchTimeout in the main thread once `seconds` have passed."""

    def expire(_signum: int, _frame: Any) -> None:
        raise BenchTimeout(f"the run took longer than its deadline of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "guest":
        return guest_main(args)
    if args.role == "forwarder":
        return forwarder_main(args)
    if args.role == "app":
        return app_main(args)
    def terminate(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # the same teardown as Ctrl-C

    signal.signal(signal.SIGTERM, terminate)
    with tempfile.TemporaryDirectory(prefix="gforward-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            with global_deadline(args.deadline):
                bench.run()
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        except BenchError as exc:
            log(f"benchmark failed: {exc}")
            return 1
        finally:
            bench.stop_all()
        figs, table = compute(bench)
        print_table(bench, figs, table)
        if args.json:
            write_json(Path(args.json), bench, table)
        if args.plot:
            write_plot(Path(args.plot), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
