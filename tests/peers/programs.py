"""Programs in processes of their own, run as a user runs them.

* `Program` and `Programs`: stdout read line by line with a timeout, stderr
  collected, each killed at the test's end (conftest's `programs`; with
  `new_session`, its whole process group), with `clean_env` (no SLICER_* or
  proxy variables from the caller).
* `announced`: a program of ours once it has printed where it listens;
  `daemon_process`, the reference daemon that way.
"""

from __future__ import annotations

import contextlib
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Callable

ROOT = str(Path(__file__).resolve().parents[2])  # the repository
READ_TIMEOUT = 15.0  # a slow CI machine still starts a Python process in this time


@contextlib.contextmanager
def announced(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    stderr: IO[str] | None = None,
    timeout: float = READ_TIMEOUT,
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run `python argv...` from the repository root until it prints its first line.

    Yields the process and that line (where it listens); SIGTERM at the end,
    SIGKILL if that is not enough.  Its stderr is ours (pytest captures it)
    unless `stderr` (a file) says otherwise.
    """
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stderr=stderr,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"{' '.join(argv)} printed nothing in {timeout:g} s "
                               f"(exit status {proc.poll()})")
        yield proc, line.strip()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@contextlib.contextmanager
def daemon_process(*args: str) -> Iterator[str]:
    """The reference daemon (`python -m gforward.daemon`) in a process of its own; yields its URL.

    It gets a core of its own: a load test's client, guest and forwarder then
    do not share one interpreter lock with it.
    """
    with announced(["-m", "gforward.daemon", "--listen", "127.0.0.1:0", *args]) as (_, line):
        assert line.startswith("listening on "), line
        yield line.split()[-1]



def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without SLICER_* or proxies, so only the test's settings
    count, and with Python's fault handler on."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLICER_") and not k.lower().endswith("_proxy")}
    env["PYTHONFAULTHANDLER"] = "1"  # a hung or crashed program shows where it was
    env.update(extra)
    return env


class Program:
    """A subprocess under test: stdout lines read with a timeout, stderr collected.

    With `new_session` it runs in a session of its own, and close() kills its whole
    process group: what it forked too, even after it has exited itself.
    """

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 cwd: str | None = None, new_session: bool = False) -> None:
        self.args = args
        self.new_session = new_session
        self.popen = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=clean_env() if env is None else env, cwd=cwd, text=True,
            start_new_session=new_session,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._out: list[str] = []
        self._err: list[str] = []
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self._on_out),
                             daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self._err.append),
                             daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _on_out(self, line: str | None) -> None:
        if line is not None:
            self._out.append(line)
        self._lines.put(line)

    @staticmethod
    def _read(stream: IO[str], sink: Callable[[str | None], None]) -> None:
        for line in stream:
            sink(line)
        sink(None)  # EOF; harmless on stderr, where None is never joined
        stream.close()

    def readline(self, timeout: float = READ_TIMEOUT) -> str:
        """The next stdout line; fails the test (with stderr) on timeout or exit."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output from {self.args} in {timeout}s; "
                                 f"stderr: {self.stderr!r}") from None
        if line is None:
            self.popen.wait(READ_TIMEOUT)
            raise AssertionError(f"{self.args} exited {self.popen.returncode} early; "
                                 f"stderr: {self.stderr!r}")
        return line.rstrip("\n")

    def finish(self, timeout: float = READ_TIMEOUT) -> int:
        """Wait up to `timeout` s for the exit status, then for all of its output."""
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            # SIGABRT: a Python program (see clean_env) prints every thread's stack first.
            self.popen.send_signal(signal.SIGABRT)
            self.popen.wait(READ_TIMEOUT)
            for reader in self._readers:
                reader.join(READ_TIMEOUT)
            raise AssertionError(f"{self.args} did not exit within {timeout}s; "
                                 f"stderr: {self.stderr}") from None
        for reader in self._readers:
            reader.join(READ_TIMEOUT)
        return status

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Deliver `sig` as a user would and return the exit status."""
        self.popen.send_signal(sig)
        return self.finish()

    @property
    def stdout(self) -> str:
        return "".join(self._out)

    @property
    def stderr(self) -> str:
        return "".join(line for line in self._err if line is not None)

    def close(self) -> None:
        if self.new_session:
            with contextlib.suppress(ProcessLookupError):  # no one left in the group
                os.killpg(self.popen.pid, signal.SIGKILL)
        elif self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(READ_TIMEOUT)
        for reader in self._readers:
            reader.join(READ_TIMEOUT)


class Programs:
    """Every program a test starts, each killed at the end whatever happened."""

    def __init__(self) -> None:
        self._all: list[Program] = []

    def run(self, *args: str, env: dict[str, str] | None = None,
            cwd: str | None = None, new_session: bool = False) -> Program:
        program = Program(list(args), env, cwd, new_session)
        self._all.append(program)
        return program

    def daemon(self, *args: str, listeners: int = 1,
               env: dict[str, str] | None = None) -> tuple[Program, list[str]]:
        """`python -m gforward.daemon ARGS`, once it has announced its `listeners` URLs;
        `env` is added to a clean environment."""
        program = self.run(sys.executable, "-m", "gforward.daemon", *args,
                           env=clean_env(**(env or {})))
        urls = []
        for _ in range(listeners):
            line = program.readline()
            assert line.startswith("listening on "), line
            urls.append(line[len("listening on "):])
        return program, urls

    def close(self) -> None:
        for program in self._all:
            program.close()
