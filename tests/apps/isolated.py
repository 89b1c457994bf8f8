"""A plain app with a forwarder in a helper process (isolation="process"), for
tests/test_isolation.py: how the helper's life ends with the app's.

    python tests/apps/isolated.py MODE URL TARGET DIR

The forwarder has a TCP listener (a free port) and a unix one (DIR/app.sock) to
TARGET (an echo guest) through the daemon at URL; one echo through each shows it
serves.  The app prints "helper PID", "port PORT" and "unix PATH", then, by MODE:

* exit: exits normally without closing the forwarder (the exit hook's business);
* kill: holds a tunnel open, prints "ready" and sleeps until killed;
* fork: forks a child that checks its inherited copy (detached, closed, wait and
  close returning at once), closes it, still reaches the parent's listener, says
  "child PID ready" and sleeps; the parent prints "ready" and sleeps until killed;
* signal: waits for SIGTERM or SIGINT (sent to its whole process group, as a
  terminal's Ctrl-C or a service manager would), then checks that the forwarder
  still serves (a draining close is what such an app does next), closes it with
  a drain and checks that the helper is gone and the unix socket file removed;
* patched: (gevent-patched first) the forwarder still serves and answers stats()
  half a second after start(), then closes;
* patched-wait: (gevent-patched first) a greenlet closes the forwarder in 0.3 s while
  the main greenlet waits for it with wait(3).

Prints what it checked; the last line is "ok" or "FAILED".
"""

import sys

if sys.argv[1].startswith("patched"):
    from gevent import monkey

    monkey.patch_all()

import os
import signal
import socket
import time

import support

import gforward

MODE, URL, TARGET, DIRECTORY = sys.argv[1:5]
say = support.say


def echo_through(address: "tuple[str, int] | str", message: bytes) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(address)
            support.exchange(sock, message)
    except (OSError, AssertionError, EOFError):
        return False
    return True


def sleep_until_killed() -> None:
    time.sleep(60)
    say("PROBLEM not killed within 60 s")
    os._exit(1)


def main() -> int:
    support.watchdog(20 if MODE.startswith("patched") else 70)
    problems: list[str] = []
    path = os.path.join(DIRECTORY, "app.sock")
    fwd = gforward.start(base_url=URL, vm_name="isolated", isolation="process",
                         specs=[f"127.0.0.1:0:{TARGET}", f"{path}:{TARGET}"])
    port = fwd.listeners[0].port
    say(f"helper {fwd.helper_pid}")
    say(f"port {port}")
    say(f"unix {path}")
    if not (echo_through(("127.0.0.1", port), b"tcp") and echo_through(path, b"unix")):
        problems.append("the forwarder does not serve")
    if MODE == "exit":
        return support.verdict(problems)  # the forwarder still open
    if MODE == "kill":
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        support.exchange(held, b"held open")
        say("ready")
        sleep_until_killed()
    if MODE == "fork":
        return fork(fwd, path, problems)
    if MODE == "signal":
        return after_a_signal(fwd, path, problems)
    if MODE.startswith("patched"):
        return patched(fwd, port, problems)
    raise SystemExit(f"unknown mode {MODE!r}")


def fork(fwd: gforward.Forwarder, path: str, problems: list[str]) -> int:
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        support.watchdog(70)
        began = time.monotonic()
        fwd.close()
        took = time.monotonic() - began
        say(f"child: detached {fwd.detached}, closed {fwd.closed}, wait {fwd.wait(0)},"
            f" close() returned at once {took < 0.5}")
        say(f"child: the parent's forwarder serves after the child's close():"
            f" {echo_through(path, b'from the child')}")
        say(f"child {os.getpid()} ready")
        os.write(writer, b"x")
        sleep_until_killed()
    os.close(writer)
    if os.read(reader, 1) != b"x":
        problems.append("the child did not report")
    if not echo_through(path, b"parent"):
        problems.append("the parent's forwarder stopped serving after the child's close()")
    say("ready")
    if problems:
        return support.verdict(problems)
    sleep_until_killed()
    return 1


def patched(fwd: gforward.Forwarder, port: int, problems: list[str]) -> int:
    import gevent

    if MODE == "patched-wait":
        gevent.spawn_later(0.3, fwd.close)
        began = time.monotonic()
        closed = fwd.wait(3)
        say(f"wait: {closed} after {time.monotonic() - began:.1f} s")
        return support.verdict(problems)
    time.sleep(0.5)
    answer = "no answer in 5 s"
    with gevent.Timeout(5, False):
        try:
            answer = str(fwd.stats().tunnels_total)
        except gforward.ForwardError as exc:
            answer = f"raised {exc}"
    say(f"stats after 0.5 s: {answer}")
    say(f"serves after 0.5 s: {echo_through(('127.0.0.1', port), b'later')}")
    closed = "no return in 5 s"
    with gevent.Timeout(5, False):
        try:
            fwd.close()
            closed = "True"
        except OSError as exc:
            closed = f"raised {exc!r}"
    say(f"closed: {closed}")
    return support.verdict(problems)


def after_a_signal(fwd: gforward.Forwarder, path: str, problems: list[str]) -> int:
    received: list[str] = []

    def stop(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    say("ready")
    deadline = time.monotonic() + 30
    while not received and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # the signal reached the helper too, if it was to
    say(f"received {received}")
    say(f"after the signal: serves {echo_through(path, b'still here')}")
    try:
        stats = fwd.stats()
        say(f"after the signal: stats total={stats.tunnels_total}")
    except gforward.ForwardError as exc:
        say(f"after the signal: stats raised {exc}")
    fwd.close(drain=1.0)
    state = support.process_state(fwd.helper_pid)
    say(f"after close(drain=1): helper {state}, unix socket file left {os.path.exists(path)}")
    return support.verdict(problems)


if __name__ == "__main__":
    sys.exit(main())
