"""The WebSocket upgrade (RFC 6455, section 4), both roles, without sockets.

wsproto writes and checks the HTTP/1.1 messages, accept key included.  We
hand it only the response head (up to the blank line): whatever follows a
101 is already WebSocket frames, and those belong to the pump.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

import wsproto.utilities
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake

from .errors import ForwardError

MAX_HEAD = 64 * 1024  # an answer head larger than this is not a daemon talking
BODY_PREVIEW = 200  # how much of a refusal's body goes into the log line

Headers = Sequence[tuple[str, str]]


class HandshakeError(ForwardError):
    """The upgrade did not end in a valid 101; `status_line` and `body` say why."""

    def __init__(self, reason: str, status_line: str = "", body: bytes = b"") -> None:
        detail = reason
        if status_line:
            detail += f": {status_line}"
        if body:
            detail += f" {printable(body)}"
        super().__init__(detail)
        self.reason = reason
        self.status_line = status_line
        self.body = body


def printable(data: bytes) -> str:
    """Daemon-supplied text made safe for one log line."""
    text = data.decode("utf-8", "replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


def _split_head(buffer: bytearray) -> tuple[bytes, bytes] | None:
    """Cut an HTTP message head off `buffer`, once its blank line has arrived."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise HandshakeError("HTTP head over 64 KiB")
        return None
    return bytes(buffer[: end + 4]), bytes(buffer[end + 4 :])


def upgrade_headers(
    *, token: str, client_id: str, upstream: str, user_agent: str
) -> list[tuple[str, str]]:
    """The headers API.md fixes for each tunnel, besides those wsproto adds."""
    headers = []
    if token:
        headers.append(("Authorization", f"Bearer {token}"))
    headers += [
        ("X-Inlets-Client-ID", client_id),
        ("X-Inlets-Mode", "local"),
        ("X-Inlets-Upstream", upstream),
        ("User-Agent", user_agent),
    ]
    return headers


@dataclass
class Accepted:
    """A valid 101: the WebSocket is open; `trailing` holds frames already read."""

    trailing: bytes


class ClientHandshake:
    """The client side: `request` to send, then `receive` until it returns a verdict."""

    def __init__(self, *, host: str, target: str, headers: Headers) -> None:
        self._h11 = H11Handshake(ConnectionType.CLIENT)
        self.request = self._h11.send(
            Request(
                host=host,
                target=target,
                extra_headers=[(k.encode(), v.encode("latin-1")) for k, v in headers],
            )
        )
        self._buffer = bytearray()
        self._status_line = ""
        self._body = bytearray()
        self._rejected = False

    def receive(self, data: bytes) -> Accepted | None:
        """Feed bytes from the daemon (b"" at EOF); None means more are needed.

        Raises HandshakeError once the answer is known to be a refusal, with
        up to BODY_PREVIEW bytes of its body.
        """
        if self._rejected:
            self._refusal_body(data)
            return None
        self._buffer += data
        split = _split_head(self._buffer)
        if split is None:
            if not data:
                raise HandshakeError("daemon closed the connection before answering",
                                     printable(bytes(self._buffer[:BODY_PREVIEW])))
            return None
        head, rest = split
        self._status_line = printable(head.split(b"\r\n", 1)[0])
        try:
            self._h11.receive_data(head)
            events = list(self._h11.events())
        except wsproto.utilities.RemoteProtocolError as exc:
            raise HandshakeError(f"invalid upgrade answer ({exc})", self._status_line) from None
        if events and isinstance(events[0], AcceptConnection):
            return Accepted(rest)
        if not events or not isinstance(events[0], RejectConnection):
            raise HandshakeError("unexpected upgrade answer", self._status_line)
        if not events[0].has_body or any(
            isinstance(e, RejectData) and e.body_finished for e in events
        ):
            raise HandshakeError("upgrade refused", self._status_line)
        self._rejected = True
        if rest:  # an empty `rest` is not EOF: the body may come in a later read
            self._refusal_body(rest)
        return None

    def _refusal_body(self, data: bytes) -> None:
        """Collect the start of a refusal's body, then raise with it."""
        finished = not data
        if data:
            try:
                self._h11.receive_data(data)
                for event in self._h11.events():
                    if isinstance(event, RejectData):
                        self._body += event.data
                        finished = finished or event.body_finished
            except wsproto.utilities.RemoteProtocolError:
                finished = True
        if finished or len(self._body) >= BODY_PREVIEW:
            raise self.refusal()

    @property
    def refused(self) -> bool:
        """A refusal's head has arrived; only (the start of) its body is awaited."""
        return self._rejected

    def refusal(self) -> HandshakeError:
        """The refusal with as much of its body as arrived, for a caller done waiting."""
        return HandshakeError("upgrade refused", self._status_line,
                              bytes(self._body[:BODY_PREVIEW]))


@dataclass
class UpgradeRequest:
    """What a client asked for: the request target and its headers (names lower-case)."""

    target: str
    headers: dict[str, str]
    trailing: bytes


class ServerHandshake:
    """The daemon side: `receive` the request, then `accept()` or send a `rejection()`."""

    def __init__(self) -> None:
        self._h11 = H11Handshake(ConnectionType.SERVER)
        self._buffer = bytearray()

    def receive(self, data: bytes) -> UpgradeRequest | None:
        """Feed bytes from the client; None means more are needed.

        Raises HandshakeError for anything that is not a WebSocket upgrade
        (the caller answers 400).
        """
        self._buffer += data
        split = _split_head(self._buffer)
        if split is None:
            if not data:
                raise HandshakeError("client closed the connection before asking")
            return None
        head, rest = split
        try:
            self._h11.receive_data(head)
            events = list(self._h11.events())
        except wsproto.utilities.RemoteProtocolError as exc:
            raise HandshakeError(f"not a WebSocket upgrade ({exc})") from None
        if not events or not isinstance(events[0], Request):
            raise HandshakeError("not a WebSocket upgrade")
        request = events[0]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in request.extra_headers}
        return UpgradeRequest(request.target, headers, rest)

    def accept(self) -> bytes:
        """The 101 answer."""
        return self._h11.send(AcceptConnection())


def rejection(status: int, message: str) -> bytes:
    """A complete non-101 answer with a short text body (RFC 6455 4.2.2)."""
    body = (message + "\n").encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
