"""Keepalive (pump.py, "Keepalive"): idle tunnels ping, a silent daemon is detected."""

from __future__ import annotations

import socket
import time

import pytest

import gforward
import gforward.daemon
from tests.peers.fake_daemon import FakeDaemon, Peer, Script
from tests.peers.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, Frame
from tests.support import assert_logged, connect, echo_once, forward, local_address


def _answer_pings(pings: list[Frame]) -> Script:
    """A daemon script that pongs every ping and echoes data until the client's Close."""

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.accept()
        while True:
            frame = peer.read_frame()
            if frame.opcode == OP_PING:
                pings.append(frame)
                peer.send_frame(OP_PONG, frame.payload)
            elif frame.opcode == OP_BINARY:
                peer.send_frame(OP_BINARY, frame.payload)
            elif frame.opcode == OP_CLOSE:
                peer.close_ws()
                return

    return script


def _silent(frames: list[Frame]) -> Script:
    """A daemon script that accepts, then reads but never answers: a dead load balancer."""

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.accept()
        try:
            while True:
                frames.append(peer.read_frame())
        except (EOFError, OSError):
            pass

    return script


def test_silent_daemon_is_detected(gflog: pytest.LogCaptureFixture) -> None:
    frames: list[Frame] = []
    with FakeDaemon(_silent(frames)) as fake, forward(
        fake.url, ping_interval=0.5, ping_timeout=0.5
    ) as fwd, connect(fwd) as sock:
        began = time.monotonic()
        sock.settimeout(0.5 + 0.5 + 1)
        with pytest.raises(ConnectionResetError):  # a cut, not an end
            sock.recv(1)
        assert time.monotonic() - began < 0.5 + 0.5 + 1
    assert_logged(gflog, "no answer to a ping within 0.5 s")
    assert [f.opcode for f in frames][:1] == [OP_PING]
    assert frames[0].masked


def test_idle_tunnel_stays_up_while_pings_are_answered() -> None:
    pings: list[Frame] = []
    with FakeDaemon(_answer_pings(pings)) as fake, forward(
        fake.url, ping_interval=0.3, ping_timeout=0.3
    ) as fwd, connect(fwd) as sock:
        time.sleep(1.5)  # five intervals of silence from the client
        sock.sendall(b"still there?")
        assert sock.recv(100) == b"still there?"
    assert len(pings) >= 2


def test_traffic_from_the_daemon_counts_as_alive() -> None:
    """A daemon that streams but is slow to pong is not cut while bytes keep coming."""

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.accept()
        for _ in range(15):
            peer.send_frame(OP_BINARY, b".")
            time.sleep(0.1)
        peer.close_ws()

    with FakeDaemon(script) as fake, forward(
        fake.url, ping_interval=0.2, ping_timeout=0.2
    ) as fwd, connect(fwd) as sock:
        received = b""
        while chunk := sock.recv(100):
            received += chunk
        assert received == b"." * 15


def test_zero_interval_sends_no_ping() -> None:
    frames: list[Frame] = []
    with FakeDaemon(_silent(frames)) as fake, forward(
        fake.url, ping_interval=0
    ) as fwd, connect(fwd) as sock:
        sock.settimeout(1.0)
        with pytest.raises(socket.timeout):  # nothing happens: no ping, no cut
            sock.recv(1)
    assert all(frame.opcode != OP_PING for frame in frames)


def test_reference_daemon_answers_pings(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    with forward(daemon.url, echo_server, ping_interval=0.2, ping_timeout=0.2) as fwd, \
            connect(fwd) as sock:
        time.sleep(1.0)
        sock.sendall(b"ping-pong")
        assert sock.recv(100) == b"ping-pong"
    with forward(daemon.url, echo_server) as fwd:  # and the defaults work as well
        assert echo_once(local_address(fwd), b"x") == b"x"


@pytest.mark.parametrize("fields", [
    {"ping_interval": -1},
    {"ping_timeout": -1},
    {"ping_interval": float("nan")},
    {"ping_interval": 5, "ping_timeout": 0},
])
def test_bad_keepalive_options(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="ping_"):
        gforward.start(base_url="http://127.0.0.1:1", vm_name="v",
                       specs=["127.0.0.1:0:127.0.0.1:9"], **fields)  # type: ignore[arg-type]
