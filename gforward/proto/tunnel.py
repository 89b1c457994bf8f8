"""One tunnel's rules, without sockets: what goes where, when it ends, and how.

Theory of operation
-------------------
A tunnel joins a "plain" byte stream (the local connection in the forwarder,
the upstream inside the guest in the daemon) to a WebSocket.  Its driver
(`pump.Pump`) reads whatever a socket has and tells the tunnel
(`plain_data`, `plain_eof`, `ws_data`, `ws_eof`, `timer`); the tunnel puts
what must be written on two queues, `to_ws` and `to_plain`, and the driver
takes bytes off their fronts as the sockets accept them.  Everything else the
driver needs is an attribute: whether to read each side, whether to shut
plain for writing, whether the tunnel is over and how.

The rules (RFC 6455 section 7, with TCP half-closes carried across):

* Flow control: the driver reads a side only while the queue towards the
  other side is empty, so a tunnel holds at most one read per direction and a
  slow reader holds its writer back through TCP itself.
* Plain EOF sends Close(1000) after what was read before it, and frames from
  the peer still go to plain until the peer's Close: that is how a reply
  reaches a client that half-closed.  No timer cuts that wait; keepalive
  still finds a dead peer.
* The peer's Close shuts plain for writing once plain has every byte that
  came before it.  The roles differ in what follows.  A client takes the
  daemon's Close as the end: it answers at once (after the frames already
  queued), reads plain no more, and the tunnel is over; the kernel resets a
  connection closed with unread bytes, so nothing is lost silently (the driver
  closes it once plain has acknowledged every byte sent to it).  A
  server (the daemon) takes a client's Close as a half-close: plain may
  still answer, and the server's own Close follows plain's EOF.
* Control frames never wait behind a data frame that has not started: a Ping
  or Pong goes into `to_ws` right after the frame being written.
* Keepalive judges the peer only: silence for `ping_interval` sends a Ping,
  and `ping_timeout` more without a byte cuts the tunnel, but a tunnel held
  back by flow control (either side reading slowly, however long) is alive.
* Anything abnormal (the WebSocket lost without a Close, a protocol error, a
  Close with an error code, a socket error, a silent peer) ends the tunnel at
  once and `failed`: the driver resets plain so that its user sees a cut.

Every frame in `to_ws` is two buffers, header and payload, so that a
vectored send needs no copy and a frame boundary is easy to find.
"""

from __future__ import annotations

from . import frames
from .frames import OP_BINARY, OP_CLOSE, OP_PING, OP_PONG, Buffer, ProtocolError

CLEAN_CLOSE_CODES = (frames.CLOSE_NORMAL, frames.CLOSE_GOING_AWAY, 1005)


class Tunnel:
    """The state of one tunnel; see the module's docstring."""

    __slots__ = ("_close_received", "_close_sent", "_closing_at", "_heard_at", "_mask",
                 "_ping_at", "_ping_interval", "_ping_timeout", "_reader", "_sent_since_heard",
                 "_waiting_pong",
                 "_ws_gone", "cause", "failed", "outcome", "reading_plain", "sent", "shut_plain",
                 "to_plain", "to_ws")

    def __init__(self, *, client: bool, ping_interval: float = 0.0, ping_timeout: float = 0.0,
                 now: float = 0.0) -> None:
        self.to_ws: list[Buffer] = []  # frames for the WebSocket, two buffers each
        self.to_plain: list[Buffer] = []  # payload for plain
        self.sent = 0  # payload bytes taken from plain
        self.reading_plain = True
        self.shut_plain = False  # shut plain for writing once to_plain is empty
        self.outcome = ""  # why the tunnel ended; "" while it goes on
        self.failed = False  # it ended abnormally: reset plain
        self.cause = ""  # why it failed, as a short key ("lost", "keepalive", ...)
        self._mask = client  # a client masks its frames, a server does not (RFC 6455 5.1)
        self._reader = frames.FrameReader(masked=not client)
        self._close_sent = False  # our Close is queued
        self._close_received = False
        self._ping_interval = ping_interval  # 0: no keepalive
        self._ping_timeout = ping_timeout
        self._heard_at = now  # when the peer last sent anything
        self._ping_at: float | None = None  # when our unanswered Ping was sent
        self._closing_at: float | None = None  # when the timer first saw our answer wait
        self._ws_gone = False  # the peer hung up after its Close
        self._waiting_pong: bytes | None = None  # the header of the last Pong queued
        self._sent_since_heard = False  # data went to the peer after it last spoke

    # What the driver reports ------------------------------------------------

    def plain_data(self, data: Buffer) -> None:
        """Bytes read from plain: one binary frame."""
        self.sent += len(data)
        self._sent_since_heard = True
        self.to_ws += frames.frame_parts(OP_BINARY, data, mask=self._mask)

    def plain_eof(self) -> None:
        """Plain will send no more: Close(1000), after what it sent before."""
        self.reading_plain = False
        self._queue_close(frames.CLOSE_NORMAL, "")

    def ws_data(self, data: Buffer, now: float) -> int:
        """Bytes read from the WebSocket: payloads for plain, control frames acted on.
        Returns how many payload bytes went onto to_plain."""
        self._heard_at = now
        self._sent_since_heard = False
        before = self._reader.received
        try:
            controls = self._reader.feed(data, self.to_plain)
        except ProtocolError as exc:
            self._queue_close(exc.code, exc.reason)  # best effort: the peer may be stuck too
            self._end(f"protocol error: {exc.reason}", "protocol")
            return self._reader.received - before
        if controls:
            self._control(controls)
        return self._reader.received - before

    def ws_lost(self, reason: str, *, backlog: bool = False) -> None:
        """The WebSocket's stream ended or failed.  After the peer's Close that is its way
        of hanging up, fine if nothing but our Close was left unsent (our Close is queued
        after everything else, so then it is all that two buffers can hold; `backlog`: the
        driver still held bytes of its own); otherwise a cut."""
        only_our_close = not self.to_ws or (self._close_sent and len(self.to_ws) <= 2)
        if self._close_received and only_our_close and not backlog:
            self.to_ws.clear()
            self._ws_gone = True
        else:
            self._end(reason, "lost")

    def error(self, reason: str, cause: str = "local") -> None:
        """Plain failed (a reset, say), or the driver did: the tunnel is cut."""
        self._end(reason, cause)

    def abort(self, reason: str) -> None:
        """Ended from outside (the forwarder closes): not a failure; the peer is told
        we are going away, best effort."""
        self._queue_close(frames.CLOSE_GOING_AWAY, "")
        self._end(reason)

    def timer(self, now: float, *, held: bool, acking: bool = True,
              backlog: bool = False) -> float | None:
        """Keepalive; returns when to call again (None: no more).

        `held` says the driver waits on flow control, a side that reads slowly, which
        proves nothing.  Nor does a silent peer that we sent data since it last spoke:
        it may be working through it (a guest reading slowly), and a Ping would wait
        behind it; unless `acking` is False, the peer's host no longer acknowledging
        what TCP sends it.  `backlog`: the driver holds bytes for the WebSocket below
        to_ws (TLS records)."""
        if self.outcome or not self._ping_interval:
            return None
        if self._close_received:  # our answer must get out within ping_timeout
            if not (self.to_ws or backlog) or self._ws_gone:
                return None
            if self._closing_at is None:
                self._closing_at = now
            elif now - self._closing_at >= self._ping_timeout:
                self.ws_lost(f"peer took no Close answer within {self._ping_timeout:g} s")
                return None
            return self._closing_at + self._ping_timeout
        if held or (acking and self._sent_since_heard):
            self._heard_at, self._ping_at = now, None
            return now + self._ping_interval
        if self._ping_at is not None and self._heard_at < self._ping_at:
            if now - self._ping_at >= self._ping_timeout:
                self._end(f"no answer to a ping within {self._ping_timeout:g} s", "keepalive")
                return None
            return self._ping_at + self._ping_timeout
        if now - self._heard_at >= self._ping_interval:
            self._ping_at = now
            self._urgent(frames.frame_parts(OP_PING, b"", mask=self._mask))
            return now + self._ping_timeout
        self._ping_at = None
        return self._heard_at + self._ping_interval

    # What the driver reads ---------------------------------------------------

    @property
    def received(self) -> int:
        """Payload bytes read from the WebSocket."""
        return self._reader.received

    @property
    def reading_ws(self) -> bool:
        """Whether to read the WebSocket now: not while plain has bytes to take (flow
        control).  What we queue for the peer stays small meanwhile: one Pong at most."""
        return not self.to_plain and not self.outcome and not self._ws_gone

    @property
    def finished(self) -> bool:
        """Both Close frames exchanged and every byte delivered: a clean end."""
        return (self._close_received and not self.to_ws and not self.to_plain
                and (self._close_sent or self._ws_gone))

    # Rules -------------------------------------------------------------------

    def _control(self, controls: list[frames.Control]) -> None:
        """Act on the control frames of one read: the last Ping is answered, a Close ends
        or half-closes."""
        pings = [control for control in controls if type(control) is frames.Ping]
        if pings and not (self._close_sent and self._close_received):  # not once both are out
            self._pong(pings[-1].payload)
        for control in controls:
            if type(control) is frames.Close:
                self._on_close(control)

    def _on_close(self, close: frames.Close) -> None:
        """The peer is done sending: deliver what came before, then end or half-close."""
        self._close_received = True
        if close.code in CLEAN_CLOSE_CODES:
            self.shut_plain = True
            if self._mask:  # the client role; a server's Close follows plain's EOF
                self.reading_plain = False
                self._queue_close(frames.CLOSE_NORMAL, "")
        else:
            self.reading_plain = False
            self._queue_close(close.code, "")
            self._end(f"peer closed with code {close.code} {close.reason!r}".rstrip(),
                      f"close {close.code}")

    def _queue_close(self, code: int, reason: str) -> None:
        if not self._close_sent:
            self._close_sent = True
            self.to_ws += frames.frame_parts(OP_CLOSE, frames.close_payload(code, reason),
                                             mask=self._mask)

    def _pong(self, payload: bytes) -> None:
        """Answer a Ping: one Pong waits at most, answering the latest (RFC 6455 5.5.3),
        so that a peer that pings and reads nothing cannot grow the queue."""
        frame = frames.frame_parts(OP_PONG, payload, mask=self._mask)
        waiting = self._waiting_pong
        for at, buf in enumerate(self.to_ws):
            if buf is waiting:  # the last Pong, not started: answer the new Ping instead
                self.to_ws[at : at + 2] = frame
                break
        else:
            self._urgent(frame)
        self._waiting_pong = frame[0]

    def _urgent(self, frame: tuple[bytes, Buffer]) -> None:
        """A control frame goes right after the frame being written, ahead of the rest.

        Frames are buffer pairs and headers are made as bytes, so the queue itself says
        how far the head frame got: an odd length means its header went out, and a
        header cut into (a memoryview, see `consume`) means part of it did."""
        out = self.to_ws
        at = 1 if len(out) % 2 else 2 if out and type(out[0]) is memoryview else 0
        out[at:at] = frame

    def _end(self, reason: str, cause: str = "") -> None:
        """The first reason given is the one kept; a `cause` (a short key for counters)
        makes the end a failure."""
        if not self.outcome:
            self.outcome = reason
            self.cause = cause
            self.failed = bool(cause)
            self.reading_plain = False


def consume(buffers: list[Buffer], count: int) -> None:
    """Drop `count` bytes off the front of `buffers` (a queue the driver wrote from); a
    buffer cut into is left as a memoryview of its rest."""
    done = 0
    for buf in buffers:
        size = len(buf)
        if count < size:
            break
        count -= size
        done += 1
    del buffers[:done]
    if count:
        buffers[0] = memoryview(buffers[0])[count:]

