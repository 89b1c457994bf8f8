"""gunicorn's gevent worker with a forwarder per worker, started in post_fork or in
post_worker_init (gunicorn_site.py, the site and its config).

The guests run in a process of their own (support.GuestProcess), the reference
daemon in another (`python -m gforward.daemon`), gunicorn (2 gevent workers)
bound to a unix socket in DIR.  This script sends requests until both workers
have answered (each request goes through the answering worker's forwarder to
the guest, and every byte is checked) at least 3 times each, stops gunicorn with
SIGTERM, and reads
the gforward logger's records that the workers wrote to gunicorn's stderr:
with post_fork each worker that served must have logged
gforward.forwarder.PATCHED_LATE exactly once (gevent patched it after start()),
with post_worker_init never.  Prints what it checked; exit 0 only if it held.

    python tests/apps/gunicorn_app.py post_fork|post_worker_init DIR
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import support

from gforward.forwarder import PATCHED_LATE

HOOK, DIRECTORY = sys.argv[1], sys.argv[2]
WORKERS = 2
BATCH = 8  # requests at once, so that both workers get some
EACH = 3  # requests each worker must answer: a hint is once per worker, not per tunnel
SERVE_FOR = 20.0  # seconds at most to see every worker answer
APPS = os.path.dirname(os.path.abspath(__file__))
say = support.say


def get(path: str, seed: int, size: int) -> str:
    """One request through gunicorn; the answering worker's pid (AssertionError if the
    body is not the guest's)."""
    return support.fetch_headers(path, seed, size, timeout=15)["X-Worker"]


def clean_env(**more: str) -> dict[str, str]:
    """This environment without proxies (the daemon and guest are on loopback)."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env.update(more)
    return env


def daemon() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "gforward.daemon", "--listen",
                             "127.0.0.1:0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=clean_env())
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    assert match, f"the daemon said {line!r}"
    return proc, match.group(1)


def wait_for_socket(path: str, gunicorn: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gunicorn.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {gunicorn.returncode}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"gunicorn did not listen on {path} in {timeout:g} s")


def serve(path: str) -> tuple[Counter[str], list[str]]:
    """Batches of requests until every worker answered EACH; (answers per worker,
    failures)."""
    answered: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + SERVE_FOR

    def one(seed: int) -> None:
        try:
            pid = get(path, seed, 1000 + seed)
        except Exception as exc:
            with lock:
                failures.append(f"request {seed}: {type(exc).__name__}: {exc}")
            return
        with lock:
            answered[pid] += 1

    seed = 0
    while ((len(answered) < WORKERS or min(answered.values()) < EACH)
           and time.monotonic() < deadline and len(failures) < 5):
        threads = support.run_threads(lambda i, base=seed: one(base + i), BATCH, "client", 15)
        failures.extend(f"{t.name} still running" for t in threads if t.is_alive())
        seed += BATCH
    return answered, failures


def main() -> int:
    support.watchdog(50)
    problems: list[str] = []
    guests = support.GuestProcess()
    server, url = daemon()
    sock_path = os.path.join(DIRECTORY, "gunicorn.sock")
    stderr_path = os.path.join(DIRECTORY, "gunicorn.err")
    with open(stderr_path, "wb") as err:
        gunicorn = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--chdir", APPS, "-c", "python:gunicorn_site",
             "--workers", str(WORKERS), "--bind", f"unix:{sock_path}", "gunicorn_site:app"],
            stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            env=clean_env(GFORWARD_HOOK=HOOK, GFORWARD_DAEMON=url, GFORWARD_GUEST=guests.http))
    answered: Counter[str] = Counter()
    try:
        wait_for_socket(sock_path, gunicorn, 20)
        answered, failures = serve(sock_path)
        say(f"requests: {sum(answered.values())} answered, {len(failures)} failed,"
            f" workers answering: {len(answered)}")
        problems += failures
        if len(answered) < WORKERS or min(answered.values()) < EACH:
            problems.append(f"not every one of {WORKERS} workers answered {EACH} requests:"
                            f" {dict(answered)}")
    except RuntimeError as exc:
        problems.append(str(exc))
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        try:
            status = gunicorn.wait(15)
        except subprocess.TimeoutExpired:
            gunicorn.kill()
            status = gunicorn.wait()
        server.terminate()
        server.wait(5)
        guests.stop()
    say(f"gunicorn exited: {status}")
    with open(stderr_path, errors="replace") as f:
        log = f.read()
    hints: Counter[str] = Counter()
    for match in re.finditer(r"^gforward-log pid=(\d+) (\w+) (.*)$", log, re.MULTILINE):
        pid, level, message = match.groups()
        if message == PATCHED_LATE and level == "WARNING":
            hints[pid] += 1
        else:
            problems.append(f"worker {pid} logged: {level} {message}")
    say(f"hints per worker: {[hints[pid] for pid in sorted(answered)]}")
    say(f"hints from workers that served no request: "
        f"{sorted(set(hints) - set(answered))}")
    if status != 0:
        problems.append(f"gunicorn exited with {status}:\n{log[-3000:]}")
    return support.verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
