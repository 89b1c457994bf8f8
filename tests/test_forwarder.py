"""gforward.start() and Forwarder, through the reference daemon: the library's API.

Options and their validation, listeners and data in all four listen x
upstream combinations, close()/wait() from several threads, many tunnels at
once, logging, backpressure, and whole apps (plain and gevent-patched) run
as subprocesses from tests/apps/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest

import gforward
import gforward.daemon
import gforward.dial
import gforward.opener
import gforward.proto.handshake
import gforward.service
from gforward.proto.tunnel import Tunnel
from tests.peers.fake_daemon import FakeDaemon, Peer
from tests.peers.frames import OP_BINARY, encode_frame
from tests.support import (
    APPS,
    BOTH_DIALS,
    HubErrors,
    bug,
    can_bind,
    closed_port,
    connect,
    echo_once,
    forward,
    free_port,
    ipv6_loopback,
    local_address,
    read_exact,
    refused,
)

PAYLOAD = os.urandom(256 * 1024)
WAIT = 15.0  # how long a client socket here blocks at the most, unless a test says otherwise


def run_app(script: str, *args: str, timeout: float = 45) -> subprocess.CompletedProcess[str]:
    """Run a tests/apps script with this interpreter, which must exit 0; killed if it
    outlives `timeout`."""
    result = subprocess.run(
        [sys.executable, str(APPS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(APPS.parent.parent),
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def fwd_for(daemon: gforward.daemon.Daemon) -> Iterator[Any]:
    """start() with the daemon's URL filled in; every forwarder made is closed afterwards."""
    made: list[gforward.Forwarder] = []

    def start(*specs: str, **fields: Any) -> gforward.Forwarder:
        fields.setdefault("base_url", daemon.url)
        fields.setdefault("vm_name", "sbox-1")
        fwd = gforward.start(specs=list(specs), **fields)
        made.append(fwd)
        return fwd

    yield start
    for fwd in made:
        fwd.close()


# Options ---------------------------------------------------------------------------------


def test_start_with_options(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    options = gforward.Options(base_url=daemon.url, vm_name="sbox-1",
                               specs=[f"127.0.0.1:0:{echo_server}"])
    with gforward.start(options) as fwd:
        assert isinstance(fwd, gforward.Forwarder)
        assert echo_once(local_address(fwd), PAYLOAD) == PAYLOAD


def test_start_with_keywords(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    with gforward.start(base_url=daemon.url, vm_name="sbox-1", token="",
                        specs=[f"127.0.0.1:0:{echo_server}"], dial_timeout=5) as fwd:
        assert echo_once(local_address(fwd), PAYLOAD) == PAYLOAD


def test_keywords_override_options(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    # Every field the Options got wrong is put right by a keyword.
    options = gforward.Options(base_url="ftp://nowhere", vm_name="",
                               specs=["not a spec"], dial_timeout=-1)
    good = f"127.0.0.1:0:{echo_server}"
    with gforward.start(options, base_url=daemon.url, vm_name="sbox-2", specs=[good],
                        dial_timeout=5) as fwd:
        assert [listener.spec for listener in fwd.listeners] == [good]
        assert echo_once(local_address(fwd), PAYLOAD) == PAYLOAD
    assert options.specs == ["not a spec"], "start() changed the caller's Options"
    assert options.vm_name == ""


def test_keyword_override_wins_over_a_valid_option(
    daemon: gforward.daemon.Daemon, echo_server: str
) -> None:
    port = free_port()
    options = gforward.Options(base_url=daemon.url, vm_name="sbox-1",
                               specs=[f"127.0.0.1:{port}:{echo_server}"])
    with gforward.start(options, specs=[f"127.0.0.1:0:{echo_server}"]) as fwd:
        assert fwd.listeners[0].port != port
        assert can_bind(port)


def test_unknown_keyword_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        gforward.start(base_url="http://127.0.0.1:9", vm_name="v",
                       specs=["127.0.0.1:0:127.0.0.1:1"], no_such_field=1)


TOKEN = "tok-S3cr3t-9f8e7d"


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"specs": []}, id="no-specs"),
        pytest.param({"specs": "127.0.0.1:0:127.0.0.1:1"}, id="specs-as-str"),
        pytest.param({"vm_name": ""}, id="empty-vm-name"),
        pytest.param({"base_url": ""}, id="empty-base-url"),
        pytest.param({"base_url": "ftp://127.0.0.1:1"}, id="ftp-base-url"),
        pytest.param({"base_url": "http://"}, id="no-host"),
        pytest.param({"base_url": "http://127.0.0.1:port"}, id="bad-port"),
        pytest.param({"base_url": "http://127.0.0.1:70000"}, id="port-out-of-range"),
        pytest.param({"base_url": "127.0.0.1:8080"}, id="no-scheme"),
        pytest.param({"dial_timeout": 0}, id="zero-dial-timeout"),
        pytest.param({"dial_timeout": -1.5}, id="negative-dial-timeout"),
        pytest.param({"dial_timeout": float("nan")}, id="nan-dial-timeout"),
        pytest.param({"token": TOKEN + "\r\nX-Evil: 1"}, id="token-crlf"),
        pytest.param({"token": TOKEN + "\nX-Evil: 1"}, id="token-lf"),
        pytest.param({"client_id": "me\r\nX-Evil: 1"}, id="client-id-crlf"),
        pytest.param({"user_agent": "ua\r\nX-Evil: 1"}, id="user-agent-crlf"),
    ],
)
def test_invalid_options_raise_before_binding(short_tmp: str, fields: dict[str, Any]) -> None:
    port = free_port()
    sock_path = os.path.join(short_tmp, "sub", "never.sock")
    base: dict[str, Any] = {
        "base_url": "http://127.0.0.1:9",
        "vm_name": "sbox-1",
        "token": TOKEN,
        "specs": [f"127.0.0.1:{port}:127.0.0.1:9", f"{sock_path}:127.0.0.1:9"],
    }
    for how in ("options", "keywords"):
        with pytest.raises(ValueError) as info:
            if how == "options":
                gforward.start(gforward.Options(**{**base, **fields}))
            else:
                gforward.start(**{**base, **fields})
        shown = "".join(traceback.format_exception(info.type, info.value, info.tb))
        assert TOKEN not in shown, f"the token leaked into the error: {info.value}"
        assert "X-Evil" not in str(info.value)
        assert can_bind(port), "a listener was bound before the options were checked"
        assert not os.path.exists(os.path.dirname(sock_path)), "unix socket dir made"


def test_base_url_credentials_not_echoed() -> None:
    with pytest.raises(ValueError) as info:
        gforward.start(base_url="http://user:hunter2@127.0.0.1:1", vm_name="v",
                       specs=["127.0.0.1:0:127.0.0.1:1"])
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "bad",
    ["127.0.0.1:99999:127.0.0.1:80", "nonsense", "", "1:2:3:4:5", "127.0.0.1:80:127.0.0.1:x"],
)
def test_bad_spec_is_a_spec_error_quoting_it(short_tmp: str, bad: str) -> None:
    port = free_port()
    sock_path = os.path.join(short_tmp, "sub", "never.sock")
    specs = [f"127.0.0.1:{port}:127.0.0.1:9", f"{sock_path}:127.0.0.1:9", bad]
    with pytest.raises(gforward.SpecError) as info:
        gforward.start(base_url="http://127.0.0.1:9", vm_name="sbox-1", specs=specs)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, gforward.ForwardError)
    assert repr(bad) in str(info.value) or (bad and bad in str(info.value)), str(info.value)
    assert can_bind(port)
    assert not os.path.exists(os.path.dirname(sock_path))


# Listeners and data ----------------------------------------------------------------------


def test_listeners_in_spec_order(
    fwd_for: Any, echo_server: str, unix_echo_server: str, short_tmp: str
) -> None:
    fixed = free_port()
    specs = [
        f"{short_tmp}/b.sock:{unix_echo_server}",
        f"127.0.0.1:0:{echo_server}",
        f"{short_tmp}/a.sock:{echo_server}",
        f"127.0.0.1:0:{unix_echo_server}",
        f"127.0.0.1:{fixed}:{echo_server}",
    ]
    fwd = fwd_for(*specs)
    ports = [listener.port for listener in fwd.listeners]
    assert ports[0] == ports[2] == 0
    assert ports[1] > 0 and ports[3] > 0 and ports[1] != ports[3]
    assert ports[4] == fixed
    assert fwd.listeners == [
        gforward.Listener(specs[0], f"{short_tmp}/b.sock", f"unix:{unix_echo_server}", 0),
        gforward.Listener(specs[1], f"127.0.0.1:{ports[1]}", echo_server, ports[1]),
        gforward.Listener(specs[2], f"{short_tmp}/a.sock", echo_server, 0),
        gforward.Listener(specs[3], f"127.0.0.1:{ports[3]}", f"unix:{unix_echo_server}",
                          ports[3]),
        gforward.Listener(specs[4], f"127.0.0.1:{fixed}", echo_server, fixed),
    ]
    for listener in fwd.listeners:
        assert echo_once(local_address(listener), PAYLOAD[:5000]) == PAYLOAD[:5000]


@pytest.mark.parametrize("listen", ["tcp", "unix"])
@pytest.mark.parametrize("upstream", ["tcp", "unix"])
def test_data_in_every_combination(
    fwd_for: Any,
    echo_server: str,
    unix_echo_server: str,
    short_tmp: str,
    listen: str,
    upstream: str,
) -> None:
    remote = echo_server if upstream == "tcp" else unix_echo_server
    local = "127.0.0.1:0" if listen == "tcp" else os.path.join(short_tmp, "local.sock")
    fwd = fwd_for(f"{local}:{remote}")
    (listener,) = fwd.listeners
    assert listener.remote == (remote if upstream == "tcp" else f"unix:{remote}")
    assert (listener.port == 0) == (listen == "unix")
    for size in (1, 1000, len(PAYLOAD)):
        assert echo_once(local_address(listener), PAYLOAD[:size]) == PAYLOAD[:size]
    # An interactive exchange, not just send-all-then-read.
    with connect(listener, timeout=WAIT) as sock:
        for i in range(20):
            message = b"ping %d " % i * (i + 1)
            sock.sendall(message)
            assert read_exact(sock, len(message)) == message
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(1) == b""


def test_daemon_over_unix_socket(echo_server: str, short_tmp: str) -> None:
    with gforward.daemon.start(listen=(), unix=[os.path.join(short_tmp, "d.sock")]) as daemon:
        assert daemon.url.startswith("unix://")
        with gforward.start(base_url=daemon.url, vm_name="v",
                            specs=[f"127.0.0.1:0:{echo_server}"]) as fwd:
            assert echo_once(local_address(fwd), PAYLOAD) == PAYLOAD


def test_token_is_sent(echo_server: str) -> None:
    with gforward.daemon.start(token=TOKEN) as daemon:
        with gforward.start(base_url=daemon.url, token=TOKEN, vm_name="v",
                            specs=[f"127.0.0.1:0:{echo_server}"]) as fwd:
            assert echo_once(local_address(fwd), PAYLOAD) == PAYLOAD
        with gforward.start(base_url=daemon.url, token="wrong", vm_name="v",
                            specs=[f"127.0.0.1:0:{echo_server}"]) as fwd:
            assert refused(fwd, PAYLOAD)


def test_concurrent_tunnels(fwd_for: Any, echo_server: str) -> None:
    """200 tunnels open at the same time, each echoing its own random payload."""
    count = 200
    fwd = fwd_for(f"127.0.0.1:0:{echo_server}")
    listener = fwd.listeners[0]
    all_open = threading.Barrier(count, timeout=40)
    errors: list[str] = []
    ok = [0]
    lock = threading.Lock()

    def client(i: int) -> None:
        payload = os.urandom(8 * 1024 + i * 37)
        half = len(payload) // 2
        try:
            with connect(listener, timeout=40) as sock:
                sock.sendall(payload[:half])
                assert read_exact(sock, half) == payload[:half], "first half differs"
                all_open.wait()  # every tunnel is up and has carried data
                sock.sendall(payload[half:])
                sock.shutdown(socket.SHUT_WR)
                rest = b""
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    rest += data
                assert rest == payload[half:], f"second half differs ({len(rest)} bytes)"
            with lock:
                ok[0] += 1
        except BaseException as exc:
            with lock:
                errors.append(f"client {i}: {exc!r}")
            all_open.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert not errors, errors[:5]
    assert ok[0] == count


# close() and wait() ----------------------------------------------------------------------


def _port_and_socket(daemon: gforward.daemon.Daemon, upstream: str,
                     path: str) -> tuple[gforward.Forwarder, int]:
    """A forwarder (not a context manager's) listening on a free port and on `path`."""
    port = free_port()
    fwd = gforward.start(base_url=daemon.url, vm_name="v",
                         specs=[f"127.0.0.1:{port}:{upstream}", f"{path}:{upstream}"])
    return fwd, port


def test_close_is_idempotent_and_frees_everything(
    daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "x.sock")
    fwd, port = _port_and_socket(daemon, echo_server, path)
    assert echo_once(("127.0.0.1", port), PAYLOAD) == PAYLOAD
    assert not can_bind(port)
    assert fwd.wait(0) is False
    fwd.close()
    assert fwd.wait(0) is True
    assert fwd.wait() is True
    assert can_bind(port)
    assert not os.path.lexists(path)
    fwd.close()
    fwd.close()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def test_context_manager(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    port = free_port()
    with gforward.start(base_url=daemon.url, vm_name="v",
                        specs=[f"127.0.0.1:{port}:{echo_server}"]) as fwd:
        assert echo_once(("127.0.0.1", port), PAYLOAD) == PAYLOAD
        assert not fwd.wait(0)
    assert fwd.wait(0)
    assert can_bind(port)


def test_context_manager_closes_on_exception(
    daemon: gforward.daemon.Daemon, echo_server: str
) -> None:
    with pytest.raises(KeyError), gforward.start(
        base_url=daemon.url, vm_name="v", specs=[f"127.0.0.1:0:{echo_server}"]
    ) as fwd:
        raise KeyError("boom")
    assert fwd.wait(0)


def test_close_from_another_thread(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    port = free_port()
    fwd = gforward.start(base_url=daemon.url, vm_name="v",
                         specs=[f"127.0.0.1:{port}:{echo_server}"])
    seen: list[object] = []

    def closer() -> None:
        fwd.close()
        seen.extend([fwd.wait(0), can_bind(port)])

    thread = threading.Thread(target=closer)
    thread.start()
    thread.join(15)
    assert not thread.is_alive(), "close() from another thread did not return"
    assert seen == [True, True]
    assert fwd.wait(5)
    fwd.close()


def test_wait_from_a_third_thread(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    fwd = gforward.start(base_url=daemon.url, vm_name="v", specs=[f"127.0.0.1:0:{echo_server}"])
    try:
        results: list[bool] = []
        waiter = threading.Thread(target=lambda: results.append(fwd.wait(30)))
        waiter.start()
        assert fwd.wait(0.2) is False
        early: list[bool] = []
        probe = threading.Thread(target=lambda: early.append(fwd.wait(0.2)))
        probe.start()
        probe.join(10)
        assert early == [False]
        assert waiter.is_alive() and results == []
        closer = threading.Thread(target=fwd.close)
        closer.start()
        closer.join(15)
        waiter.join(15)
        assert not closer.is_alive() and not waiter.is_alive()
        assert results == [True]
        assert fwd.wait(0.2) is True
    finally:
        fwd.close()


def test_two_threads_closing_at_once(
    daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "two.sock")
    fwd, port = _port_and_socket(daemon, echo_server, path)
    # A few live tunnels, so that tearing down takes a little while.
    clients = [connect(fwd.listeners[i % 2], timeout=WAIT) for i in range(6)]
    for sock in clients:
        sock.sendall(b"x")
        assert read_exact(sock, 1) == b"x"
    go = threading.Barrier(2, timeout=10)
    states: list[tuple[bool, bool, bool]] = []
    one_probe_at_a_time = threading.Lock()  # two probes binding the port at once would clash

    def closer() -> None:
        go.wait()
        fwd.close()
        closed, leftover = fwd.wait(0), os.path.lexists(path)
        with one_probe_at_a_time:
            states.append((closed, can_bind(port), leftover))

    threads = [threading.Thread(target=closer) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        assert not any(thread.is_alive() for thread in threads)
        # (closed, port free again, socket file left) as each thread saw it after close()
        assert states == [(True, True, False)] * 2, states
    finally:
        for sock in clients:
            sock.close()
        fwd.close()


class CloseOnTunnelEnd(logging.Handler):
    """Calls fwd.close() when a tunnel's end is logged (in the hub, from that tunnel's own
    greenlet), as an app that stops at the first closed tunnel might; notes how long it took."""

    def __init__(self, fwd: gforward.Forwarder) -> None:
        super().__init__(logging.DEBUG)
        self.fwd = fwd
        self.took: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "closed (" in record.getMessage():
            began = time.monotonic()
            self.fwd.close()
            self.took.append(time.monotonic() - began)


def test_close_from_a_tunnel_while_another_thread_closes(
    daemon: gforward.daemon.Daemon, echo_server: str, log: tuple[logging.Logger, ListHandler]
) -> None:
    """Neither close() waits for the other: the tunnel's close() returns once the rest is
    closed, and the thread's close() does not wait JOIN_TIMEOUT for that tunnel (nor kill it)."""
    logger, handler = log
    fwd = gforward.start(base_url=daemon.url, vm_name="v", specs=[f"127.0.0.1:0:{echo_server}"],
                         logger=logger)
    closing = CloseOnTunnelEnd(fwd)
    logger.addHandler(closing)
    try:
        with connect(fwd, timeout=WAIT) as sock:
            sock.sendall(b"x")
            assert read_exact(sock, 1) == b"x"  # the tunnel is open
            began = time.monotonic()
            fwd.close()
            took = time.monotonic() - began
        assert took < gforward.service.JOIN_TIMEOUT / 2, took
        assert len(closing.took) == 1, closing.took
        assert closing.took[0] < gforward.service.JOIN_TIMEOUT / 2, closing.took
        assert "did not end in time" not in handler.text()
    finally:
        logger.removeHandler(closing)
        fwd.close()


def test_close_ends_busy_tunnels(fwd_for: Any, echo_server: str) -> None:
    fwd = fwd_for(f"127.0.0.1:0:{echo_server}")
    listener = fwd.listeners[0]
    clients = 5
    chunk = os.urandom(64 * 1024)
    stop = threading.Event()
    flowing = threading.Barrier(clients + 1, timeout=20)
    outcomes: dict[int, tuple[str, float]] = {}
    socks = [connect(listener, timeout=20) for _ in range(clients)]

    def writer(sock: socket.socket) -> None:
        try:
            while not stop.is_set():
                sock.sendall(chunk)
        except OSError:
            pass

    def reader(i: int, sock: socket.socket) -> None:
        got, passed = 0, False
        try:
            while True:
                data = sock.recv(256 * 1024)
                if not data:
                    outcomes[i] = ("eof", time.monotonic())
                    return
                got += len(data)
                if got >= 4 * len(chunk) and not passed:
                    passed = True
                    flowing.wait()
        except socket.timeout:
            outcomes[i] = ("timeout", time.monotonic())
        except OSError as exc:
            outcomes[i] = (f"reset ({exc.__class__.__name__})", time.monotonic())
        except threading.BrokenBarrierError:
            outcomes[i] = ("never flowed", time.monotonic())

    threads = [threading.Thread(target=writer, args=(s,), daemon=True) for s in socks]
    threads += [threading.Thread(target=reader, args=(i, s), daemon=True)
                for i, s in enumerate(socks)]
    try:
        for thread in threads:
            thread.start()
        flowing.wait()  # every client has had data echoed through the tunnel
        began = time.monotonic()
        fwd.close()
        took = time.monotonic() - began
        assert took < 2.5, f"close() took {took:.1f} s with busy tunnels"
        for thread in threads[clients:]:
            thread.join(10)
        assert sorted(outcomes) == list(range(clients)), outcomes
        for kind, when in outcomes.values():
            assert kind == "eof" or kind.startswith("reset"), outcomes
            assert when - began < 6, f"client saw the end {when - began:.1f} s after close()"
    finally:
        stop.set()
        for sock in socks:
            sock.close()
        for thread in threads:
            thread.join(10)


def test_close_ends_a_tunnel_that_is_still_dialling(echo_server: str) -> None:
    # A "daemon" that accepts and never answers: the tunnel hangs in the upgrade.
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        url = f"http://127.0.0.1:{mute.getsockname()[1]}"
        fwd = gforward.start(base_url=url, vm_name="v", dial_timeout=30,
                             specs=[f"127.0.0.1:0:{echo_server}"])
        with connect(fwd.listeners[0], timeout=WAIT) as client:
            mute.settimeout(10)
            accepted, _ = mute.accept()  # the tunnel's dial reached us
            with accepted:
                began = time.monotonic()
                fwd.close()
                assert time.monotonic() - began < 4
                with contextlib.suppress(ConnectionResetError):
                    assert client.recv(1) == b""



@BOTH_DIALS
def test_dial_timeout_bounds_a_silent_daemon(
    host: str, log: tuple[logging.Logger, ListHandler], echo_server: str
) -> None:
    logger, handler = log
    with socket.socket() as mute:  # accepts (backlog) and never answers the upgrade
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        url = f"http://{host}:{mute.getsockname()[1]}"
        with gforward.start(base_url=url, vm_name="v", dial_timeout=0.5, logger=logger,
                            specs=[f"127.0.0.1:0:{echo_server}"]) as fwd:
            began = time.monotonic()
            assert refused(fwd)
            assert time.monotonic() - began < 10, "dial_timeout=0.5 did not end the tunnel"
            handler.find(logging.WARNING, "failed", f"no answer from {url} within 0.5 s")
            stats = fwd.stats()  # counted before the client saw the end
            assert (stats.tunnels_open, stats.failures) == (0, {"timeout": 1})


@BOTH_DIALS
def test_a_bug_while_a_tunnel_opens_ends_that_tunnel_only(
    host: str, log: tuple[logging.Logger, ListHandler], echo_server: str,
    daemon: gforward.daemon.Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pump that cannot be made (a bug, injected here): that client sees the end, the
    tunnel counts as failed ("internal") with a traceback logged, and the next one works."""
    logger, handler = log
    with forward(daemon.url.replace("127.0.0.1", host), echo_server, logger=logger) as fwd:
        with monkeypatch.context() as patched:
            patched.setattr(gforward.dial, "open_pump", bug("no pump today"))
            assert refused(fwd)
        record = handler.find(logging.ERROR, "failed")
        assert record.exc_info is not None and "no pump today" in str(record.exc_info[1])
        assert echo_once(local_address(fwd), b"next") == b"next"
        stats = fwd.stats()
    assert (stats.tunnels_failed, stats.failures) == (1, {"internal": 1})


@BOTH_DIALS
def test_a_bug_before_a_tunnel_dials_ends_that_tunnel_only(
    host: str, log: tuple[logging.Logger, ListHandler], echo_server: str,
    daemon: gforward.daemon.Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the accept itself, before any dial (injected here): the client sees the
    end, the tunnel is counted failed ("internal") and no longer open, its traceback is
    logged, nothing reaches the hub, and the next tunnel works."""
    logger, handler = log
    with HubErrors() as hub, forward(daemon.url.replace("127.0.0.1", host), echo_server,
                                     logger=logger) as fwd:
        with monkeypatch.context() as patched:
            patched.setattr(gforward.proto.handshake.Upgrade, "handshake",
                            bug("no handshake today"))
            assert refused(fwd)
        record = handler.find(logging.ERROR, "failed")
        assert record.exc_info is not None and "no handshake today" in str(record.exc_info[1])
        stats = fwd.stats()
        assert (stats.tunnels_open, stats.tunnels_failed, stats.failures) == (
            0, 1, {"internal": 1})
        assert echo_once(local_address(fwd), b"next") == b"next"
    assert not hub.errors, hub.errors


@pytest.mark.parametrize("daemon", ["missing unix socket", "closed port"])
def test_a_bug_in_making_a_dial_error_counts_the_tunnel_once(
    daemon: str, short_tmp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event-driven dial fails and its error cannot be made (a bug, injected here), at
    once or from a watcher: the client sees the end, and past the dial's timeout the tunnel
    is still counted once, failed "internal", not open, with nothing in the hub."""
    monkeypatch.setattr(gforward.opener, "failure", bug("no error today"))
    url = (f"unix://{os.path.join(short_tmp, 'nobody.sock')}" if daemon == "missing unix socket"
           else f"http://127.0.0.1:{closed_port()}")
    with HubErrors() as hub, forward(url, dial_timeout=0.3) as fwd:
        assert refused(fwd)
        time.sleep(0.3 + 0.5)  # past the dial's timeout: a timer left running ends it again
        stats = fwd.stats()
    assert (stats.tunnels_open, stats.tunnels_failed, stats.failures) == (0, 1, {"internal": 1})
    assert not hub.errors, hub.errors


@BOTH_DIALS
def test_a_bug_with_the_frames_read_along_with_the_101_ends_that_tunnel_only(
    host: str, log: tuple[logging.Logger, ListHandler], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pump's first step, the frames that came with the 101, meets a bug (injected
    here): the tunnel counts as failed ("internal"), its traceback is logged, the client
    sees the end, and nothing reaches the hub."""
    logger, handler = log

    def early_frame(peer: Peer) -> None:
        peer.read_request()
        peer.accept(then=encode_frame(OP_BINARY, b"early"))
        peer.wait_eof()

    monkeypatch.setattr(Tunnel, "ws_data", bug("cannot read frames today"))
    with HubErrors() as hub, FakeDaemon(early_frame) as fake:
        url = fake.url.replace("127.0.0.1", host)
        with gforward.start(base_url=url, vm_name="v", logger=logger,
                            specs=["127.0.0.1:0:127.0.0.1:9"]) as fwd:
            assert refused(fwd)
            record = handler.find(logging.ERROR, "closed")
            assert record.exc_info is not None
            assert "cannot read frames today" in str(record.exc_info[1])
            stats = fwd.stats()
    assert (stats.tunnels_failed, stats.failures) == (1, {"internal": 1})
    assert not hub.errors, hub.errors


# Logging ---------------------------------------------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self.lock_:
            self.records.append(record)

    def find(self, level: int, *parts: str, timeout: float = 10.0) -> logging.LogRecord:
        deadline = time.monotonic() + timeout
        while True:
            with self.lock_:
                for record in self.records:
                    message = record.getMessage()
                    if record.levelno == level and all(p in message for p in parts):
                        return record
            if time.monotonic() > deadline:
                shown = [f"{r.levelname} {r.getMessage()}" for r in self.records]
                raise AssertionError(f"no {logging.getLevelName(level)} record with {parts}: "
                                     f"{shown}")
            time.sleep(0.05)

    def text(self) -> str:
        with self.lock_:
            return "\n".join(self.format(r) + repr(r.args) for r in self.records)


@pytest.fixture
def log() -> Iterator[tuple[logging.Logger, ListHandler]]:
    logger = logging.getLogger(f"tests.forwarder.{os.urandom(4).hex()}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = ListHandler()
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)


def test_logging(log: tuple[logging.Logger, ListHandler], echo_server: str) -> None:
    logger, handler = log
    wrong = "tok-WR0NG-1a2b3c"
    with gforward.daemon.start(token=TOKEN) as daemon:
        with gforward.start(base_url=daemon.url, token=TOKEN, vm_name="sbox-9",
                            specs=[f"127.0.0.1:0:{echo_server}"], logger=logger) as fwd:
            listener = fwd.listeners[0]
            listening = handler.find(logging.INFO, "listening on", listener.local, timeout=0)
            assert "sbox-9" in listening.getMessage() and echo_server in listening.getMessage()
            payload = os.urandom(12345)
            assert echo_once(local_address(listener), payload) == payload
            handler.find(logging.DEBUG, "opened", echo_server)
            handler.find(logging.DEBUG, "closed", "12345 bytes up", "12345 down")

        # A daemon that cannot be reached: the tunnel's dial fails.
        url = f"http://127.0.0.1:{free_port()}"
        with gforward.start(base_url=url, token=TOKEN, vm_name="sbox-9",
                            specs=[f"127.0.0.1:0:{echo_server}"], logger=logger) as fwd:
            assert refused(fwd)
            failed = handler.find(logging.WARNING, "failed", echo_server)
            assert f"127.0.0.1:{url.rsplit(':', 1)[1]}" in failed.getMessage()

        # A wrong token: the 401 is logged, neither token is.
        with gforward.start(base_url=daemon.url, token=wrong, vm_name="sbox-9",
                            specs=[f"127.0.0.1:0:{echo_server}"], logger=logger) as fwd:
            assert refused(fwd)
            handler.find(logging.WARNING, "401")

        # The upstream cannot be dialled inside the "VM": the daemon's 502 is logged.
        with gforward.start(base_url=daemon.url, token=TOKEN, vm_name="sbox-9",
                            specs=[f"127.0.0.1:0:127.0.0.1:{free_port()}"],
                            logger=logger) as fwd:
            assert refused(fwd)
            handler.find(logging.WARNING, "502")
    text = handler.text()
    assert TOKEN not in text
    assert wrong not in text
    assert "Bearer" not in text
    assert {r.levelno for r in handler.records} >= {logging.DEBUG, logging.INFO, logging.WARNING}


def test_default_logger_is_gforward(
    daemon: gforward.daemon.Daemon, echo_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gforward"), gforward.start(
        base_url=daemon.url, vm_name="v", specs=[f"127.0.0.1:0:{echo_server}"]
    ) as fwd:
        local = fwd.listeners[0].local
    assert any(r.name == "gforward" and "listening on" in r.getMessage() and local in
               r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("everywhere", ["0.0.0.0", "[::]"])
def test_a_listener_on_every_interface_is_warned_of_once(
    log: tuple[logging.Logger, ListHandler], everywhere: str
) -> None:
    if everywhere == "[::]" and not ipv6_loopback():
        pytest.skip("no IPv6 on this machine")
    logger, handler = log
    specs = [f"{everywhere}:0:127.0.0.1:1", "127.0.0.1:0:127.0.0.1:2", "0:127.0.0.1:3"]
    # Nothing connects to these listeners, so nothing is ever dialled.
    with gforward.start(base_url=f"http://127.0.0.1:{closed_port()}", vm_name="sbox-3",
                        specs=specs, logger=logger) as fwd:
        exposed = [fwd.listeners[0].local, fwd.listeners[2].local]
        warnings = [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    for local, warning in zip(exposed, warnings):
        assert "all interfaces" in warning and local in warning and "sbox-3" in warning


SILENT_UNTIL_CONFIGURED = """
import logging, socket, sys
import gforward, gforward.daemon

def refused_tunnel(fwd):
    with socket.create_connection(("127.0.0.1", fwd.listeners[0].port), timeout=10) as sock:
        try:
            assert sock.recv(1) == b""  # the warning is logged before the local close
        except ConnectionResetError:
            pass

with gforward.daemon.start(token="right") as daemon, gforward.start(
        base_url=daemon.url, token="wrong", vm_name="v", specs=["127.0.0.1:0:127.0.0.1:9"]) as fwd:
    refused_tunnel(fwd)
    logging.getLogger("gforward.daemon").warning("a daemon warning")
    print("-- logging configured --", file=sys.stderr, flush=True)
    logging.basicConfig(format="%(name)s: %(message)s")
    refused_tunnel(fwd)
    logging.getLogger("gforward.daemon").warning("a daemon warning")
"""


def test_silent_until_the_app_configures_logging() -> None:
    """No logging configured: not a line on stderr, from gforward or gforward.daemon (logging
    would otherwise print warnings through its last-resort handler); once configured, both."""
    result = subprocess.run([sys.executable, "-c", SILENT_UNTIL_CONFIGURED], capture_output=True,
                            text=True, timeout=30, cwd=str(APPS.parent.parent), check=False)
    assert result.returncode == 0, result.stderr
    before, marker, after = result.stderr.partition("-- logging configured --\n")
    assert marker and before == "", result.stderr
    assert "gforward: tunnel" in after and "failed" in after and "401" in after, after
    assert "gforward.daemon: a daemon warning" in after, after


# Whole apps, as subprocesses -------------------------------------------------------------


def _fetch_app(script: str, *, patched: bool, fetched: str) -> None:
    """plain_fetch.py or gevent_fetch.py: five pages through a forwarder, then closed."""
    result = run_app(script)
    lines = result.stdout.splitlines()
    assert lines[0] == f"patched: {patched}"
    assert fetched in lines[1] and "status 200" in lines[1]
    assert lines[-2:] == ["forwarder closed", "ok"]
    assert "Traceback" not in result.stderr, result.stderr


def test_app_plain_process() -> None:
    _fetch_app("plain_fetch.py", patched=False, fetched="fetched 5 pages")


def test_app_gevent_patched_process() -> None:
    _fetch_app("gevent_fetch.py", patched=True, fetched="fetched 5 pages concurrently")


def test_gevent_close_from_the_starting_greenlet() -> None:
    result = run_app("gevent_other_greenlet.py", "same", timeout=30)
    assert result.stdout.splitlines()[-1] == "ok"


@pytest.mark.parametrize("scenario", ["close", "wait"])
def test_gevent_close_or_wait_from_another_greenlet(scenario: str) -> None:
    result = run_app("gevent_other_greenlet.py", scenario, timeout=30)
    assert result.stdout.splitlines()[-1] == "ok"


def test_close_from_a_logging_handler_in_the_hub() -> None:
    result = run_app("close_in_hub.py", timeout=30)
    assert "close() returned" in result.stdout


def test_backpressure_does_not_buffer_in_memory() -> None:
    """A client that never reads while the guest sends 128 MiB: the heap stays small.

    No timing: the script waits until the guest makes no progress (the kernel
    buffers along the way hold some 10-30 MiB here), measures the Python heap
    with tracemalloc, then reads everything.  128 MiB leaves room for bigger
    socket buffers elsewhere (tcp_rmem max is 32 MiB on this machine).
    """
    result = run_app("backpressure.py", "128", timeout=50)
    report = json.loads(result.stdout.splitlines()[-1])
    mib = 1024 * 1024
    assert report["guest_finished_unread"] is False, report
    assert report["stalled_at"] < report["total"], report
    assert report["heap_peak_stalled"] < 16 * mib, report
    assert report["heap_peak_total"] < 16 * mib, report
    assert report["received"] == report["total"], report
    assert report["wrong_bytes"] == 0, report


def test_options_is_a_dataclass_with_defaults() -> None:
    options = gforward.Options(base_url="http://127.0.0.1:1", vm_name="v", specs=["1:127.0.0.1:1"])
    assert dataclasses.is_dataclass(options)
    assert (options.token, options.client_id, options.user_agent) == ("", None, None)
    assert options.dial_timeout == 10.0 and options.logger is None
