"""One tunnel: bytes between a plain socket and a WebSocket, both ways.

Theory of operation
-------------------
The "plain" socket is the local connection (client role, in the forwarder)
or the upstream inside the guest (server role, in the daemon).  Two
greenlets move bytes, one per direction; the caller's greenlet runs
plain -> WebSocket and a spawned one runs WebSocket -> plain.  Each blocks
in `recv` or `sendall`, so a slow reader holds back its writer through TCP
itself: a tunnel never holds more than one read per direction.

Closing follows RFC 6455 section 7 with half-closes carried across:

* plain EOF: send Close(1000) and stop reading plain; frames still arriving
  go on to plain until the peer's Close (that is how a reply reaches a
  client that half-closed).
* peer Close, client role: answer it at once (API.md step 5) and shut plain
  for writing, so the local client sees EOF; plain is then read only to
  discard, until its EOF.
* peer Close, server role: shut plain for writing and go on sending what
  plain still says; our Close follows plain's EOF.
* Once one direction is done, the other gets `linger` seconds of silence
  before the tunnel is cut, so no tunnel outlives a peer that went quiet.
* Anything abnormal (a socket error, the WebSocket lost without a Close, a
  protocol error, a Close with an error code) ends both sides at once, the
  plain one with a reset so that its user knows the stream was cut short.
"""

from __future__ import annotations

import contextlib
import struct
import time
from typing import Callable

import gevent
from gevent import socket, ssl
from gevent.event import Event
from gevent.lock import Semaphore

from . import frames
from .frames import OP_BINARY, OP_CLOSE, OP_PONG, Buffer

CHUNK = 256 * 1024
LINGER = 5.0
_CLEAN_CODES = (frames.CLOSE_NORMAL, frames.CLOSE_GOING_AWAY, 1005)


class TunnelCut(Exception):
    """Ends a tunnel abnormally; the message is the reason logged."""


class Pump:
    """Moves one tunnel's bytes until both sides are done; see the module doc."""

    def __init__(
        self,
        plain: socket.socket,
        ws: socket.socket,
        *,
        client: bool,
        trailing: bytes = b"",
        linger: float = LINGER,
    ) -> None:
        self.plain = plain
        self.ws = ws
        self.client = client
        self.linger = linger
        self.sent = 0  # payload bytes plain -> WebSocket
        self.received = 0  # payload bytes WebSocket -> plain
        self.reason = ""  # why the tunnel ended; set once
        self.failed = False
        self._trailing = trailing
        self._write_lock = Semaphore()
        self._close_sent = False
        self._close_received = False
        self._last_plain = self._last_ws = time.monotonic()

    def run(self) -> None:
        """Pump both directions; returns once the tunnel is over and both sockets closed."""
        to_ws_done, to_plain_done = Event(), Event()
        other = gevent.spawn(
            self._direction, self._ws_to_plain, to_plain_done, to_ws_done, lambda: self._last_plain
        )
        try:
            self._direction(self._plain_to_ws, to_ws_done, to_plain_done, lambda: self._last_ws)
        finally:
            other.join()
            self._cut("", reset=False)

    # Each direction --------------------------------------------------------

    def _plain_to_ws(self) -> None:
        while True:
            data = self.plain.recv(CHUNK)
            if not data:
                break
            self._last_plain = time.monotonic()
            self._send_data(data)
        self._send_close(frames.CLOSE_NORMAL, "")

    def _ws_to_plain(self) -> None:
        reader = frames.FrameReader(masked=not self.client)
        data: Buffer = self._trailing
        self._trailing = b""
        while True:
            for event in reader.feed(data):
                if isinstance(event, frames.Data):
                    self.plain.sendall(event.payload)
                    self.received += len(event.payload)
                    self._last_ws = time.monotonic()
                elif isinstance(event, frames.Ping):
                    self._send(OP_PONG, event.payload)
                elif isinstance(event, frames.Close):
                    self._on_close(event)
                    return
            data = self.ws.recv(CHUNK)
            if not data:
                raise TunnelCut("WebSocket lost without a Close frame")
            self._last_ws = time.monotonic()

    def _on_close(self, close: frames.Close) -> None:
        """The peer is done sending: carry its half-close to plain."""
        self._close_received = True
        if close.code not in _CLEAN_CODES:
            raise TunnelCut(f"peer closed with code {close.code} {close.reason!r}".rstrip())
        if self.client:
            self._send_close(close.code if close.code != 1005 else frames.CLOSE_NORMAL, "")
        self.plain.shutdown(socket.SHUT_WR)

    # Supervision -----------------------------------------------------------

    def _direction(
        self,
        loop: Callable[[], None],
        done: Event,
        other_done: Event,
        other_activity: Callable[[], float],
    ) -> None:
        """Run one direction; when it ends well, give the other `linger` idle seconds."""
        try:
            loop()
        except frames.ProtocolError as exc:
            # Best effort: the peer may be stuck too.
            with gevent.Timeout(1.0, False), contextlib.suppress(OSError):
                self._send_close(exc.code, exc.reason)
            self._cut(f"protocol error: {exc.reason}")
            return
        except (TunnelCut, OSError) as exc:
            self._cut(str(exc))
            return
        finally:
            done.set()
        while not other_done.wait(self.linger):
            if time.monotonic() - other_activity() >= self.linger:
                self._cut(f"no data for {self.linger:g} s after the other side finished",
                          reset=False)
                return

    def _cut(self, reason: str, *, reset: bool = True) -> None:
        """End the tunnel now (idempotent); the first reason given is the one kept."""
        if not self.reason:
            clean = self._close_sent and self._close_received
            self.reason = reason if reason and not clean else "closed"
            self.failed = reset and not clean
        if self.failed:
            _reset(self.plain)
        self.plain.close()
        self.ws.close()

    # Writing frames --------------------------------------------------------

    def _send_data(self, data: bytes) -> None:
        """One binary frame per read; dropped once our Close is out (nowhere to go)."""
        if self._send(OP_BINARY, data):
            self.sent += len(data)

    def _send_close(self, code: int, reason: str) -> None:
        self._send(OP_CLOSE, frames.close_payload(code, reason))

    def _send(self, opcode: int, payload: Buffer) -> bool:
        """Write one frame, serialised: a pong must not land inside a data frame."""
        header, body = frames.frame_parts(opcode, payload, mask=self.client)
        with self._write_lock:
            if self._close_sent:
                return False
            self._close_sent = opcode == OP_CLOSE
            _send_vectored(self.ws, header, body)
        return True


def _send_vectored(sock: socket.socket, header: bytes, body: Buffer) -> None:
    """sendall(header + body) without building that copy (one sendmsg, usually)."""
    if isinstance(sock, ssl.SSLSocket):  # TLS sockets have no sendmsg
        sock.sendall(header + body)
        return
    sent = sock.sendmsg((header, body))
    if sent < len(header):
        sock.sendall(header[sent:])
        sent = len(header)
    if sent - len(header) < len(body):
        sock.sendall(memoryview(body)[sent - len(header) :])


def _reset(sock: socket.socket) -> None:
    """Make the coming close() send RST: the plain side's user must see a cut, not an end."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

