"""Every kind of synchronous app, under stress: whole apps run as subprocesses.

Each test runs one script of tests/apps/ (plain, gevent-patched, or both),
which prints what it checked and exits 0 only if every check held; the test
then checks the status, the report and an empty stderr (no traceback, no
warning: the hub prints uncaught greenlet errors there, and gforward logs a
tunnel that would not end there).  The scripts bound themselves with a
watchdog thread; the runner here bounds them again and kills their whole
process group, forked workers and guest processes included.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import gforward
import gforward.daemon
from tests.support import APPS

MODES = ["plain", "patched"]


def run_app(script: str, *args: str, timeout: float = 45) -> subprocess.CompletedProcess[str]:
    """Run a tests/apps script in a session of its own and kill all that is left of it.

    tests/test_forwarder.py's run_app kills only the script; these fork
    workers and start guest processes, which must not outlive a failure.
    """
    proc = subprocess.Popen(
        [sys.executable, str(APPS / script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(APPS.parent.parent),
        start_new_session=True,
    )
    def kill_group() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group()
        out, err = proc.communicate()
        pytest.fail(f"{script} {' '.join(args)} ran over {timeout} s:\n{out}\n{err}")
    finally:
        kill_group()
        proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def checked(result: subprocess.CompletedProcess[str], last: str | None = "ok") -> list[str]:
    """The report of a script that ran clean: status 0, nothing on stderr, `last` line last."""
    shown = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, shown
    assert result.stderr == "", shown
    lines = result.stdout.splitlines()
    if last is not None:
        assert lines and lines[-1] == last, shown
    return lines


def line_with(lines: list[str], start: str) -> str:
    found = [line for line in lines if line.startswith(start)]
    assert found, f"no line starting {start!r} in {lines}"
    return found[0]


@pytest.mark.parametrize("threads", [8, 64])
def test_many_threads_fetch_through_one_forwarder(threads: int) -> None:
    lines = checked(run_app("threads_fetch.py", str(threads)))
    assert lines[0] == "patched: False"
    summary = line_with(lines, f"{threads} threads x 4 fetches at once")
    assert f"{threads * 4} fetched" in summary and "0 failed, 0 still running" in summary
    assert "forwarder closed: True; unix socket file removed: True" in lines


@pytest.mark.parametrize("mode", MODES)
def test_several_forwarders_started_and_closed_from_different_threads(mode: str) -> None:
    lines = checked(run_app("many_forwarders.py", mode))
    assert lines[0] == f"patched: {mode == 'patched'}"
    assert len([line for line in lines if "closed by two threads at once" in line]) == 3
    assert any("closed at the same time by 6 threads" in line for line in lines)
    assert "hub threads left after closing: 0" in lines


@pytest.mark.parametrize("mode", MODES)
def test_stats_and_a_draining_close_from_other_threads(mode: str) -> None:
    lines = checked(run_app("operate.py", mode))
    assert "a connection during the drain: refused" in lines
    assert "stats: total=1 failed=0 up=19 down=22" in lines


@pytest.mark.parametrize("load", ["idle", "busy"])
@pytest.mark.parametrize("mode", MODES)
def test_exit_with_forwarders_open(mode: str, load: str, short_tmp: str) -> None:
    began = time.monotonic()
    lines = checked(run_app("exit_open.py", mode, load, short_tmp, timeout=30), last=None)
    took = time.monotonic() - began
    assert took < 15, f"exiting took {took:.1f} s: {lines}"
    assert "services closed at exit: [True, True, True]" in lines
    assert "unix socket files left: []" in lines
    assert "hub threads alive: []" in lines
    assert os.listdir(short_tmp) == []
    if load == "busy":
        for tunnel in ("streaming", "stuck"):
            assert line_with(lines, f"{tunnel} tunnel: ").split(": ", 1)[1] in ("eof", "reset")


@pytest.mark.parametrize("mode", MODES)
def test_forward_per_request_in_a_gevent_wsgi_app(mode: str) -> None:
    lines = checked(run_app("wsgi_forward.py", mode))
    assert lines[0] == f"patched: {mode == 'patched'}"
    assert line_with(lines, "12 of 12 concurrent requests")
    assert "'rounds': 40" in line_with(lines, "/slow kept its own forward open")
    assert line_with(lines, "ticker greenlet alive: True")


@pytest.mark.parametrize("hook", ["post_fork", "post_worker_init"])
def test_gunicorn_gevent_worker_says_when_the_forwarder_started_too_early(
        hook: str, short_tmp: str) -> None:
    """gunicorn's gevent worker patches the process after post_fork: a forwarder started
    there finds a plain process, and says so once per worker (PATCHED_LATE) when it
    sees the patch; started in post_worker_init, it joins the worker's hub silently.
    Requests through it work either way."""
    lines = checked(run_app("gunicorn_app.py", hook, short_tmp, timeout=60))
    assert "0 failed, workers answering: 2" in line_with(lines, "requests: ")
    assert "gunicorn exited: 0" in lines
    once = hook == "post_fork"
    assert line_with(lines, "hints per worker: ") == f"hints per worker: {[int(once)] * 2}"
    assert "hints from workers that served no request: []" in lines


def test_partly_patched_process_keeps_its_hub() -> None:
    lines = checked(run_app("partial_patch.py"))
    assert "the app's hub still runs greenlets: True" in lines


@pytest.mark.parametrize("mode", MODES)
def test_prefork_workers(mode: str, short_tmp: str) -> None:
    lines = checked(run_app("prefork.py", mode, short_tmp))
    children = [line for line in lines if line.startswith("child ")]
    assert len(children) == 2 * 5 and all(line.endswith(": yes") for line in children), lines
    assert "port free and unix file gone: True; its open tunnel ended: " in line_with(
        lines, "parent: closed while the workers live")
    assert line_with(lines, "parent: workers exited 0: True").endswith(
        "of the forwarders they left open: True")
    assert os.listdir(short_tmp) == []


@pytest.mark.parametrize("moment", ["greenlet", "hub", "daemon"])
def test_fork_while_a_connection_is_not_yet_open(moment: str) -> None:
    lines = checked(run_app("fork_pending.py", moment))
    assert "the client saw eof" in lines[0] or "the client saw reset" in lines[0], lines


@pytest.mark.parametrize("listener", ["serving", "removing"])
def test_fork_while_an_ended_tunnel_lingers(listener: str) -> None:
    """The reply whole, and the child's copy of the lingering socket let go of at once,
    also while its listener is being removed."""
    lines = checked(run_app("fork_linger.py", *(["removing"] if listener == "removing" else [])))
    assert line_with(lines, "forked while the tunnel lingered: the client got 1048576 of "
                     "1048576 bytes"), lines


def test_exit_hook_while_another_thread_closes_services() -> None:
    lines = checked(run_app("exit_race.py"))
    assert all(line.endswith("still open after the hook: 0") for line in lines[:-1]), lines


@pytest.mark.parametrize("mode", MODES)
def test_idle_process_uses_no_cpu(mode: str, short_tmp: str) -> None:
    """A bound, not a benchmark: a spinning hub would burn the whole 2 s."""
    lines = checked(run_app("idle_cpu.py", mode, short_tmp), last=None)
    report = json.loads(lines[-1])
    assert report["wall"] >= 1.9
    assert report["cpu"] < 0.2, report
    if mode == "plain":  # one shared hub thread serves all three services
        assert list(report["hub_cpu"]) == ["gforward hub"], report
    assert all(cpu < 0.1 for cpu in report["hub_cpu"].values()), report


# Closing while a tunnel lingers ----------------------------------------------------------
# In-process: found while writing the apps above (a close() that took JOIN_TIMEOUT and
# logged "did not end in time" on their stderr).

@pytest.mark.parametrize(
    ("guest", "closing"),
    [
        pytest.param("silent", "forwarder", id="client-half-closed-forwarder"),
        pytest.param("silent", "daemon", id="client-half-closed-daemon"),
        pytest.param("closes", "forwarder", id="guest-closed-client-silent"),
    ],
)
def test_close_is_prompt_while_a_tunnel_lingers(guest: str, closing: str) -> None:
    """One side of the tunnel has ended and the other is silent: close() must not wait.

    silent: the local client half-closes and the guest never answers nor closes.
    closes: the guest says "hi" and closes; the local client reads it all and then
    keeps its socket open without a word (a pooled HTTP connection, say).
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn = server.accept()[0]
                held.append(conn)
                if guest == "closes":
                    conn.sendall(b"hi")
                    conn.close()

    threading.Thread(target=accept, daemon=True).start()
    daemon = gforward.daemon.start()
    fwd = gforward.start(base_url=daemon.url, vm_name="v",
                         specs=[f"127.0.0.1:0:127.0.0.1:{server.getsockname()[1]}"])
    client = socket.create_connection(("127.0.0.1", fwd.listeners[0].port), timeout=10)
    try:
        if guest == "silent":
            client.sendall(b"x")
            deadline = time.monotonic() + 10
            while not held and time.monotonic() < deadline:  # the tunnel reached the guest
                time.sleep(0.01)
            client.shutdown(socket.SHUT_WR)
        else:
            assert client.recv(10) == b"hi" and client.recv(10) == b""
        time.sleep(0.3)  # the Close frame crosses over
        service = fwd if closing == "forwarder" else daemon
        began = time.monotonic()
        service.close()
        took = time.monotonic() - began
        assert took < 1.0, f"{closing}.close() took {took:.1f} s"
    finally:
        client.close()
        fwd.close()
        daemon.close()
        server.close()
        for sock in held:
            sock.close()
