"""The event-driven pump (gforward.pump) with real sockets, at its edges: many frames in
one read, a slow reply after a half-close, sides that stall under keepalive, and control
frames while an upload is blocked."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import gforward
import gforward.daemon
from gforward.pump import LINGER_STALL
from tests.peers.fake_daemon import FakeDaemon, Peer
from tests.peers.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, encode_frame
from tests.peers.guest import Guest
from tests.support import connect, forward, read_exact, read_to_eof, wait_until

KEEPALIVE = {"ping_interval": 0.5, "ping_timeout": 0.5}
STALL = 4.0  # seconds a side stops reading: eight ping timeouts
BIG = 64 << 20  # more than every socket buffer on the way holds, so flow control holds it


def test_thousands_of_one_byte_frames_in_one_read_arrive_intact() -> None:
    """A chatty daemon (a TTY, log lines) batching tiny frames: more frames in one read
    than one vectored send may carry."""
    count = 5000
    expected = bytes(i % 251 for i in range(count))

    def chatty(peer: Peer) -> None:
        peer.read_request()
        peer.accept(then=b"".join(encode_frame(OP_BINARY, expected[i : i + 1])
                                  for i in range(count)))
        peer.close_ws()
        peer.wait_eof()

    with FakeDaemon(chatty) as fake, forward(fake.url) as fwd, connect(fwd) as sock:
        assert read_to_eof(sock) == expected


def digest_guest(*, stall: float = 0.0, read: int = 1 << 20, sip: float = 0.0
                 ) -> Callable[[socket.socket], None]:
    """A guest that waits `stall` seconds, reads everything, `read` bytes at most per recv
    and `sip` seconds apart, then answers with its SHA-256 in hex."""
    def handler(sock: socket.socket) -> None:
        received = hashlib.sha256()
        time.sleep(stall)
        while data := sock.recv(read):
            received.update(data)
            time.sleep(sip)
        sock.sendall(received.hexdigest().encode())

    return handler


def test_a_reply_seven_seconds_after_the_half_close_arrives_whole(
        daemon: gforward.daemon.Daemon) -> None:
    """No timer truncates a reply that is merely slow; pings meanwhile keep finding the
    daemon alive."""
    request, reply = os.urandom(100_000), os.urandom(1 << 20)

    def thinks(sock: socket.socket) -> None:
        assert read_to_eof(sock) == request
        time.sleep(7.0)
        sock.sendall(reply)

    with Guest(thinks) as guest, forward(daemon.url, guest.target, **KEEPALIVE) as fwd, \
            connect(fwd, timeout=20) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == reply


def test_a_local_reader_that_stalls_loses_nothing(daemon: gforward.daemon.Daemon) -> None:
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)

    def sends(sock: socket.socket) -> None:
        for _ in range(BIG // len(block)):
            sock.sendall(block)
            digest.update(block)

    with Guest(sends) as guest, forward(daemon.url, guest.target, **KEEPALIVE) as fwd, \
            connect(fwd, timeout=20) as sock:
        assert read_exact(sock, 1000) == block[:1000]
        time.sleep(STALL)
        rest = read_to_eof(sock)
    assert hashlib.sha256(block[:1000] + rest).hexdigest() == digest.hexdigest()


def test_a_guest_that_stalls_loses_nothing(daemon: gforward.daemon.Daemon) -> None:
    sent = hashlib.sha256()
    block = os.urandom(1 << 20)
    with Guest(digest_guest(stall=STALL)) as guest, forward(daemon.url, guest.target,
                                                    **KEEPALIVE) as fwd, \
            connect(fwd, timeout=20) as sock:
        for _ in range(BIG // len(block)):
            sock.sendall(block)
            sent.update(block)
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == sent.hexdigest().encode()


def test_a_pong_goes_out_while_an_upload_is_blocked() -> None:
    """The daemon stops reading while the client uploads, then pings and talks: its words
    still reach the client, and the Pong is not queued behind the upload."""
    upload_started = threading.Event()
    heard: list[bytes] = []
    before_pong: list[int] = []

    def blocks_then_pings(peer: Peer) -> None:
        peer.read_request()
        peer.accept()
        upload_started.wait(10)
        time.sleep(0.5)  # every buffer on the way fills: the client's sends block
        peer.send_frame(OP_PING, b"still there?")
        peer.send_frame(OP_BINARY, b"said while not reading")
        assert wait_until(lambda: heard, 10)  # the client heard it; the daemon has read nothing
        count = 0
        while (frame := peer.read_frame()).opcode != OP_PONG:
            count += len(frame.payload)
        assert frame.payload == b"still there?"
        before_pong.append(count)
        peer.close_ws()
        while peer.read_frame().opcode != OP_CLOSE:
            pass

    with FakeDaemon(blocks_then_pings) as fake, forward(fake.url) as fwd, \
            connect(fwd) as sock:
        block = os.urandom(1 << 20)
        sock.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 10
        while not heard and time.monotonic() < deadline:
            try:
                sent += sock.send(block)
                upload_started.set()
            except BlockingIOError:
                time.sleep(0.01)
            try:
                if data := sock.recv(100):
                    heard.append(data)
            except BlockingIOError:
                pass
        assert heard == [b"said while not reading"]
        sock.setblocking(True)
        sock.settimeout(10)
        read_to_eof(sock)
    assert before_pong and before_pong[0] < sent, (before_pong, sent)


def test_a_guest_that_reads_slowly_for_long_keeps_its_tunnel(
        daemon: gforward.daemon.Daemon) -> None:
    """The upload sits in kernel buffers on the way, a Ping queued behind it, and the
    guest takes it in small sips for several ping timeouts: flow control, not silence."""
    upload = os.urandom(8 << 20)
    sips = digest_guest(read=64 * 1024, sip=0.02)  # about 3 MB/s
    with Guest(sips) as guest, forward(daemon.url, guest.target, **KEEPALIVE) as fwd, \
            connect(fwd, timeout=30) as sock:
        sock.sendall(upload)
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == hashlib.sha256(upload).hexdigest().encode()
        assert fwd.stats().tunnels_failed == 0


REPLY = os.urandom(1 << 20)  # far more than the client's socket takes while it does not read


class Uploading:
    """A client whose guest answers with REPLY and half-closes at once, while the client
    keeps uploading (a server that answers early, as with 413): the WebSocket cannot carry
    that half-close, so the daemon's Close ends the tunnel and the upload is cut, which the
    uploading thread learns from a reset (`cut`)."""

    def __init__(self, fwd: gforward.Forwarder) -> None:
        self.fwd = fwd
        self.sock = connect(fwd, timeout=20)
        self.cut: list[OSError] = []
        self.uploader = threading.Thread(target=self._upload, daemon=True)
        self.uploader.start()

    @staticmethod
    def guest(sock: socket.socket) -> None:
        sock.sendall(REPLY)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 20):  # what the client sends, read and dropped
            pass

    def _upload(self) -> None:
        block = b"u" * (64 << 10)
        try:
            while True:
                self.sock.sendall(block)
        except OSError as exc:  # the reset: the upload was cut
            self.cut.append(exc)

    def lingering(self) -> bool:
        """Whether the tunnel has ended (counted) while its local socket still waits."""
        def ended() -> bool:
            stats = self.fwd.stats()
            return stats.tunnels_total == 1 and not stats.tunnels_open

        return wait_until(ended, 10) and any(door.connections for door in self.fwd._doors)

    def told_of_the_cut(self, within: float) -> bool:
        self.uploader.join(within)
        return bool(self.cut) and self.cut[0].errno in (errno.ECONNRESET, errno.EPIPE)


def test_a_reply_ended_while_the_client_still_uploads_arrives_whole_then_a_reset(
        daemon: gforward.daemon.Daemon) -> None:
    """The client, reading slowly, gets every byte of the reply before its connection
    ends, and a reset tells it that its upload was cut (whichever of its calls meets it
    first: here the sending thread's)."""
    with Guest(Uploading.guest) as guest, forward(daemon.url, guest.target) as fwd:
        client = Uploading(fwd)
        with client.sock as sock:
            received = 0
            with contextlib.suppress(ConnectionResetError):  # the reset, if the reader sees it
                while data := sock.recv(64 << 10):
                    received += len(data)
                    time.sleep(0.002)  # a slow reader: the forwarder's send queue stays full
            assert client.told_of_the_cut(20)
    assert received == len(REPLY)


def test_a_close_ends_a_tunnel_that_waits_for_its_client(
        daemon: gforward.daemon.Daemon) -> None:
    """The tunnel ended and waits for the client to acknowledge the reply (it does not
    read): the forwarder's close() cuts it at once, without waiting LINGER_STALL."""
    with Guest(Uploading.guest) as guest, forward(daemon.url, guest.target) as fwd:
        client = Uploading(fwd)
        with client.sock:
            assert client.lingering()
            fwd.close()
            assert client.told_of_the_cut(LINGER_STALL / 2)


def test_a_client_gone_while_its_tunnel_waits_is_let_go_at_once(
        daemon: gforward.daemon.Daemon) -> None:
    """The client resets its connection while the ended tunnel waits for its
    acknowledgements, which will never come: the forwarder lets go of it at once, not
    after LINGER_STALL."""
    with Guest(Uploading.guest) as guest, forward(daemon.url, guest.target) as fwd:
        client = Uploading(fwd)
        assert client.lingering()
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.sock.close()
        assert wait_until(lambda: not any(door.connections for door in fwd._doors),
                          LINGER_STALL / 2)
