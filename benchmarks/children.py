"""The run's child processes, from both sides.

Seen from the benchmark: `Child` starts one (ours or a foreign command), reads
its stdout lines with deadlines, keeps its stderr in a log, and stops it and
everything it started; `Children` stops them all, whatever happened. Seen from
inside one of our children: `child_setup` makes it end by itself once the run's
deadline passes or the benchmark goes away.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import procfs

ROOT = Path(__file__).resolve().parent.parent


class BenchError(Exception):
    """The benchmark (or one scenario of it) cannot go on; the message says why."""


class BenchTimeout(Exception):
    """The run's deadline passed: not a BenchError, which a scenario may survive."""


def die_with_parent() -> None:
    """preexec_fn: the kernel kills the child when the benchmark dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Child:
    """A child process in a process group of its own, its stderr (and, for a foreign
    command, its stdout) in a log file.

    Ours (`talks`) read commands on stdin, answer on stdout and end once their stdin
    closes. Foreign commands (daemons, peers) get no stdin and are never read from.
    """

    def __init__(self, name: str, argv: list[str], logdir: Path, *, talks: bool,
                 env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.name = name
        self.log_path = logdir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(ROOT), full_env.get("PYTHONPATH")) if p)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE if talks else subprocess.DEVNULL,
                    stdout=subprocess.PIPE if talks else log, stderr=log, cwd=cwd,
                    env=full_env, preexec_fn=die_with_parent, start_new_session=True)
            except OSError as exc:
                raise BenchError(f"{name}: cannot run {argv[0]!r}: {exc}") from exc
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
            match = re.search(pattern, self.readline(max(end - time.monotonic(), 0.001)))
            if match:
                return match

    def request(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one JSON command to a child of ours; its JSON reply."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(command) + "\n").encode())
            self.proc.stdin.flush()
        except OSError as exc:
            raise BenchError(f"{self.name}: gone ({exc}){self.log_tail()}") from exc
        reply = json.loads(self.expect(r"^BENCH (.*)$", timeout).group(1))
        if not reply.pop("ok", True):
            raise BenchError(f"{self.name}: {reply.get('error')}")
        return dict(reply)

    def wait_listening(self, port: int, timeout: float) -> None:
        """Wait until something listens on `port`, whatever the program prints."""
        end = time.monotonic() + timeout
        while not procfs.listening(port):
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited (status {self.proc.returncode}) before"
                                 f" listening on port {port}{self.log_tail()}")
            if time.monotonic() > end:
                raise BenchError(f"{self.name}: nothing listens on port {port} after"
                                 f" {timeout:g} s{self.log_tail()}")
            time.sleep(0.02)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.pid, sig)

    def stop(self, grace: float = 3.0) -> None:
        """Close its stdin (ours end on EOF), then SIGTERM, then SIGKILL `grace` seconds
        later, to its whole process group; reaps it."""
        if self.proc.stdin is not None:  # one of ours (`talks`)
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
        if self.proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(3)
        self._signal_group(signal.SIGKILL)  # whatever it started and left behind
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()


class Children:
    """Every child of a run, so that each one is stopped at the end."""

    def __init__(self, logdir: Path, env: dict[str, str]) -> None:
        self.logdir = logdir
        self.env = env  # for every child (SSL_CERT_FILE, say)
        self.live: list[Child] = []

    def spawn(self, name: str, argv: list[str], *, talks: bool) -> Child:
        child = Child(name, argv, self.logdir, talks=talks, env=self.env)
        self.live.append(child)
        return child

    def retire(self, child: Child) -> None:
        child.stop()
        if child in self.live:
            self.live.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.live):
            with contextlib.suppress(Exception):
                child.stop()
        self.live.clear()


def our_module(module: str, *args: str) -> list[str]:
    """argv of one of the benchmark's own processes (`python -m benchmarks.MODULE`)."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


# Inside a child of ours ------------------------------------------------------------


def child_setup(deadline_at: float, nofile: int, *, watch_stdin: bool = True) -> None:
    """Descriptors for many tunnels, and an end of our own: once the run's deadline has
    passed, or once the benchmark is gone (our stdin closed; a child that reads its
    commands there, `watch_stdin=False`, sees that EOF itself)."""
    procfs.raise_nofile(nofile)

    def watch_deadline() -> None:
        while time.time() < deadline_at:
            time.sleep(min(1.0, max(deadline_at - time.time(), 0.01)))
        print("deadline passed; exiting", file=sys.stderr, flush=True)
        os._exit(3)

    def wait_stdin_eof() -> None:
        with contextlib.suppress(OSError):
            while os.read(sys.stdin.fileno(), 4096):
                pass
        os._exit(0)

    threading.Thread(target=watch_deadline, name="deadline", daemon=True).start()
    if watch_stdin:
        threading.Thread(target=wait_stdin_eof, name="stdin-eof", daemon=True).start()


def child_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every child of ours takes (see `child_argv`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--deadline-at", type=float, required=True)
    parser.add_argument("--nofile", type=int, default=4096)
    parser.add_argument("--io-timeout", type=float, default=30.0)
    return parser


def child_argv(module: str, deadline_at: float, nofile: int, io_timeout: float) -> list[str]:
    return our_module(module, "--deadline-at", str(deadline_at), "--nofile", str(nofile),
                      "--io-timeout", str(io_timeout))
