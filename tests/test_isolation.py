"""isolation="process" (gforward/isolated.py, gforward/helper.py): the listeners and tunnels
in a helper process, the Forwarder's API across the process boundary.

The helper's life: gone after close(), after the app exits without closing, after
the app is killed (SIGKILL), and when the app's parent dies while a forked child
lives; its unix socket files removed each time.  Errors at start() as in thread
mode, with nothing left bound and no helper left.  The helper's log records in a
logger of the app's own.  Every operation (stats, wait_ready, add/remove,
close(drain=...)) and what it logs: tests/test_operations.py, in both modes.  Real
sockets, real processes (tests/apps/isolated.py for the app's own deaths).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import gforward
import gforward.daemon
from gforward.isolated import IsolatedForwarder
from tests.apps.support import process_state
from tests.peers.programs import READ_TIMEOUT, Program, Programs, clean_env
from tests.support import (
    APPS,
    WAIT,
    can_bind,
    closed_port,
    echo_once,
    forward,
    free_port,
    local_address,
    refused,
    wait_until,
    warnings_of,
)

GONE_WITHIN = 5.0  # seconds for a helper to end once its app has
PR_SET_CHILD_SUBREAPER = 36


def isolated(base_url: str, target: str = "127.0.0.1:9", **options: object
             ) -> IsolatedForwarder:
    fwd = forward(base_url, target, isolation="process", **options)
    assert isinstance(fwd, IsolatedForwarder)
    return fwd


def children() -> set[int]:
    """This process's children."""
    found: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/children") as f:
            found.update(int(pid) for pid in f.read().split())
    return found


@contextlib.contextmanager
def adopting_orphans() -> Iterator[None]:
    """Make this process the subreaper of its descendants for a while: a helper whose app
    died is then reparented here (not to init), so the test can see it exit and reap it:
    a process that is really gone, not a zombie left for someone else."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip("cannot become a child subreaper here")
    try:
        yield
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def reaped(pid: int, timeout: float) -> int | None:
    """Wait up to `timeout` s for an adopted process to exit, and reap it: its exit code
    (negative: killed by that signal), or None if it still runs."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def lines(text: str) -> list[str]:
    """`text` line by line as its stream gave them: split at newlines only."""
    return text.removesuffix("\n").split("\n") if text else []


class App:
    """tests/apps/isolated.py (see `run`) once it has said where its forwarder listens."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.popen = program.popen
        self.helper = int(self.expect("helper ").split()[1])
        self.port = int(self.expect("port ").split()[1])
        self.unix = self.expect("unix ").split()[1]

    @property
    def out(self) -> list[str]:
        """Its stdout lines so far, those `expect` passed over too."""
        return lines(self.program.stdout)

    @property
    def err(self) -> list[str]:
        return lines(self.program.stderr)

    def expect(self, start: str, timeout: float = READ_TIMEOUT) -> str:
        """The next line starting with `start` (earlier ones are kept in `out`)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.program.readline(max(deadline - time.monotonic(), 0.01))
            except AssertionError as exc:  # no line in time, or the app ended
                pytest.fail(f"no line {start!r} in {timeout:g} s: {exc}; stdout: {self.out}")
            if line.startswith(start):
                return line

    def finish(self, timeout: float = 30) -> int:
        return self.program.finish(timeout)


def run(programs: Programs, mode: str, daemon: gforward.daemon.Daemon, target: str,
        directory: str) -> App:
    """tests/apps/isolated.py MODE in a session of its own: its whole process group is
    killed at the test's end (a forked child too, if it outlived the test)."""
    return App(programs.run(sys.executable, str(APPS / "isolated.py"), mode, daemon.url,
                            target, directory, cwd=str(APPS.parent.parent), new_session=True))


# The helper's life ---------------------------------------------------------------------


def test_a_helper_serves_and_is_gone_after_close(daemon: gforward.daemon.Daemon,
                                                  echo_server: str, short_tmp: str) -> None:
    path = os.path.join(short_tmp, "fwd.sock")
    fwd = isolated(daemon.url, echo_server,
                   specs=[f"127.0.0.1:0:{echo_server}", f"{path}:{echo_server}"])
    helper = fwd.helper_pid
    try:
        assert helper != os.getpid() and process_state(helper) not in ("gone", "Z")
        tcp, unix = fwd.listeners
        assert (unix.local, unix.port) == (path, 0) and tcp.port > 0
        assert echo_once(local_address(tcp), b"over tcp") == b"over tcp"
        assert echo_once(path, b"over unix") == b"over unix"
        assert not fwd.closed and fwd.wait(0) is False and not fwd.detached
    finally:
        fwd.close()
    assert fwd.closed and fwd.wait(0) is True
    assert process_state(helper) == "gone"  # exited and reaped by close()
    assert can_bind(tcp.port) and not os.path.exists(path)
    fwd.close()  # idempotent


def test_the_helper_ends_when_the_app_exits_without_closing(
        daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str,
        programs: Programs) -> None:
    app = run(programs, "exit", daemon, echo_server, short_tmp)
    assert app.finish() == 0, (app.out, app.err)
    assert app.out[-1] == "ok" and app.err == [], (app.out, app.err)
    assert process_state(app.helper) == "gone"  # the exit hook closed it and waited for it
    assert not os.path.exists(app.unix) and can_bind(app.port)
    assert os.listdir(short_tmp) == []


def test_the_helper_ends_when_the_app_is_killed(
        daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str,
        programs: Programs) -> None:
    with adopting_orphans():
        app = run(programs, "kill", daemon, echo_server, short_tmp)
        app.expect("ready")
        os.kill(app.popen.pid, signal.SIGKILL)  # the app alone, not its group
        app.finish()
        status = reaped(app.helper, GONE_WITHIN)
    assert status == 0, f"helper {app.helper}: {status} ({process_state(app.helper)})"
    assert process_state(app.helper) == "gone"
    assert not os.path.exists(app.unix) and can_bind(app.port)
    assert app.err == []


def test_a_forked_child_is_detached_and_the_helper_still_ends_with_the_parent(
        daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str,
        programs: Programs) -> None:
    with adopting_orphans():
        app = run(programs, "fork", daemon, echo_server, short_tmp)
        child = int(app.expect("child ").split()[1])
        app.expect("ready")
        assert app.out[-4] == ("child: detached True, closed True, wait True,"
                               " close() returned at once True"), app.out
        assert app.out[-3] == ("child: the parent's forwarder serves after the child's"
                               " close(): True"), app.out
        os.kill(app.popen.pid, signal.SIGKILL)
        app.popen.wait(READ_TIMEOUT)
        try:
            status = reaped(app.helper, GONE_WITHIN)
            child_state = process_state(child)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            reaped(child, READ_TIMEOUT)
    assert child_state not in ("gone", "Z")  # the child still lived when the helper ended
    assert status == 0, f"helper {app.helper}: {status} ({process_state(app.helper)})"
    assert not os.path.exists(app.unix) and can_bind(app.port)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_apps_process_group_is_the_apps_to_handle(
        sig: signal.Signals, daemon: gforward.daemon.Daemon, echo_server: str,
        short_tmp: str, programs: Programs) -> None:
    app = run(programs, "signal", daemon, echo_server, short_tmp)
    app.expect("ready")
    os.killpg(app.popen.pid, sig)  # as a terminal's Ctrl-C, or `kill -TERM -PGID`
    status = app.finish()
    assert f"received ['{sig.name}']" in app.out
    try:
        assert "after the signal: serves True" in app.out, app.out
        assert "after the signal: stats total=3" in app.out, app.out
        assert ("after close(drain=1): helper gone, unix socket file left False"
                in app.out), app.out
        assert status == 0 and app.out[-1] == "ok", (app.out, app.err)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(app.unix)  # what the helper left behind


def test_an_isolated_forwarder_in_a_patched_app(daemon: gforward.daemon.Daemon,
                                                echo_server: str, short_tmp: str,
                                                programs: Programs) -> None:
    app = run(programs, "patched", daemon, echo_server, short_tmp)
    app.finish()
    assert "stats after 0.5 s: 2" in app.out, (app.out, app.err)
    assert "serves after 0.5 s: True" in app.out, (app.out, app.err)
    assert "closed: True" in app.out and app.out[-1] == "ok", (app.out, app.err)
    assert process_state(app.helper) == "gone" and app.err == [], app.err


def test_wait_in_a_patched_app_lets_other_greenlets_close_it(
        daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str,
        programs: Programs) -> None:
    app = run(programs, "patched-wait", daemon, echo_server, short_tmp)
    app.finish()
    line = next(line for line in app.out if line.startswith("wait: "))
    assert line.startswith("wait: True after 0."), (app.out, app.err)


# The helper dies under the app ------------------------------------------------------------


def reap(pid: int) -> None:
    """A killed helper close() did not wait for: not left a zombie after the test."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def test_close_after_the_helper_died_reaps_it(daemon: gforward.daemon.Daemon) -> None:
    fwd = isolated(daemon.url)
    helper = fwd.helper_pid
    try:
        os.kill(helper, signal.SIGKILL)
        assert fwd.wait(GONE_WITHIN) is True and fwd.closed
        with pytest.raises(gforward.ForwardError):
            fwd.stats()
        fwd.close()
        assert process_state(helper) == "gone"
    finally:
        reap(helper)


def test_the_helpers_death_is_logged(daemon: gforward.daemon.Daemon,
                                     gflog: pytest.LogCaptureFixture) -> None:
    fwd = isolated(daemon.url)
    helper = fwd.helper_pid
    try:
        os.kill(helper, signal.SIGKILL)
        assert fwd.wait(GONE_WITHIN) is True
        assert wait_until(lambda: any(str(helper) in m or "helper" in m
                                      for m in warnings_of(gflog)), WAIT), warnings_of(gflog)
    finally:
        fwd.close()
        reap(helper)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_call_pending_when_the_helper_dies_fails(daemon: gforward.daemon.Daemon) -> None:
    fwd = isolated(daemon.url)
    helper = fwd.helper_pid
    outcome: list[BaseException | gforward.ForwarderStats] = []

    def call() -> None:
        try:
            outcome.append(fwd.stats())
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)  # it may never return
    try:
        os.kill(helper, signal.SIGSTOP)
        caller.start()
        time.sleep(0.3)  # the request waits, unread, in the stopped helper's socket
        os.kill(helper, signal.SIGKILL)
        caller.join(GONE_WITHIN)
        assert outcome and isinstance(outcome[0], gforward.ForwardError), outcome
        assert fwd.closed
        fwd.close()
    finally:
        with contextlib.suppress(OSError):
            fwd.close()
        reap(helper)


# Errors at start(): the same as in thread mode, nothing left ------------------------------


def start_both(**fields: object) -> dict[str, BaseException]:
    """start() with `fields` in each isolation: the exception each raised (none may pass),
    with no helper left behind."""
    raised: dict[str, BaseException] = {}
    for isolation in ("thread", "process"):
        before = children()
        with pytest.raises(Exception) as info:
            gforward.start(vm_name="sbox-1", isolation=isolation, **fields)
        raised[isolation] = info.value
        assert children() == before, isolation
    return raised


def test_a_taken_port_fails_start_as_in_thread_mode(daemon: gforward.daemon.Daemon,
                                                     echo_server: str, short_tmp: str) -> None:
    path = os.path.join(short_tmp, "first.sock")
    free = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        raised = start_both(base_url=daemon.url, specs=[
            f"{path}:{echo_server}", f"127.0.0.1:{free}:{echo_server}",
            f"127.0.0.1:{taken.getsockname()[1]}:{echo_server}"])
        assert not os.path.exists(path) and can_bind(free)  # nothing left bound
    thread, process = raised["thread"], raised["process"]
    assert type(process) is type(thread) is gforward.ForwardError
    assert (str(process), getattr(process, "cause", None)) == (str(thread), thread.cause)


def test_a_bad_spec_fails_start_as_in_thread_mode(daemon: gforward.daemon.Daemon) -> None:
    raised = start_both(base_url=daemon.url, specs=["127.0.0.1:0:127.0.0.1:9", "nonsense"])
    assert type(raised["process"]) is type(raised["thread"]) is gforward.SpecError
    assert str(raised["process"]) == str(raised["thread"])


def test_bad_options_fail_start_as_in_thread_mode(daemon: gforward.daemon.Daemon) -> None:
    raised = start_both(base_url=daemon.url, specs=["127.0.0.1:0:127.0.0.1:9"], dial_timeout=0)
    assert type(raised["process"]) is type(raised["thread"]) is ValueError
    assert str(raised["process"]) == str(raised["thread"])


def test_an_ssl_context_cannot_cross_to_a_helper(daemon: gforward.daemon.Daemon) -> None:
    before = children()
    with pytest.raises(ValueError, match="ssl_context"):
        gforward.start(base_url="https://127.0.0.1:1", vm_name="v", isolation="process",
                       specs=["127.0.0.1:0:127.0.0.1:9"],
                       ssl_context=ssl.create_default_context())
    assert children() == before


# Logging across the boundary (every operation: tests/test_operations.py, in both modes) --


def test_a_logger_of_the_apps_own_gets_the_helpers_records(
        daemon: gforward.daemon.Daemon, caplog: pytest.LogCaptureFixture) -> None:
    mine = logging.getLogger("tests.isolated.app")
    caplog.set_level(logging.WARNING, logger=mine.name)
    with isolated(daemon.url, f"127.0.0.1:{closed_port()}", logger=mine) as fwd:
        assert refused(fwd)
        assert wait_until(lambda: any(r.name == mine.name for r in caplog.records), WAIT)
    [record] = [r for r in caplog.records if r.name == mine.name]
    assert record.levelno == logging.WARNING and "502" in record.getMessage()


# Which Python runs the helper ---------------------------------------------------------------

HELPER_PYTHON = """
import sys, gforward
{setup}
fwd = gforward.start(base_url="http://127.0.0.1:9", vm_name="v",
                     specs=["127.0.0.1:0:127.0.0.1:9"], isolation="process")
print(open(f"/proc/{{fwd.helper_pid}}/cmdline", "rb").read().split(b"\\0")[0].decode())
fwd.close()
"""


def run_helper_python(setup: str, **env: str) -> str:
    """The interpreter an app's helper ran in, as the app saw it."""
    result = subprocess.run([sys.executable, "-c", HELPER_PYTHON.format(setup=setup)],
                            capture_output=True, text=True, timeout=30, check=False,
                            env=clean_env(**env), cwd=str(APPS.parent.parent))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_helper_runs_in_the_apps_own_python() -> None:
    assert run_helper_python("") == sys.executable


def test_under_an_embedding_program_the_helper_finds_a_python() -> None:
    """uWSGI and embedding programs are not Python: the base installation's python3.X
    runs the helper, with the app's import path (gevent found where the app found it)."""
    base = os.path.join(sys.base_exec_prefix, "bin",
                        f"python{sys.version_info[0]}.{sys.version_info[1]}")
    if not os.access(base, os.X_OK):
        pytest.skip(f"this installation has no {base}")
    assert run_helper_python("sys.executable = '/usr/bin/uwsgi'") == base


def test_gforward_python_names_the_helpers_interpreter(tmp_path: Path) -> None:
    chosen = tmp_path / "python-for-gforward"
    chosen.symlink_to(sys.executable)
    got = run_helper_python("sys.executable = '/usr/bin/uwsgi'", GFORWARD_PYTHON=str(chosen))
    assert got == str(chosen)
