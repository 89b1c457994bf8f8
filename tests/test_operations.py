"""Operating a forwarder: stats, a draining close, wait_ready, listeners added and removed
at run time, and the command line's SIGUSR1, --drain and --wait-ready."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import gforward
import gforward.daemon
from tests.peers.fake_daemon import FakeDaemon, Peer
from tests.peers.guest import Guest
from tests.peers.programs import Program, Programs
from tests.support import (
    BOTH_DIALS,
    IO_TIMEOUT,
    WAIT,
    announced_listeners,
    blackhole,
    can_bind,
    closed_port,
    connect,
    echo_once,
    forward,
    free_port,
    gforward_cli,
    local_address,
    read_exact,
    read_to_eof,
    refused,
    wait_until,
    warnings_of,
    watch_end,
)

TOKEN_SECRET = "t0ken-n3ver-sh0wn-5e1f"


@pytest.fixture(params=["thread", "process"])
def isolation(request: pytest.FixtureRequest) -> str:
    """Each operation, with the tunnels in this process and in a helper process: the
    same API, the same answers."""
    mode: str = request.param
    return mode


def stats_of(fwd: gforward.Forwarder, index: int = 0) -> gforward.ListenerStats:
    return fwd.stats().listeners[index]


NEVER = threading.Event()  # set by no one: a guest that waits on it never answers


def slow_reply(delay: float, done: threading.Event = NEVER) -> Callable[[socket.socket], None]:
    """A guest that reads the request to its end, thinks `delay` seconds (or until `done`,
    so that a test that cuts the tunnel need not wait for it), and answers.  A cut that
    reaches it before the request's end resets it: the test checks what its client saw."""
    def handler(sock: socket.socket) -> None:
        try:
            request = read_to_eof(sock)
        except ConnectionResetError:
            return
        if not done.wait(delay):
            sock.sendall(b"reply to " + request)

    return handler


def ask(sock: socket.socket, tunnels_open: Callable[[], int]) -> None:
    """Send a slow guest the whole request (b"question", then EOF) and wait until its
    tunnel is open (`tunnels_open()` is 1)."""
    sock.sendall(b"question")
    sock.shutdown(socket.SHUT_WR)
    assert wait_until(lambda: tunnels_open() == 1, IO_TIMEOUT)


# Stats ---------------------------------------------------------------------------------


def test_stats_while_tunnels_are_open_and_after(daemon: gforward.daemon.Daemon,
                                                 echo_server: str, isolation: str) -> None:
    with forward(daemon.url, echo_server, specs=[f"127.0.0.1:0:{echo_server}",
                                                 f"127.0.0.1:0:{echo_server}"],
                 isolation=isolation) as fwd:
        first, second = fwd.listeners
        with connect(first) as a, connect(first) as b:
            a.sendall(b"x" * 1000)
            assert read_exact(a, 1000) == b"x" * 1000
            b.sendall(b"y" * 10)
            assert read_exact(b, 10) == b"y" * 10
            during = fwd.stats()
            assert (during.tunnels_open, during.tunnels_total) == (2, 2)
            assert (during.bytes_up, during.bytes_down) == (1010, 1010)  # while still open
            assert during.listeners[0].listener == first
            assert (during.listeners[0].tunnels_open, during.listeners[1].tunnels_open) == (2, 0)
        assert echo_once(local_address(second), b"z" * 5) == b"z" * 5
        assert wait_until(lambda: fwd.stats().tunnels_open == 0, WAIT)
        after = fwd.stats()
    assert (after.tunnels_total, after.tunnels_failed, after.failures) == (3, 0, {})
    assert (after.bytes_up, after.bytes_down) == (1015, 1015)
    assert [(s.tunnels_total, s.bytes_up) for s in after.listeners] == [(2, 1010), (1, 5)]


@BOTH_DIALS
def test_a_refused_upgrade_is_counted_under_its_status_and_logged(
        host: str, echo_server: str, isolation: str, gflog: pytest.LogCaptureFixture) -> None:
    def refusals() -> list[str]:
        return [m for m in warnings_of(gflog) if " 401 " in m]  # not a port number's digits

    with gforward.daemon.start(token="right") as daemon, \
            forward(daemon.url.replace("127.0.0.1", host), echo_server, token="wrong",
                    isolation=isolation) as fwd:
        assert refused(fwd)
        assert refused(fwd)
        assert wait_until(lambda: fwd.stats().tunnels_failed == 2, WAIT)
        stats = fwd.stats()
        assert wait_until(lambda: len(refusals()) >= 2, WAIT)  # a helper's come a little later
    assert stats.failures == {"http 401": 2}
    assert stats.listeners[0].failures == {"http 401": 2}
    assert stats.tunnels_open == 0
    assert len(refusals()) == 2, refusals()  # one warning for each refused tunnel
    for warning in refusals():
        assert warning.startswith("tunnel 127.0.0.1:") and "failed" in warning
        assert "wrong" not in warning  # the token stays out of the log, from a helper too
    infos = [r.getMessage() for r in gflog.records
             if r.name == "gforward" and r.levelno == logging.INFO]
    assert any(m.startswith("listening on 127.0.0.1:") for m in infos)  # logged during start


def test_counters_never_go_backwards_while_tunnels_come_and_go(
        daemon: gforward.daemon.Daemon, echo_server: str, isolation: str) -> None:
    stop = threading.Event()
    seen: list[gforward.ForwarderStats] = []

    def watch(fwd: gforward.Forwarder) -> None:
        while not stop.wait(0.001):
            seen.append(fwd.stats())

    with forward(daemon.url, echo_server, isolation=isolation) as fwd:
        watcher = threading.Thread(target=watch, args=(fwd,))
        watcher.start()
        try:
            for _ in range(30):
                assert echo_once(local_address(fwd), b"q" * 100) == b"q" * 100
        finally:
            stop.set()
            watcher.join(WAIT)
    for earlier, later in zip(seen, seen[1:]):
        for field in ("tunnels_total", "tunnels_failed", "bytes_up", "bytes_down"):
            assert getattr(later, field) >= getattr(earlier, field), field


# A draining close ------------------------------------------------------------------------


@pytest.fixture
def thinker() -> Iterator[Guest]:
    """A guest that would answer in a minute; the test is over first."""
    done = threading.Event()
    with Guest(slow_reply(60.0, done)) as guest:
        try:
            yield guest
        finally:
            done.set()


def test_a_drain_lets_a_slow_reply_finish_and_refuses_newcomers(
        daemon: gforward.daemon.Daemon, gflog: pytest.LogCaptureFixture, isolation: str) -> None:
    with Guest(slow_reply(1.5)) as guest, \
            forward(daemon.url, guest.target, isolation=isolation) as fwd:
        port = fwd.listeners[0].port
        with connect(fwd) as sock:
            ask(sock, lambda: fwd.stats().tunnels_open)
            closer = threading.Thread(target=fwd.close, kwargs={"drain": 10.0})
            began = time.monotonic()
            closer.start()
            assert wait_until(lambda: can_bind(port), WAIT)  # no longer accepting
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=WAIT).close()
            assert read_to_eof(sock) == b"reply to question"
            closer.join(WAIT)
            took = time.monotonic() - began
    assert not closer.is_alive() and fwd.closed
    assert took < 10.0
    assert fwd.stats().tunnels_failed == 0
    assert any("draining: waiting up to 10 s for 1 open tunnel" in r.getMessage()
               for r in gflog.records)


def test_a_drain_cuts_what_is_left_at_its_deadline(daemon: gforward.daemon.Daemon,
                                                   thinker: Guest, isolation: str) -> None:
    with forward(daemon.url, thinker.target, isolation=isolation) as fwd, connect(fwd) as sock:
        ask(sock, lambda: fwd.stats().tunnels_open)
        began = time.monotonic()
        fwd.close(drain=1.0)
        took = time.monotonic() - began
        assert watch_end(sock).seen == "reset"  # cut short, and the client can tell
    assert 1.0 <= took < 5.0
    assert fwd.stats().tunnels_failed == 0  # cut by the drain's deadline: not a failure


def test_a_plain_close_during_a_drain_cuts_at_once(daemon: gforward.daemon.Daemon,
                                                   thinker: Guest, isolation: str) -> None:
    with forward(daemon.url, thinker.target, isolation=isolation) as fwd, connect(fwd) as sock:
        ask(sock, lambda: fwd.stats().tunnels_open)
        draining = threading.Thread(target=fwd.close, kwargs={"drain": 60.0})
        draining.start()
        time.sleep(0.3)
        began = time.monotonic()
        fwd.close()  # from another thread than the drain's
        took = time.monotonic() - began
        draining.join(WAIT)
        assert watch_end(sock).seen == "reset"
    assert took < 3.0 and not draining.is_alive()


# wait_ready ------------------------------------------------------------------------------


def test_wait_ready_returns_once_the_guest_port_listens(daemon: gforward.daemon.Daemon,
                                                        isolation: str) -> None:
    port = free_port()
    late = socket.socket()

    def listen_later() -> None:
        time.sleep(1.5)
        late.bind(("127.0.0.1", port))
        late.listen(8)

    with forward(daemon.url, f"127.0.0.1:{port}", isolation=isolation) as fwd:
        threading.Thread(target=listen_later, daemon=True).start()
        began = time.monotonic()
        try:
            assert fwd.wait_ready(WAIT) is True
            took = time.monotonic() - began
        finally:
            late.close()
        assert fwd.stats().tunnels_total == 0  # probes are not the listeners' tunnels
    assert 1.4 <= took < 5.0


def test_wait_ready_is_false_on_timeout(daemon: gforward.daemon.Daemon, isolation: str) -> None:
    with forward(daemon.url, f"127.0.0.1:{closed_port()}", isolation=isolation) as fwd:
        began = time.monotonic()
        assert fwd.wait_ready(1.0) is False
        assert time.monotonic() - began < 3.0


def test_wait_ready_raises_on_a_refusal_that_will_not_get_better(
        echo_server: str, isolation: str, capfd: pytest.CaptureFixture[str]) -> None:
    with gforward.daemon.start(token="right") as daemon, \
            forward(daemon.url, echo_server, token=TOKEN_SECRET, isolation=isolation) as fwd:
        began = time.monotonic()
        with pytest.raises(gforward.ForwardError, match="401") as info:
            fwd.wait_ready(WAIT)
        assert time.monotonic() - began < 3.0
    assert fwd.listeners[0].local in str(info.value)
    assert TOKEN_SECRET not in str(info.value)
    assert "Traceback" not in capfd.readouterr().err  # raised here, not printed by the hub


def test_wait_ready_is_false_once_closed(daemon: gforward.daemon.Daemon, isolation: str) -> None:
    with forward(daemon.url, f"127.0.0.1:{closed_port()}", isolation=isolation) as fwd:
        threading.Timer(0.5, fwd.close).start()
        assert fwd.wait_ready(WAIT) is False


# Listeners added and removed -------------------------------------------------------------


def test_listeners_added_and_removed_while_others_serve(
        daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str, isolation: str) -> None:
    path = os.path.join(short_tmp, "added.sock")
    with forward(daemon.url, echo_server, isolation=isolation) as fwd:
        first = fwd.listeners[0]
        with connect(first) as busy:
            busy.sendall(b"before")
            assert read_exact(busy, 6) == b"before"
            tcp = fwd.add(f"127.0.0.1:0:{echo_server}")
            unix = fwd.add(f"{path}:{echo_server}")
            assert fwd.listeners == [first, tcp, unix]
            assert echo_once(local_address(tcp), b"tcp") == b"tcp"
            assert echo_once(path, b"unix") == b"unix"
            fwd.remove(tcp)
            fwd.remove(unix.spec)
            assert fwd.listeners == [first]
            assert can_bind(tcp.port)  # the port is free at once
            assert not os.path.exists(path)  # and the socket file gone
            busy.sendall(b"after")  # the first listener's tunnel never noticed
            assert read_exact(busy, 5) == b"after"
        with pytest.raises(KeyError):
            fwd.remove(tcp)
        stats = fwd.stats()
    assert stats.tunnels_total == 3  # totals keep what removed listeners carried
    assert [s.listener for s in stats.listeners] == [first]


def test_add_raises_as_start_does_and_binds_nothing(daemon: gforward.daemon.Daemon,
                                                   echo_server: str, isolation: str) -> None:
    with forward(daemon.url, echo_server, isolation=isolation) as fwd:
        taken = fwd.listeners[0].port
        with pytest.raises(gforward.ForwardError, match="cannot listen"):
            fwd.add(f"127.0.0.1:{taken}:{echo_server}")
        with pytest.raises(gforward.SpecError):
            fwd.add("not a spec")
        assert len(fwd.listeners) == 1


def test_remove_with_a_drain_lets_its_tunnel_finish(daemon: gforward.daemon.Daemon,
                                                     echo_server: str, isolation: str) -> None:
    with Guest(slow_reply(1.0)) as guest, \
            forward(daemon.url, echo_server, isolation=isolation) as fwd:
        slow = fwd.add(f"127.0.0.1:0:{guest.target}")
        with connect(slow) as sock:
            ask(sock, lambda: stats_of(fwd, 1).tunnels_open)
            fwd.remove(slow, drain=10.0)
            assert can_bind(slow.port)
            assert read_to_eof(sock) == b"reply to question"
        assert echo_once(local_address(fwd), b"still here") == b"still here"


# The command line --------------------------------------------------------------------------


def test_sigusr1_prints_every_listeners_counters(programs: Programs, echo_server: str) -> None:
    _, [url] = programs.daemon("--listen", "127.0.0.1:0")
    cli = gforward_cli(programs, "vm1", f"127.0.0.1:0:{echo_server}",
                       f"127.0.0.1:0:{echo_server}", "--url", url)
    (first, _, _), (second, _, _) = announced_listeners(cli, 2)
    host, port = first.rsplit(":", 1)
    assert echo_once((host, int(port)), b"12345") == b"12345"

    def settled() -> bool:  # the tunnel's end may still be on its way when EOF was seen
        cli.popen.send_signal(signal.SIGUSR1)
        time.sleep(0.1)
        return " open=0 total=1 " in cli.stderr

    assert wait_until(settled, WAIT)
    lines = cli.stderr.splitlines()[-2:]
    assert lines[0] == (f"gforward: {first} -> vm1 {echo_server} open=0 total=1 failed=0 "
                        "up=5 down=5")
    assert lines[1] == (f"gforward: {second} -> vm1 {echo_server} open=0 total=0 failed=0 "
                        "up=0 down=0")
    assert cli.stop() == 0


def cli_with_one_tunnel_waiting(programs: Programs, guest: Guest, *flags: str
                                ) -> tuple[Program, socket.socket]:
    """The command line forwarding to `guest`, and one tunnel whose request went out."""
    _, [url] = programs.daemon("--listen", "127.0.0.1:0")
    cli = gforward_cli(programs, "vm1", f"127.0.0.1:0:{guest.target}", "--url", url, *flags)
    [(local, _, _)] = announced_listeners(cli)
    host, port = local.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=WAIT)
    ask(sock, lambda: guest.accepted)  # the daemon reached the guest: the tunnel is open
    return cli, sock


def test_drain_flag_lets_a_reply_finish(programs: Programs) -> None:
    with Guest(slow_reply(1.5)) as guest:
        cli, sock = cli_with_one_tunnel_waiting(programs, guest, "--drain", "20")
        with sock:
            cli.popen.send_signal(signal.SIGTERM)
            assert read_to_eof(sock) == b"reply to question"
        assert cli.finish() == 0


def test_a_second_signal_cuts_a_drain(programs: Programs, thinker: Guest) -> None:
    cli, sock = cli_with_one_tunnel_waiting(programs, thinker, "--drain", "60")
    with sock:
        cli.popen.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        began = time.monotonic()
        cli.popen.send_signal(signal.SIGINT)
        assert cli.finish() == 0
        assert time.monotonic() - began < 5.0
        assert watch_end(sock).seen == "reset"


def test_wait_ready_flag(programs: Programs, echo_server: str) -> None:
    _, [url] = programs.daemon("--listen", "127.0.0.1:0")
    ready = gforward_cli(programs, "vm1", f"127.0.0.1:0:{echo_server}", "--url", url,
                         "--wait-ready", "10")
    announced_listeners(ready)
    assert ready.readline() == "ready"
    assert ready.stop() == 0
    never = gforward_cli(programs, "vm1", f"127.0.0.1:0:127.0.0.1:{closed_port()}",
                         "--url", url, "--wait-ready", "1")
    announced_listeners(never)
    assert never.finish() == 1
    assert "not ready within 1 s" in never.stderr
    _, [guarded] = programs.daemon("--listen", "127.0.0.1:0", "--token", "right")
    refused_cli = gforward_cli(programs, "vm1", f"127.0.0.1:0:{echo_server}", "--url", guarded,
                               "--token", "wrong", "--wait-ready", "10")
    announced_listeners(refused_cli)
    assert refused_cli.finish() == 1
    assert "http 401" in refused_cli.stderr.lower() or "401" in refused_cli.stderr
    assert "Traceback" not in refused_cli.stderr  # one line says why, nothing else


def test_close_ends_the_tunnels_of_a_listener_being_removed(
        daemon: gforward.daemon.Daemon, echo_server: str, thinker: Guest, isolation: str) -> None:
    with forward(daemon.url, echo_server, isolation=isolation) as fwd:
        leaving = fwd.add(f"127.0.0.1:0:{thinker.target}")
        with connect(leaving) as sock:
            ask(sock, lambda: stats_of(fwd, 1).tunnels_open)
            removing = threading.Thread(target=fwd.remove, args=(leaving,),
                                        kwargs={"drain": 60.0})
            removing.start()
            assert wait_until(lambda: len(fwd.listeners) == 1, WAIT)
            began = time.monotonic()
            fwd.close()
            assert time.monotonic() - began < 3.0
            assert watch_end(sock).seen == "reset"  # closed with the rest
            removing.join(WAIT)
            assert not removing.is_alive()


@contextlib.contextmanager
def closed_during_wait_ready(fwd: gforward.Forwarder) -> Iterator[None]:
    """wait_ready() runs in a thread while the block runs; the close() that follows must
    make it say False at once."""
    answers: list[bool] = []
    waiting = threading.Thread(target=lambda: answers.append(fwd.wait_ready(60)))
    waiting.start()
    yield
    began = time.monotonic()
    fwd.close()
    waiting.join(WAIT)
    assert answers == [False]
    assert time.monotonic() - began < 3.0


def test_close_stops_a_wait_ready_whose_probe_is_still_dialling(isolation: str) -> None:
    with blackhole() as port, \
            forward(f"http://127.0.0.1:{port}", dial_timeout=30, isolation=isolation) as fwd, \
            closed_during_wait_ready(fwd):
        time.sleep(0.5)  # the probe is in its connect(), which nothing answers


def test_close_stops_a_wait_ready_whose_other_probe_is_still_dialling(isolation: str) -> None:
    """One listener's probe is done (its upstream was reached) while another's still waits
    for the daemon's answer: a close must end that one too, not leave it to its timeout."""

    def reach_the_first_only(peer: Peer) -> None:
        if peer.read_request().get("X-Inlets-Upstream") == "127.0.0.1:1":
            peer.accept()
        peer.wait_eof()

    specs = ["127.0.0.1:0:127.0.0.1:1", "127.0.0.1:0:127.0.0.1:2"]
    with FakeDaemon(reach_the_first_only) as fake, \
            forward(fake.url, specs=specs, dial_timeout=30, isolation=isolation) as fwd, \
            closed_during_wait_ready(fwd):
        assert wait_until(lambda: len(fake.peers) == 2 and any(p.eof.is_set() for p in fake.peers),
                          WAIT)
        assert [p.eof.is_set() for p in fake.peers].count(True) == 1  # the first probe is done
