"""The WebSocket upgrade (RFC 6455, section 4), both roles, without sockets.

wsproto writes and checks the HTTP/1.1 messages, accept key included.  We
hand it only the response head (up to the blank line): whatever follows a
101 is already WebSocket frames, and those belong to the pump.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus

import wsproto.utilities
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake

from ..errors import ForwardError
from .draws import Draws

MAX_HEAD = 64 * 1024  # an answer head larger than this is not a daemon talking
BODY_PREVIEW = 200  # how much of a refusal's body goes into the log line

Headers = Sequence[tuple[str, str]]


class HandshakeError(ForwardError):
    """The upgrade did not end in a valid 101; `status_line` and `body` say why, `status`
    is the answer's code (0 when none came), and `cause` is "http NNN" for a refusal."""

    def __init__(self, reason: str, status_line: str = "", body: bytes = b"") -> None:
        detail = reason
        if status_line:
            detail += f": {status_line}"
        if body:
            detail += f" {printable(body)}"
        match = _STATUS.match(status_line)
        self.status = int(match.group(1)) if match else 0
        refused = self.status and self.status != 101
        super().__init__(detail, f"http {self.status}" if refused else "handshake")
        self.reason = reason
        self.status_line = status_line
        self.body = body


_STATUS = re.compile(r"HTTP/\d\.\d (\d{3})\b")


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


_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
_STATUS_101 = re.compile(rb"HTTP/1\.1 101(?: [\t -~]*)?")
# A header line in a narrower grammar than h11's (RFC 9110 tokens, visible ASCII values).
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([!-~](?:[\t -~]*[!-~])?)?[ \t]*")
_FAST_MAX_HEAD = 8192
# Sec-WebSocket-Key values: 16 random bytes in base64 (RFC 6455, section 4.1), 256 drawn
# at a time.
_new_key = Draws(16, 256, base64.b64encode).take


def accept_token(key: bytes) -> bytes:
    """The Sec-WebSocket-Accept that answers `key` (RFC 6455, section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + _ACCEPT_GUID).digest())


class Upgrade:
    """One listener's upgrade request, built once by wsproto: each tunnel's request
    differs only in its key, so it is spliced in rather than built again."""

    def __init__(self, *, host: str, target: str, headers: Headers) -> None:
        self._request = Request(
            host=host,
            target=target,
            extra_headers=[(k.encode(), v.encode("latin-1")) for k, v in headers],
        )
        h11 = H11Handshake(ConnectionType.CLIENT)
        request = h11.send(self._request)
        key = re.search(rb"\r\nSec-WebSocket-Key: ([A-Za-z0-9+/=]+)\r\n", request)
        assert key is not None and request.count(key.group(1)) == 1
        self._before, self._after = request.split(key.group(1))

    def handshake(self) -> ClientHandshake:
        """A fresh exchange, with a fresh key, for one tunnel."""
        key = _new_key()
        return ClientHandshake(self, key, self._before + key + self._after)

    def wsproto(self, key: bytes) -> H11Handshake:
        """wsproto's handshake in the state our request left it, our key included.

        It judges every answer the fast check is not sure of.  wsproto draws its
        own key and keeps it in `_nonce` (wsproto 1.x); the tests pin that.
        """
        h11 = H11Handshake(ConnectionType.CLIENT)
        h11.send(self._request)
        h11._nonce = key
        return h11


def fast_accept(head: bytes, expected: bytes) -> bool:
    """True for a plain, valid 101 that wsproto would accept as well; False means
    "ask wsproto", never "refused".

    Only a narrow grammar passes (HTTP/1.1, no duplicate header, nothing that
    h11 or wsproto would have more to say about), so this can only be stricter.
    """
    if len(head) > _FAST_MAX_HEAD:
        return False
    lines = head[:-4].split(b"\r\n")
    if not _STATUS_101.fullmatch(lines[0]):
        return False
    fields: dict[bytes, bytes] = {}
    for line in lines[1:]:
        match = _FIELD.fullmatch(line)
        if match is None:
            return False
        name = match.group(1).lower()
        if name in fields or name in _FAST_REFUSES:
            return False
        fields[name] = match.group(2) or b""
    return (
        fields.get(b"upgrade", b"").lower() == b"websocket"
        and fields.get(b"sec-websocket-accept") == expected
        and any(token.strip().lower() == b"upgrade"
                for token in fields.get(b"connection", b"").split(b","))
    )


# Headers that make wsproto negotiate or h11 check framing: those answers go to wsproto.
_FAST_REFUSES = frozenset((b"sec-websocket-extensions", b"sec-websocket-protocol",
                           b"content-length", b"transfer-encoding"))


class ClientHandshake:
    """The client side of one upgrade: send `request`, then `receive` until a verdict."""

    def __init__(self, upgrade: Upgrade, key: bytes, request: bytes) -> None:
        self.request = request
        self._upgrade = upgrade
        self._key = key
        self._h11: H11Handshake | None = None  # made only for answers the fast check leaves
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
        if fast_accept(head, accept_token(self._key)):
            return Accepted(rest)
        self._status_line = printable(head.split(b"\r\n", 1)[0])
        self._h11 = self._upgrade.wsproto(self._key)
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
        assert self._h11 is not None
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
            # h11 quotes the offending line, which may be an Authorization header.
            reason = str(exc).split(":", 1)[0]
            raise HandshakeError(f"not a WebSocket upgrade ({reason})") from None
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
