"""Faults from the daemon and from the local side, bad input, and the token.

What the refusals and stalls of the upgrade do is in test_tunnel.py; this
file takes over once the WebSocket is open.  Every daemon-side fault runs in
the same frame (`survive`): one healthy tunnel open all along, the faulty
one, then a new one, all through one forwarder.  Of each fault, it checks that:

* the local client sees EOF or a reset within dial_timeout + 2 s of it;
* the tunnel's end is logged once, with its cause;
* the other tunnels go on, and the next one works.

Run with `-s` to get the table of faults, what the client saw and how long
the tunnel took to close.  An autouse fixture keeps every log record of every
test here, at DEBUG, and fails the test if one holds the token.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gforward
import gforward.daemon
from tests.peers.fake_daemon import FakeDaemon, Peer, accept_then_echo
from tests.peers.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, Frame, encode_frame
from tests.peers.guest import Guest, echo_until_eof
from tests.peers.programs import announced, daemon_process
from tests.peers.server import reset_on_close
from tests.support import (
    APPS,
    WAIT,
    End,
    HubErrors,
    assert_secret_not_logged,
    connect,
    echo_once,
    forward,
    local_address,
    read_exact,
    read_to_eof,
    wait_until,
    watch_end,
)

TOKEN = "gf5-T0ken-n3ver-logged-4d2c"
DIAL_TIMEOUT = 1.0
BOUND = DIAL_TIMEOUT + 2.0  # the client sees the end this soon after a fault
OP_CONTINUATION = 0x0

# Rows of the closing note's table: (fault, what the client saw, seconds to close).
TABLE: list[tuple[str, str, float]] = []


@pytest.fixture(scope="module", autouse=True)
def fault_table() -> Iterator[None]:
    """Prints the table once the module's tests are done (shown with -s)."""
    yield
    if TABLE:
        print("\n\n| fault | what the client saw | time to close |\n|---|---|---|")
        for fault, seen, seconds in TABLE:
            print(f"| {fault} | {seen} | {seconds * 1000:.0f} ms |")


@pytest.fixture(autouse=True)
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record, every logger, from DEBUG up; none may hold the token."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    assert_secret_not_logged(caplog, TOKEN)


# The frame of every daemon-side fault ------------------------------------------------


class Mark:
    """When a fake daemon did the harmful thing, as time.monotonic()."""

    def __init__(self) -> None:
        self.at: float | None = None

    def __call__(self) -> None:
        self.at = time.monotonic()


def roundtrip(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(payload)
    assert read_exact(sock, len(payload)) == payload


def tunnel_name(sock: socket.socket) -> str:
    """How the forwarder's log names the tunnel of a local client socket."""
    return f"127.0.0.1:{sock.getsockname()[1]} -> "


def end_records(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    """The forwarder's records of how one tunnel ended ("closed ..." or "failed ...")."""
    return [r for r in caplog.records if r.name == "gforward" and name in r.getMessage()
            and (" closed " in r.getMessage() or " failed" in r.getMessage())]


Script = Callable[[Peer, Mark], None]


def survive(
    caplog: pytest.LogCaptureFixture,
    fault: str,
    script: Script,
    *,
    seen: str,
    cause: str | tuple[str, ...] | None,
    drive: Callable[[socket.socket], None] | None = None,
) -> End:
    """Tunnel 1 meets `script`; tunnel 0, open all along, and tunnel 2, opened after, echo.

    `drive` plays the local client of tunnel 1 up to the fault.  `cause` (one
    part or several), when given, must be in the one warning that logs the
    tunnel's end; None means a clean end, logged once at DEBUG.  Adds the
    fault's row to the table.
    """
    mark = Mark()
    with FakeDaemon(
        accept_then_echo, lambda peer: script(peer, mark), accept_then_echo
    ) as fake, forward(fake.url, token=TOKEN, dial_timeout=DIAL_TIMEOUT) as fwd, connect(
        fwd
    ) as healthy:
        roundtrip(healthy, b"before the fault")
        with connect(fwd) as sock:
            name = tunnel_name(sock)
            if drive is not None:
                drive(sock)
            end = watch_end(sock)
        roundtrip(healthy, b"after the fault")  # the other tunnel goes on
        assert echo_once(local_address(fwd), b"the next one") == b"the next one"
        healthy.shutdown(socket.SHUT_WR)
        assert read_to_eof(healthy) == b""
    # close() waited for every tunnel: their records are all in.
    assert mark.at is not None, "the fake daemon never reached its fault"
    took = end.at - mark.at
    TABLE.append((fault, end.describe(), took))
    assert end.seen == seen, f"{fault}: the client saw {end.describe()}"
    assert took <= BOUND, f"{fault}: the client saw the end {took:.2f} s after the fault"
    records = end_records(caplog, name)
    assert len(records) == 1, [r.getMessage() for r in records]
    record = records[0]
    if cause is None:
        assert record.levelno == logging.DEBUG and record.getMessage().endswith(": closed"), \
            record.getMessage()
    else:
        parts = (cause,) if isinstance(cause, str) else cause
        assert record.levelno == logging.WARNING, record.getMessage()
        assert all(p in record.getMessage() for p in parts), (parts, record.getMessage())
    loud = [r for r in caplog.records if name in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(loud) == (cause is not None), [r.getMessage() for r in loud]
    return end


def upgrade_and_greet(peer: Peer) -> None:
    """101, one data frame, and the client's answer: the tunnel is known to be open."""
    peer.read_request()
    peer.accept()
    peer.send_frame(OP_BINARY, b"hello")
    assert peer.read_frame().payload == b"ack"


def greet(sock: socket.socket) -> None:
    """The local client's half of `upgrade_and_greet`."""
    assert read_exact(sock, 5) == b"hello"
    sock.sendall(b"ack")



def wait_eof_quietly(peer: Peer) -> None:
    """Wait for the forwarder to let go of the WebSocket; it may not answer at all."""
    with contextlib.suppress(OSError):
        peer.wait_eof()


# 1. Daemon side: the connection dropped mid-stream -----------------------------------


def _drop(*, mid_frame: bool = False, rst: bool = False) -> Script:
    def script(peer: Peer, mark: Mark) -> None:
        upgrade_and_greet(peer)
        if mid_frame:
            peer.send(struct.pack("!BB", 0x82, 100) + b"0123456789")  # 10 of 100 bytes
        if rst:
            reset_on_close(peer.sock)
            mark()
            peer.sock.close()
            return
        mark()
        peer.sock.shutdown(socket.SHUT_WR)
        wait_eof_quietly(peer)

    return script


@pytest.mark.parametrize(
    ("fault", "script", "cause"),
    [
        ("daemon drops the TCP connection between frames (FIN, no Close)", _drop(),
         "WebSocket lost without a Close frame"),
        ("daemon drops the TCP connection inside a frame (FIN, no Close)", _drop(mid_frame=True),
         "WebSocket lost without a Close frame"),
        ("daemon resets the TCP connection (RST, no Close)", _drop(rst=True),
         "Connection reset by peer"),
    ],
    ids=["fin-between-frames", "fin-mid-frame", "rst"],
)
def test_daemon_drops_mid_stream(fault: str, script: Script, cause: str,
                                 logs: pytest.LogCaptureFixture) -> None:
    survive(logs, fault, script, drive=greet, seen="reset", cause=cause)


# 2. Daemon side: Close right after the upgrade --------------------------------------


def _close_after_upgrade(code: int, reason: bytes = b"", *, same_packet: bool) -> Script:
    close = encode_frame(OP_CLOSE, struct.pack("!H", code) + reason)

    def script(peer: Peer, mark: Mark) -> None:
        peer.read_request()
        mark()
        peer.accept(then=close, apart=not same_packet)
        if code in (1000, 1001):  # a clean Close is answered, cleanly
            answer = peer.read_frame()
            assert (answer.opcode, answer.masked) == (OP_CLOSE, True), answer
            assert struct.unpack("!H", answer.payload[:2])[0] in (1000, code), answer
        wait_eof_quietly(peer)

    return script


@pytest.mark.parametrize(
    ("fault", "script", "seen", "cause"),
    [
        ("Close(1000) in the same packet as the 101",
         _close_after_upgrade(1000, same_packet=True), "EOF", None),
        ("Close(1000) right after the 101", _close_after_upgrade(1000, same_packet=False),
         "EOF", None),
        ("Close(1001 going away) right after the 101",
         _close_after_upgrade(1001, same_packet=False), "EOF", None),
        ("Close(1011 'vm stopped') right after the 101",
         _close_after_upgrade(1011, b"vm stopped", same_packet=False), "reset",
         "peer closed with code 1011 'vm stopped'"),
    ],
    ids=["1000-same-packet", "1000", "1001", "1011"],
)
def test_close_right_after_the_upgrade(fault: str, script: Script, seen: str, cause: str | None,
                                       logs: pytest.LogCaptureFixture) -> None:
    survive(logs, fault, script, seen=seen, cause=cause)


# 3. Daemon side: protocol errors -----------------------------------------------------

MASK = b"\x0f\xf0\x55\xaa"
PROTOCOL_ERRORS: dict[str, tuple[bytes, int, str]] = {
    # name: (bytes after a good frame, Close code expected back, part of the logged cause)
    "RSV1 set": (b"\xc2\x02ok", 1002, "reserved bits"),
    "RSV2 set": (b"\xa2\x02ok", 1002, "reserved bits"),
    "RSV3 set": (b"\x92\x02ok", 1002, "reserved bits"),
    "unknown data opcode 0x3": (b"\x83\x02ok", 1002, "opcode"),
    "unknown data opcode 0x7": (b"\x87\x00", 1002, "opcode"),
    "unknown control opcode 0xB": (b"\x8b\x00", 1002, "opcode"),
    "unknown control opcode 0xF": (b"\x8f\x02ok", 1002, "opcode"),
    "masked server frame": (b"\x82\x82" + MASK + bytes(a ^ b for a, b in zip(b"ok", MASK)),
                            1002, "masked"),
    "ping over 125 bytes": (b"\x89\x7e\x00\x7e" + b"p" * 126, 1002, "125"),
    "fragmented ping": (b"\x09\x00", 1002, "fragmented control"),
    "continuation with no message": (b"\x80\x02ok", 1002, "continuation"),
    "new message inside a fragmented one": (b"\x01\x01a\x82\x01b", 1002, "inside"),
    "64-bit length with its top bit set": (b"\x82\x7f\x80" + bytes(7), 1002, "length"),
    "Close with a one-byte body": (b"\x88\x01\x03", 1002, "one-byte"),
    "Close with code 1005 on the wire": (b"\x88\x02\x03\xed", 1002, "1005"),
    "Close with code 999": (b"\x88\x02\x03\xe7", 1002, "999"),
    "Close reason not UTF-8": (b"\x88\x04\x03\xe8\xff\xfe", 1007, "UTF-8"),
}


def _protocol_error(bad: bytes, answers: list[int | None]) -> Script:
    def script(peer: Peer, mark: Mark) -> None:
        upgrade_and_greet(peer)
        mark()
        peer.send(bad)
        code = None
        try:
            while (frame := peer.read_frame()).opcode != OP_CLOSE:
                pass
            code = struct.unpack("!H", frame.payload[:2])[0]
        except (EOFError, OSError):
            pass
        answers.append(code)
        wait_eof_quietly(peer)

    return script


def test_bytes_before_a_protocol_error_still_arrive() -> None:
    """Valid data and a broken frame in one packet: the data reaches the client, then
    the reset.  Nothing the daemon sent properly is lost to the error after it."""
    connected = threading.Event()

    def script(peer: Peer) -> None:
        peer.read_request()
        peer.accept()
        connected.wait(WAIT)  # else the reset can reach the client inside its connect()
        peer.send(encode_frame(OP_BINARY, b"last ") + encode_frame(OP_TEXT, b"words")
                  + PROTOCOL_ERRORS["RSV1 set"][0])
        wait_eof_quietly(peer)

    with FakeDaemon(script) as fake, forward(fake.url, token=TOKEN) as fwd, connect(
        fwd
    ) as sock:
        connected.set()
        end = watch_end(sock)
    assert (end.seen, end.data) == ("reset", b"last words")


@pytest.mark.parametrize("error", list(PROTOCOL_ERRORS))
def test_protocol_error_closes_only_that_tunnel(error: str,
                                                logs: pytest.LogCaptureFixture) -> None:
    bad, code, cause = PROTOCOL_ERRORS[error]
    answers: list[int | None] = []
    survive(logs, f"protocol error: {error}", _protocol_error(bad, answers), drive=greet,
            seen="reset", cause=("protocol error", cause))
    assert answers == [code], f"Close code sent to the daemon: {answers}"


# 4. Daemon side: a frame of 2**62 bytes, then a trickle -------------------------------

TRICKLE = 20  # pieces, each read by the client before the next is sent
FLOOD = 64 << 20  # then this much more of the same frame, as fast as it goes
FLOOD_BLOCK = os.urandom(1 << 20)
HEAP_BOUND = 16 << 20  # a forwarder buffering the frame would hold all of FLOOD


def _endless_frame(peer: Peer, mark: Mark) -> None:
    peer.read_request()
    peer.accept()
    peer.send(struct.pack("!BBQ", 0x82, 127, 1 << 62))
    for i in range(TRICKLE):
        peer.send(b"%04d" % i)
        assert peer.read_frame().payload == b"got %d" % i  # it arrived inside the frame
    for _ in range(FLOOD // len(FLOOD_BLOCK)):
        peer.send(FLOOD_BLOCK)
    assert peer.read_frame().payload == b"flood read"
    mark()
    peer.sock.shutdown(socket.SHUT_WR)  # the frame never ends
    wait_eof_quietly(peer)


def test_frame_of_2_62_bytes_is_streamed_not_buffered(logs: pytest.LogCaptureFixture) -> None:
    """Each trickled piece reaches the client while the frame is still open (lockstep,
    no timing); then 64 MiB more of it pass with the heap's peak far below that."""
    peaks: list[int] = []

    def drive(sock: socket.socket) -> None:
        for i in range(TRICKLE):
            assert read_exact(sock, 4) == b"%04d" % i
            sock.sendall(b"got %d" % i)
        buffer = bytearray(1 << 20)
        crc, left = 0, FLOOD
        tracemalloc.start()
        try:
            while left:
                n = sock.recv_into(buffer, min(left, len(buffer)))
                assert n, f"EOF with {left} bytes of the flood still to come"
                crc = zlib.crc32(memoryview(buffer)[:n], crc)
                left -= n
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
        assert crc == zlib.crc32(FLOOD_BLOCK * (FLOOD // len(FLOOD_BLOCK)))
        sock.sendall(b"flood read")

    survive(logs, "frame header announcing 2**62 bytes, a trickle, then the daemon goes",
            _endless_frame, drive=drive, seen="reset",
            cause="WebSocket lost without a Close frame")
    print(f"\nheap peak while {FLOOD >> 20} MiB of one endless frame passed: "
          f"{peaks[0] / (1 << 20):.1f} MiB")
    assert peaks[0] < HEAP_BOUND, f"heap peaked at {peaks[0] >> 20} MiB during the flood"


# 5. Daemon side: pings during a transfer, fragments, text ---------------------------


def test_pings_every_100_ms_during_a_transfer_are_all_answered() -> None:
    """The fake daemon pings every 100 ms while echoing; the client keeps sending until
    five pongs are back.  Every pong carries its ping's payload, in order, masked."""
    pings: list[bytes] = []
    pongs: list[Frame] = []
    enough = threading.Event()

    def pinging_echo(peer: Peer) -> None:
        peer.read_request()
        peer.accept()
        lock, stop = threading.Lock(), threading.Event()

        def pinger() -> None:
            n = 0
            while not stop.wait(0.1):
                with lock:
                    pings.append(b"ping %d" % n)
                    peer.send_frame(OP_PING, pings[-1])
                n += 1

        thread = threading.Thread(target=pinger, daemon=True)
        thread.start()
        try:
            while (frame := peer.read_frame()).opcode != OP_CLOSE:
                if frame.opcode == OP_PONG:
                    pongs.append(frame)
                    if len(pongs) >= 5:
                        enough.set()
                    continue
                with lock:
                    peer.send_frame(frame.opcode, frame.payload)
            stop.set()
            thread.join(WAIT)
            with lock:
                peer.send_frame(OP_CLOSE, frame.payload[:2])
        finally:
            stop.set()
        peer.wait_eof()

    chunk = os.urandom(64 * 1024)
    sent, got = hashlib.sha256(), hashlib.sha256()
    with FakeDaemon(pinging_echo) as fake, forward(fake.url, token=TOKEN) as fwd, connect(
        fwd
    ) as sock:
        rounds = 0
        while not enough.is_set():
            assert rounds < 2000, f"only {len(pongs)} pongs after {rounds} round trips"
            sock.sendall(chunk)
            sent.update(chunk)
            got.update(read_exact(sock, len(chunk)))
            rounds += 1
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""
    assert got.hexdigest() == sent.hexdigest()
    assert len(pongs) >= 5
    assert [p.payload for p in pongs] == pings[: len(pongs)], "a ping went unanswered"
    assert all(p.masked and p.fin for p in pongs)


def test_fragmented_and_text_messages_arrive_byte_exact() -> None:
    """Fragments of every size class (empty, 125/126, 64 KiB boundaries), pings between
    them, text messages split inside a UTF-8 character: the payloads, in order, and
    nothing else."""
    text = "grüße, 世界, 🚀".encode()
    big = os.urandom(300_000)
    frames = [
        encode_frame(OP_BINARY, b"", fin=False),
        encode_frame(OP_CONTINUATION, b"a", fin=False),
        encode_frame(OP_PING, b"between fragments"),
        encode_frame(OP_CONTINUATION, b"b" * 125, fin=False),
        encode_frame(OP_CONTINUATION, b"c" * 126, fin=False),
        encode_frame(OP_CONTINUATION, b"d" * 65535, fin=False),
        encode_frame(OP_CONTINUATION, b"e" * 65536, fin=False),
        encode_frame(OP_CONTINUATION, big, fin=False),
        encode_frame(OP_CONTINUATION, b"", fin=True),
        encode_frame(OP_TEXT, text[:3], fin=False),  # "grü" cut inside the ü
        encode_frame(OP_CONTINUATION, text[3:20], fin=False),
        encode_frame(OP_PING, b""),
        encode_frame(OP_CONTINUATION, text[20:], fin=True),
        encode_frame(OP_TEXT, text),
        encode_frame(OP_TEXT, b""),
        encode_frame(OP_BINARY, b"end"),
    ]
    expected = (b"a" + b"b" * 125 + b"c" * 126 + b"d" * 65535 + b"e" * 65536 + big
                + text + text + b"end")
    pongs: list[bytes] = []

    def fragments(peer: Peer) -> None:
        peer.read_request()
        peer.accept()
        peer.send(b"".join(frames))
        control = [peer.read_frame(), peer.read_frame()]
        pongs.extend(f.payload for f in control if f.opcode == OP_PONG)
        peer.close_ws()
        peer.wait_eof()

    with FakeDaemon(fragments) as fake, forward(fake.url, token=TOKEN) as fwd, connect(
        fwd
    ) as sock:
        assert read_to_eof(sock) == expected
    assert pongs == [b"between fragments", b""]


# 6. Local side ------------------------------------------------------------------------


def test_client_reset_mid_transfer_ends_the_daemon_side(
    logs: pytest.LogCaptureFixture,
) -> None:
    """The client resets while both directions are busy: the fake daemon sees its
    WebSocket end within the bound, and the forwarder logs why, once."""
    ended: list[float] = []

    def busy_echo(peer: Peer) -> None:
        peer.read_request()
        peer.accept()
        try:
            while True:
                frame = peer.read_frame()
                if frame.opcode == OP_CLOSE:
                    break
                peer.send_frame(OP_BINARY, frame.payload * 4)  # more down than up
        except (EOFError, OSError):
            pass
        ended.append(time.monotonic())

    with FakeDaemon(busy_echo) as fake, forward(fake.url, token=TOKEN) as fwd:
        with connect(fwd) as sock:
            name = tunnel_name(sock)
            for _ in range(16):
                sock.sendall(os.urandom(64 * 1024))
            read_exact(sock, 64 * 1024)  # the rest stays unread: the tunnel is backed up
            reset_on_close(sock)
            reset_at = time.monotonic()
        wait_until(lambda: ended, WAIT)
    assert ended, "the daemon side never saw the tunnel end"
    took = ended[0] - reset_at
    TABLE.append(("local client resets mid-transfer (seen by the daemon)",
                  "daemon: WebSocket ended", took))
    assert took <= BOUND, f"the daemon side saw the end {took:.2f} s after the reset"
    (record,) = end_records(logs, name)
    assert record.levelno == logging.WARNING
    assert any(c in record.getMessage() for c in ("reset", "Broken pipe")), record.getMessage()


def test_client_reset_mid_transfer_ends_the_guest_connection() -> None:
    """The same through the reference daemon: the guest, busy sending, gets its error."""
    ended: list[tuple[float, str]] = []

    def flood(sock: socket.socket) -> None:
        block = os.urandom(64 * 1024)
        try:
            while True:
                sock.sendall(block)
        except OSError as exc:
            ended.append((time.monotonic(), type(exc).__name__))

    with daemon_process() as url, Guest(flood) as guest, forward(url, guest.target) as fwd:
        with connect(fwd) as sock:
            read_exact(sock, 1 << 20)
            reset_on_close(sock)
            reset_at = time.monotonic()
        wait_until(lambda: ended, WAIT)
    assert ended, "the guest never saw its connection end"
    took = ended[0][0] - reset_at
    TABLE.append(("local client resets mid-transfer (seen by the guest)",
                  f"guest: {ended[0][1]}", took))
    assert took <= BOUND, f"the guest saw the end {took:.2f} s after the reset"


def test_half_close_then_wait_for_a_slow_reply(logs: pytest.LogCaptureFixture) -> None:
    """A request, EOF, and a reply that starts a second later (well inside the
    linger): all of it arrives, then EOF, and nothing is logged as a failure."""
    request = os.urandom(200_000)
    reply = os.urandom(1 << 20)

    def slow(sock: socket.socket) -> None:
        assert read_to_eof(sock) == request
        time.sleep(1.0)
        sock.sendall(reply)

    with Guest(slow) as guest, daemon_process() as url, forward(
        url, guest.target, token=TOKEN
    ) as fwd, connect(fwd) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == reply
    assert not [r for r in logs.records if r.levelno >= logging.WARNING]


def test_guest_close_ends_the_tunnel_and_a_later_upload_is_refused(
        daemon: gforward.daemon.Daemon) -> None:
    """The guest answers and shuts its side for writing before the client is done sending
    (a server that replies early, `nc -N`).  The daemon's Close ends the tunnel, as Slicer's
    own daemon means it: the client sees the answer and EOF, and what it sends after that
    is refused with a reset or a broken pipe, never swallowed in silence."""
    upload = os.urandom(1 << 20)
    got: list[bytes] = []
    guest_done = threading.Event()

    def answer_first(sock: socket.socket) -> None:
        sock.sendall(b"answer\n")
        sock.shutdown(socket.SHUT_WR)
        try:
            got.append(read_to_eof(sock))
        finally:
            guest_done.set()

    with Guest(answer_first) as guest, forward(
        daemon.url, guest.target, token=TOKEN
    ) as fwd, connect(fwd) as sock:
        assert read_to_eof(sock) == b"answer\n"
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(64):  # until the kernel has heard of the reset
                sock.sendall(upload)
        assert guest_done.wait(WAIT)
    assert got == [b""]


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


GIB = 1 << 30
RSS_BOUND = 32 << 20


@pytest.mark.timeout(90)
def test_client_that_never_reads_while_the_guest_sends_1_gib(tmp_path: Path) -> None:
    """Backpressure, end to end: the forwarder (the command line, a process of its own)
    holds the guest back instead of buffering.  Its peak RSS stays within RSS_BOUND of
    where it started; then every byte arrives, in order.  The only clock here decides
    when to start reading, never whether the test passes."""
    block = os.urandom(1 << 20)
    progress = [0]

    def send_1_gib(sock: socket.socket) -> None:
        sock.settimeout(None)
        for _ in range(GIB // len(block)):
            sock.sendall(block)
            progress[0] += len(block)

    stderr = tmp_path / "stderr"
    env = {**os.environ, "SLICER_TOKEN": TOKEN}
    with Guest(send_1_gib) as guest, daemon_process() as url, stderr.open("w") as err, announced(
        ["-m", "gforward", "--url", url, "vm", f"127.0.0.1:0:{guest.target}"], env=env,
        stderr=err,
    ) as (proc, line):
        port = int(line.split()[0].rsplit(":", 1)[1])
        baseline = _status(proc.pid)["VmRSS"]
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            last, still_since = -1, time.monotonic()
            while time.monotonic() - still_since < 1.0:  # until the guest is held back
                if progress[0] != last:
                    last, still_since = progress[0], time.monotonic()
                time.sleep(0.05)
            held_at = progress[0]
            stalled = _status(proc.pid)
            crc, received = 0, 0
            buffer = bytearray(1 << 20)
            while n := sock.recv_into(buffer):
                crc = zlib.crc32(memoryview(buffer)[:n], crc)
                received += n
        peak = _status(proc.pid)["VmHWM"]
    assert held_at < GIB // 4, f"the guest got {held_at >> 20} MiB out to a client not reading"
    assert stalled["VmRSS"] - baseline < RSS_BOUND, (baseline, stalled)
    print(f"\nforwarder RSS: {baseline / (1 << 20):.1f} MiB at start, "
          f"{stalled['VmRSS'] / (1 << 20):.1f} MiB with the guest held back at "
          f"{held_at >> 20} MiB sent, {peak / (1 << 20):.1f} MiB at its peak")
    assert peak - baseline < RSS_BOUND, f"RSS peaked {(peak - baseline) >> 20} MiB above start"
    assert received == GIB
    expected = 0
    for _ in range(GIB // len(block)):
        expected = zlib.crc32(block, expected)
    assert crc == expected, "bytes lost, doubled or reordered"
    assert TOKEN not in stderr.read_text()


# 7. Local side: accept() fails with EMFILE -------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


EMFILE_PERIOD = 2.0  # seconds the app spends out of descriptors, with a client waiting
EMFILE_CPU = 0.5  # CPU seconds it may use meanwhile (a spinning accept loop uses ~2)


@pytest.fixture(scope="module")
def emfile_run() -> Iterator[dict[str, Any]]:
    """tests/apps/emfile.py with room for two tunnels, and a third client waiting.

    Runs once for the tests below; yields what was seen.
    """
    seen: dict[str, Any] = {}
    with daemon_process() as url, Guest(echo_until_eof) as guest, tempfile.TemporaryFile(
        "w+"
    ) as err:
        proc = subprocess.Popen(
            [sys.executable, str(APPS / "emfile.py"), url, guest.target],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
            env={**os.environ, "SLICER_TOKEN": TOKEN}, cwd=str(APPS.parent.parent),
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            port = json.loads(proc.stdout.readline())["port"]
            address = ("127.0.0.1", port)
            # One at a time: accepted together, they would all be accepted before any dials.
            first = socket.create_connection(address, timeout=WAIT)
            roundtrip(first, b"1")
            second = socket.create_connection(address, timeout=WAIT)
            roundtrip(second, b"2")
            third = socket.create_connection(address, timeout=WAIT)  # the backlog takes it
            try:
                third.sendall(b"3")
                deadline = time.monotonic() + WAIT
                while "Too many open files" not in _read(err):
                    assert time.monotonic() < deadline, "accept() never failed: " + _read(err)
                    time.sleep(0.05)
                cpu = _cpu_seconds(proc.pid)
                time.sleep(EMFILE_PERIOD)
                seen["cpu"] = _cpu_seconds(proc.pid) - cpu
                first.shutdown(socket.SHUT_WR)  # its tunnel ends: two descriptors free
                assert read_to_eof(first) == b""
                freed = time.monotonic()
                seen["third"] = read_exact(third, 1)
                seen["recovery"] = time.monotonic() - freed
                roundtrip(second, b"still 2")
                for sock in (second, third):
                    sock.shutdown(socket.SHUT_WR)
                    assert read_to_eof(sock) == b""
            finally:
                for sock in (first, second, third):
                    sock.close()
            seen["fourth"] = echo_once(address, b"4")
            proc.stdin.close()
            seen["closed"] = proc.stdout.read()
            seen["status"] = proc.wait(WAIT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        seen["stderr"] = _read(err)
    yield seen


def _read(file: Any) -> str:
    file.seek(0)
    return str(file.read())


def test_emfile_listener_backs_off_and_serves_again(emfile_run: dict[str, Any]) -> None:
    run = emfile_run
    assert run["status"] == 0 and run["closed"] == "closed\n", run
    assert run["cpu"] < EMFILE_CPU, f"{run['cpu']:.2f} CPU s in {EMFILE_PERIOD:g} s without fds"
    assert run["third"] == b"3", "the waiting client was never served"
    assert run["recovery"] < 1.0 + BOUND, f"served {run['recovery']:.1f} s after fds freed up"
    assert run["fourth"] == b"4"
    assert TOKEN not in run["stderr"]
    TABLE.append(("accept() fails with EMFILE; a tunnel ends and frees two fds",
                  "the waiting client is served", run["recovery"]))


def test_emfile_is_logged_through_the_forwarder_logger(emfile_run: dict[str, Any]) -> None:
    lines = emfile_run["stderr"].splitlines()
    logged = [line for line in lines if line.startswith("WARNING gforward")
              and "Too many open files" in line]
    assert logged, "no gforward warning about the failed accept()"
    assert "Traceback" not in emfile_run["stderr"]


# 8. Bad input: random bytes after the 101 ----------------------------------------------


@st.composite
def _frames(draw: st.DrawFn) -> bytes:
    """A frame with random header bits, any opcode, masked or not, length encoded any way."""
    b0 = draw(st.integers(0, 255))
    payload = draw(st.binary(max_size=140))
    masked = draw(st.booleans())
    form = draw(st.sampled_from([7, 16, 64]))
    n = len(payload)
    if form == 7 and n < 126:
        head = struct.pack("!BB", b0, n | (0x80 if masked else 0))
    elif form == 16 or n < 126:
        head = struct.pack("!BBH", b0, 126 | (0x80 if masked else 0), n)
    else:
        head = struct.pack("!BBQ", b0, 127 | (0x80 if masked else 0), n)
    return head + (MASK + bytes(a ^ MASK[i % 4] for i, a in enumerate(payload))
                   if masked else payload)


_GARBAGE = st.one_of(
    st.binary(max_size=300),
    st.lists(st.one_of(_frames(), st.binary(max_size=20)), max_size=6).map(b"".join),
    st.lists(_frames(), max_size=4).map(lambda fs: b"".join(fs) + encode_frame(OP_CLOSE, b"")),
)


@pytest.mark.timeout(120)
def test_random_bytes_after_the_101_never_escape_a_tunnel_greenlet() -> None:
    """Whatever follows a valid 101, each tunnel ends (the daemon hangs up after its
    garbage) without an exception reaching the hub, and its end is logged once."""
    garbage_queue: list[bytes] = []
    ends = threading.Semaphore(0)

    class Counter(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if " closed " in message or " failed" in message:
                ends.release()

    logger = logging.getLogger(f"tests.faults.{os.urandom(4).hex()}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(Counter())

    def send_garbage(peer: Peer) -> None:
        peer.read_request()
        peer.accept()
        peer.send(garbage_queue.pop(0))
        peer.sock.shutdown(socket.SHUT_WR)
        wait_eof_quietly(peer)

    with HubErrors() as hub, FakeDaemon(send_garbage) as fake, forward(
        fake.url, token=TOKEN, logger=logger
    ) as fwd:

        @settings(max_examples=150, deadline=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(_GARBAGE)
        def tunnel_survives(garbage: bytes) -> None:
            garbage_queue.append(garbage)
            try:
                with connect(fwd) as sock:
                    with contextlib.suppress(OSError):
                        sock.sendall(b"client bytes")
                    watch_end(sock)
            except ConnectionResetError:
                pass  # the tunnel was over before connect() returned
            deadline = time.monotonic() + WAIT
            while not ends.acquire(timeout=0.05) and not hub.errors:
                assert time.monotonic() < deadline, "the tunnel's end was never logged"
            assert not hub.errors, hub.errors

        tunnel_survives()


# 9. Secrets, and unix socket files -----------------------------------------------------


def test_token_reflected_in_a_refusal_body_is_not_logged(
    logs: pytest.LogCaptureFixture,
) -> None:
    def reflect(peer: Peer) -> None:
        request = peer.read_request()
        body = f"denied: Authorization: {request.get('Authorization')}\n".encode()
        peer.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        peer.wait_eof()

    with FakeDaemon(reflect) as fake, forward(fake.url, token=TOKEN) as fwd, connect(
        fwd
    ) as sock:
        watch_end(sock)
    assert any("403 Forbidden" in r.getMessage() for r in logs.records)
    texts = [logging.Formatter().format(r) for r in logs.records]
    assert not [t for t in texts if TOKEN in t], texts


@pytest.mark.parametrize("kind", ["symlink to a stale socket", "symlink to a file", "fifo"])
def test_unix_listener_refuses_what_is_not_a_socket_and_leaves_it(
    kind: str, short_tmp: str
) -> None:
    """Only socket files are ever removed: a link (even to a socket) or a FIFO at the
    path makes start() fail and stays as it was, and so does what a link points to."""
    path = os.path.join(short_tmp, "fwd.sock")
    target = os.path.join(short_tmp, "target")
    if kind == "fifo":
        os.mkfifo(path)
    else:
        if kind == "symlink to a stale socket":
            with socket.socket(socket.AF_UNIX) as stale:
                stale.bind(target)
        else:
            Path(target).write_text("keep me")
        os.symlink(target, path)
    before = {p: os.lstat(p) for p in (path, target) if os.path.lexists(p)}
    with pytest.raises(gforward.ForwardError, match="not a socket"):
        gforward.start(base_url="http://127.0.0.1:9", vm_name="v", specs=[f"{path}:127.0.0.1:9"])
    for p, st_before in before.items():
        st_after = os.lstat(p)
        assert (st_after.st_ino, st_after.st_mode) == (st_before.st_ino, st_before.st_mode), p


def test_unix_listener_and_its_new_directory_are_private(short_tmp: str) -> None:
    """Under a umask of 0 the socket and the directory made for it are still closed to
    group and others."""
    path = os.path.join(short_tmp, "made", "fwd.sock")
    old = os.umask(0)
    try:
        fwd = gforward.start(base_url="http://127.0.0.1:9", vm_name="v",
                             specs=[f"{path}:127.0.0.1:9"])
    finally:
        os.umask(old)
    with fwd:
        for p in (path, os.path.dirname(path)):
            assert stat.S_IMODE(os.lstat(p).st_mode) & 0o077 == 0, (p, oct(os.lstat(p).st_mode))
    assert not os.path.lexists(path)


def test_symlink_that_replaced_our_socket_is_left_at_close(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "fwd.sock")
    target = os.path.join(short_tmp, "elsewhere")
    Path(target).write_text("keep me")
    fwd = gforward.start(base_url="http://127.0.0.1:9", vm_name="v",
                         specs=[f"{path}:127.0.0.1:9"])
    try:
        os.unlink(path)
        os.symlink(target, path)
    finally:
        fwd.close()
    assert os.path.islink(path) and Path(target).read_text() == "keep me"
