"""Dialling: several addresses raced as RFC 8305 says, lookups shared, no socket left behind.

A blackholed address is a loopback port that drops SYNs (tests.support.blackhole),
so nothing here leaves the machine; names resolve through a hosts-style file the
test writes (tests/resolver.py), in the programs under test, or through a resolver
installed on this thread's hub for the length of a test.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import gevent
import pytest

import gforward.daemon
from gforward import dial
from gforward.proto.endpoint import parse_base_url
from tests.peers.programs import Programs
from tests.resolver import Scripted
from tests.support import (
    MARGIN,
    announced_listeners,
    assert_closed_within,
    blackhole,
    closed_port,
    gforward_cli,
    http_get,
    ipv6_loopback,
    resolver_env,
)

V4, V6 = socket.AF_INET, socket.AF_INET6
DELAY = dial.ATTEMPT_DELAY


def v4(port: int) -> dial.Address:
    return (V4, ("127.0.0.1", port))


def v6(port: int) -> dial.Address:
    return (V6, ("::1", port, 0, 0))


def race(addresses: list[dial.Address]) -> tuple[socket.socket, float, list[socket.socket]]:
    """connect_any() in this thread's hub: the socket, the seconds it took, every socket made."""
    made: list[socket.socket] = []
    began = time.monotonic()
    sock = dial.connect_any(addresses, made.append)
    return sock, time.monotonic() - began, made


def assert_only_open(winner: socket.socket | None, made: list[socket.socket]) -> None:
    """Every socket the dial made is closed, but the one it returned."""
    assert made, "the dial made no socket"
    for sock in made:
        assert (sock.fileno() != -1) == (sock is winner), sock


@pytest.fixture
def server() -> Iterator[int]:
    """A loopback port that accepts (the kernel completes the handshake; nobody reads)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


def test_a_dialled_socket_has_nagle_off(server: int) -> None:
    sock, _, _ = race([v4(server)])
    with sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_a_unix_socket_takes_set_nodelay_as_nothing_to_do() -> None:
    left, right = socket.socketpair()
    with left, right:
        dial.set_nodelay(left)  # no Nagle here: refused by the kernel, and that is fine
        left.sendall(b"x")
        assert right.recv(1) == b"x"


# The order of attempts ---------------------------------------------------------------


def test_families_take_turns_first_family_first() -> None:
    a, b, c, d, e = (v6(1), v6(2), v4(3), v4(4), v4(5))
    assert dial.interleave([a, b, c, d, e]) == [a, c, b, d, e]
    assert dial.interleave([c, d, a, b]) == [c, a, d, b]
    assert dial.interleave([c, a, c, d]) == [c, a, d]  # the same address is tried once
    assert dial.interleave([d]) == [d]


# Racing ------------------------------------------------------------------------------


def test_a_blackholed_first_address_costs_one_attempt_delay(server: int) -> None:
    with blackhole() as dead:
        sock, took, made = race([v4(dead), v4(server)])
        with sock:
            assert sock.getpeername() == ("127.0.0.1", server)
            assert DELAY * 0.9 <= took < DELAY + MARGIN
            assert_only_open(sock, made)  # the attempt at the blackhole was given up


def test_each_attempt_starts_one_delay_after_the_last(server: int) -> None:
    with blackhole() as first, blackhole() as second:
        sock, took, made = race([v4(first), v4(second), v4(server)])
        with sock:
            assert sock.getpeername() == ("127.0.0.1", server)
            assert 2 * DELAY * 0.9 <= took < 2 * DELAY + MARGIN
            assert len(made) == 3
            assert_only_open(sock, made)


def test_a_dead_ipv6_address_yields_to_ipv4(server: int) -> None:
    if not ipv6_loopback():
        pytest.skip("no IPv6 on this machine")
    with blackhole("::1") as dead:
        sock, took, made = race([v6(dead), v6(closed_port()), v4(server)])
        with sock:  # the second attempt is IPv4's, not the second IPv6 address
            assert sock.getpeername() == ("127.0.0.1", server)
            assert took < DELAY + MARGIN and len(made) == 2
            assert_only_open(sock, made)


def test_a_failed_attempt_starts_the_next_at_once(server: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dial, "ATTEMPT_DELAY", 30.0)  # waiting it out would show
    sock, took, made = race([v4(closed_port()), v4(server)])
    with sock:
        assert sock.getpeername() == ("127.0.0.1", server)
        assert took < MARGIN
        assert_only_open(sock, made)


def test_when_every_attempt_fails_the_error_is_raised_and_nothing_left_open() -> None:
    made: list[socket.socket] = []
    with pytest.raises(ConnectionRefusedError):
        dial.connect_any([v4(closed_port()), v4(closed_port())], made.append)
    assert len(made) == 2
    assert_only_open(None, made)


# Timeouts: no socket left to the garbage collector ---------------------------------------


@pytest.mark.parametrize("addresses", [1, 2], ids=["one address", "a race"])
def test_a_connect_that_times_out_closes_its_sockets(addresses: int) -> None:
    with blackhole() as first, blackhole() as second:
        made: list[socket.socket] = []
        began = time.monotonic()
        with pytest.raises(gevent.Timeout), gevent.Timeout(DELAY * 2):
            if addresses == 1:
                dial.connect("127.0.0.1", first, "", made.append)
            else:
                dial.connect_any([v4(first), v4(second)], made.append)
        assert time.monotonic() - began < DELAY * 2 + MARGIN
        assert len(made) == addresses
        assert_only_open(None, made)


# Lookups ---------------------------------------------------------------------------------


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Scripted:
    """This thread's hub resolves every name to 127.0.0.1, in 0.2 s, until the test ends."""
    scripted = Scripted("127.0.0.1", delay=0.2)
    monkeypatch.setattr(gevent.get_hub(), "resolver", scripted)
    return scripted


def test_dials_of_one_name_at_once_share_one_lookup(resolver: Scripted) -> None:
    dials = [gevent.spawn(dial.resolve, "daemon.test", 8081) for _ in range(20)]
    dials.append(gevent.spawn(dial.resolve, "other.test", 8081))
    gevent.joinall(dials, timeout=10, raise_error=True)
    assert [g.value for g in dials[:20]] == [[v4(8081)]] * 20
    assert resolver.lookups == 2
    assert dial.resolve("daemon.test", 8081) == [v4(8081)]  # done: the next dial looks again
    assert resolver.lookups == 3


def test_a_failed_lookup_fails_every_dial_that_waited_for_it(resolver: Scripted) -> None:
    resolver.answers = ("fail",)
    dials = [gevent.spawn(dial.connect, "bad.test", 80, "", lambda sock: None) for _ in range(3)]
    gevent.joinall(dials, timeout=10)
    assert all(isinstance(g.exception, socket.gaierror) for g in dials), dials
    assert resolver.lookups == 1


def test_a_dial_that_gives_up_leaves_the_lookup_to_the_next(resolver: Scripted) -> None:
    resolver.delay = 1.0
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.1):
        dial.resolve("daemon.test", 80)
    assert dial.resolve("daemon.test", 80) == [v4(80)]  # joins the lookup under way
    assert resolver.lookups == 1


def test_a_name_idna_cannot_encode_is_an_unknown_host() -> None:
    with pytest.raises(socket.gaierror):
        dial.resolve("a..b", 80)


def test_a_known_ipv6_address_keeps_its_zone() -> None:
    """A link-local daemon (http://[fe80::1%eth0]:8080) is reached through its zone's
    interface: the Opener connects to the whole address, scope id included."""
    endpoint = parse_base_url("http://[fe80::1%lo]:8080")
    assert dial.known_address(endpoint) == (
        socket.AF_INET6, ("fe80::1", 8080, 0, socket.if_nametoindex("lo")))


def test_ip_literals_are_not_looked_up(resolver: Scripted) -> None:
    assert dial.resolve("127.0.0.1", 80) == [v4(80)]
    assert dial.resolve("::1", 80) == [(V6, ("::1", 80))]
    assert resolver.lookups == 0


# Through the command line: names from a hosts file -----------------------------------------


def test_a_daemon_name_whose_first_address_is_blackholed(
    programs: Programs, http_guest: str, tmp_path: Path
) -> None:
    """daemon.test is ::1, which drops SYNs, then 127.0.0.1, where the daemon is: the
    tunnel opens one attempt delay later, well inside the dial's bound."""
    if not ipv6_loopback():
        pytest.skip("no IPv6 on this machine")
    with blackhole("::1") as port, gforward.daemon.start(listen=[f"127.0.0.1:{port}"]):
        cli = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}", "--url",
                           f"http://daemon.test:{port}", "--dial-timeout", "5",
                           env=resolver_env(tmp_path, "::1 daemon.test\n127.0.0.1 daemon.test\n"))
        [(local, _, _)] = announced_listeners(cli)
        began = time.monotonic()
        assert http_get(local, "/eyeballs") == "guest says /eyeballs"
        took = time.monotonic() - began
        assert DELAY * 0.9 <= took < DELAY + MARGIN, took
        assert cli.stop() == 0
        assert cli.stderr == ""


def test_a_hung_lookup_holds_one_thread_however_many_tunnels_wait(
    programs: Programs, tmp_path: Path
) -> None:
    """While the resolver hangs, every tunnel fails at its dial bound, and the threads of
    gevent's pool that the lookups hold stay at one."""
    cli = gforward_cli(programs, "sbox-1", "127.0.0.1:0:127.0.0.1:9", "--url",
                       "http://daemon.test:8081", "--dial-timeout", "1",
                       env=resolver_env(tmp_path, "stall daemon.test\n"))
    [(local, _, _)] = announced_listeners(cli)
    host, port = local.rsplit(":", 1)
    tasks = Path(f"/proc/{cli.popen.pid}/task")
    before = len(os.listdir(tasks))
    for count in (1, 20):  # one tunnel, then twenty at once
        clients = [socket.create_connection((host, int(port)), timeout=5) for _ in range(count)]
        for client in clients:
            with client:
                assert_closed_within(client, 1 + MARGIN)
    assert len(os.listdir(tasks)) <= before + 1
    assert cli.stop() == 0
    assert "no answer from http://daemon.test:8081 within 1 s" in cli.stderr, cli.stderr
