"""WebSocket frames for the byte pump (RFC 6455, section 5), without sockets.

wsproto stays the source of truth for the frame grammar (the tests check this
codec against it byte for byte); this module exists because the pump's hot
path must not copy or mask in pure Python.  The reader streams payloads: a
frame that announces 2**62 bytes costs no more memory than one read, and an
unmasked payload comes back as a slice of the caller's buffer, not a copy.
"""

from __future__ import annotations

import struct
from typing import Callable, NamedTuple, Union

from .draws import Draws

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007

MAX_HEADER = 14
MAX_CONTROL_PAYLOAD = 125

_DATA_OPCODES = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
_CONTROL_OPCODES = (OP_CLOSE, OP_PING, OP_PONG)
# RFC 6455 section 7.4 plus IANA's 1012 (service restart) and 1013 (try again
# later), as wsproto accepts them: codes an endpoint may send in a Close frame.
_SENDABLE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013))

Buffer = Union[bytes, bytearray, memoryview]


def _xor_mask(data: Buffer, key: bytes) -> bytes:
    """Pure-Python masking: one big-integer XOR, no per-byte loop."""
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    masked = int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")
    return masked.to_bytes(n, "little")


apply_mask: Callable[[Buffer, bytes], bytes]
try:  # websockets' C masking is about 100x faster: the `speedups` extra.
    from websockets.speedups import apply_mask
    FAST_MASK = True
except ImportError:  # pragma: no cover - exercised by the fallback test
    apply_mask = _xor_mask
    FAST_MASK = False


class ProtocolError(Exception):
    """The peer broke RFC 6455; `code` is the Close code to answer with."""

    def __init__(self, reason: str, code: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Ping(NamedTuple):
    payload: bytes


class Pong(NamedTuple):
    payload: bytes


class Close(NamedTuple):
    """A Close frame; code 1005 stands for "no status code" (RFC 6455 7.1.5)."""

    code: int
    reason: str


Control = Union[Ping, Pong, Close]


def frame_header(opcode: int, length: int, mask_key: bytes | None = None) -> bytes:
    """The header of one final frame, masked with `mask_key` when given."""
    mask_bit = 0x80 if mask_key is not None else 0
    if length < 126:
        short = _SHORT_HEADERS.get(mask_bit << 8 | opcode)
        header = short[length] if short else struct.pack("!BB", 0x80 | opcode, mask_bit | length)
    elif length < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, mask_bit | 127, length)
    return header + mask_key if mask_key is not None else header


# The two bytes that start every short final frame, by mask bit << 8 | opcode, then length:
# small messages are the common case, and a lookup is a third of struct.pack's cost.
_SHORT_HEADERS = {
    mask_bit << 8 | opcode: [bytes((0x80 | opcode, mask_bit | n)) for n in range(126)]
    for mask_bit in (0, 0x80)
    for opcode in (OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG)
}
# A fresh random masking key per frame (RFC 6455 5.3), 1,024 drawn at a time.
mask_key = Draws(4, 1024).take


def frame_parts(opcode: int, payload: Buffer, *, mask: bool) -> tuple[bytes, Buffer]:
    """Header and payload of one final frame, kept apart so that a vectored send
    need not copy the payload; a client masks with a fresh key per frame (5.3)."""
    if not mask:
        return frame_header(opcode, len(payload)), payload
    key = mask_key()
    return frame_header(opcode, len(payload), key), apply_mask(payload, key)


def encode_frame(opcode: int, payload: Buffer, *, mask: bool) -> bytes:
    """One final frame as a single bytes object."""
    header, body = frame_parts(opcode, payload, mask=mask)
    return header + body


def close_payload(code: int, reason: str = "") -> bytes:
    """The body of a Close frame; the reason is cut to fit a control frame."""
    encoded = reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD - 2]
    return struct.pack("!H", code) + encoded.decode("utf-8", "ignore").encode("utf-8")


def parse_close_payload(payload: bytes) -> Close:
    """Validate a received Close body (RFC 6455 5.5.1 and 7.4)."""
    if not payload:
        return Close(1005, "")
    if len(payload) == 1:
        raise ProtocolError("Close frame with a one-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    if code not in _SENDABLE_CODES and not 3000 <= code <= 4999:
        raise ProtocolError(f"Close frame with invalid code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("Close reason is not UTF-8", CLOSE_INVALID_DATA) from None
    return Close(code, reason)


class FrameReader:
    """Incremental frame parser: feed it what the socket gave, get payloads and control frames.

    `masked` says whether the peer must mask (a server reads masked client
    frames; a client reads unmasked server frames).  Payload pieces may be
    views of the fed buffer: consume them before the next read into it.
    `received` counts the payload bytes handed out so far.
    """

    __slots__ = ("_closed", "_control", "_expect_mask", "_in_message", "_key", "_mask_bit",
                 "_offset", "_opcode", "_pending", "_remaining", "received")

    def __init__(self, *, masked: bool) -> None:
        self._expect_mask = masked
        self._mask_bit = 0x80 if masked else 0
        self._pending = b""  # a header split across reads (at most 13 bytes)
        self._remaining = 0  # payload bytes still to come in the current frame
        self._opcode = -1  # the current frame's, while its payload is read; -1 between frames
        self._key = b""
        self._offset = 0  # payload bytes already unmasked in the current frame
        self._control = bytearray()
        self._in_message = False  # a fragmented message awaits continuations
        self._closed = False  # the peer's Close came: no data frame may follow
        self.received = 0

    def feed(self, data: Buffer, payloads: list[Buffer]) -> list[Control]:
        """Parse `data`: data frames' payload pieces go onto `payloads`, control frames
        come back, each list in wire order.  Raises ProtocolError on a bad frame, after
        putting on `payloads` what came before it.

        Their relative order is dropped on purpose: a pump sends payloads one way and
        answers control frames the other, and nothing may follow a Close.
        """
        controls: list[Control] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        simple = not (self._in_message or self._closed)
        while pos < end:
            if simple and self._opcode < 0 and not self._pending and end - pos > 3:
                # Fast path: a whole final binary frame of under 64 KiB, the usual message.
                b1 = view[pos + 1]
                length = b1 & 0x7F
                if view[pos] == 0x82 and (b1 & 0x80) == self._mask_bit and length < 127:
                    start = pos + 2
                    if length == 126:
                        length = view[pos + 2] << 8 | view[pos + 3]
                        start = pos + 4
                    stop = start + (4 if self._mask_bit else 0) + length
                    if stop <= end:
                        if not length:
                            pass
                        elif self._mask_bit:
                            key = bytes(view[start : start + 4])
                            payloads.append(apply_mask(view[start + 4 : stop], key))
                        else:
                            payloads.append(view[start:stop])
                        self.received += length
                        pos = stop
                        continue
            if self._opcode < 0:  # a header comes first
                if self._pending or end - pos < MAX_HEADER:  # it may be split across reads
                    head: Buffer = self._pending + bytes(view[pos : pos + MAX_HEADER])
                    size = _header_size(head)
                    if size is None or len(head) < size:
                        self._pending = bytes(head)
                        break
                    pos += size - len(self._pending)
                    self._pending = b""
                else:
                    head = view[pos : pos + MAX_HEADER]
                    size = _header_size(head)
                    assert size is not None
                    pos += size
                self._begin(head)
            take = min(self._remaining, end - pos)
            self._remaining -= take
            self._payload(view[pos : pos + take], payloads, controls)
            pos += take
            simple = not (self._in_message or self._closed)
        return controls

    def _begin(self, head: Buffer) -> None:
        """Check one frame header and set up to read its payload."""
        b0, b1 = head[0], head[1]
        opcode = b0 & 0x0F
        fin = bool(b0 & 0x80)
        if b0 & 0x70:
            raise ProtocolError("reserved bits set without an extension")
        if bool(b1 & 0x80) != self._expect_mask:
            raise ProtocolError("client frame not masked" if self._expect_mask
                                else "server frame masked")
        length = b1 & 0x7F
        pos = 2
        if length == 126:
            (length,) = struct.unpack_from("!H", head, 2)
            pos = 4
        elif length == 127:
            (length,) = struct.unpack_from("!Q", head, 2)
            pos = 10
            if length >> 63:
                raise ProtocolError("frame length has its top bit set")
        if opcode in _CONTROL_OPCODES:
            if not fin:
                raise ProtocolError("fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise ProtocolError("control frame payload over 125 bytes")
        elif opcode in _DATA_OPCODES:
            if (opcode == OP_CONTINUATION) != self._in_message:
                raise ProtocolError("continuation frame out of place"
                                    if opcode == OP_CONTINUATION
                                    else "new message inside a fragmented one")
            self._in_message = not fin
        else:
            raise ProtocolError(f"unknown opcode {opcode:#x}")
        if self._closed and opcode < OP_CLOSE:
            raise ProtocolError("data frame after a Close frame")
        self._opcode = opcode
        self._key = bytes(head[pos : pos + 4]) if self._expect_mask else b""
        self._offset = 0
        self._remaining = length

    def _payload(self, chunk: memoryview, payloads: list[Buffer], controls: list[Control]) -> None:
        """Unmask a piece of the current payload; finish the frame when it is whole."""
        data: Buffer = chunk
        if self._key and chunk:
            shift = self._offset % 4
            data = apply_mask(chunk, self._key[shift:] + self._key[:shift])
            self._offset += len(chunk)
        opcode = self._opcode
        if self._remaining == 0:
            self._opcode = -1
        if opcode < OP_CLOSE:  # a data frame
            if data:
                payloads.append(data)
                self.received += len(data)
            return
        self._control += data
        if self._remaining:
            return
        body = bytes(self._control)
        self._control.clear()
        if opcode == OP_PING:
            controls.append(Ping(body))
        elif opcode == OP_PONG:
            controls.append(Pong(body))
        else:
            controls.append(parse_close_payload(body))
            self._closed = True


def _header_size(head: Buffer) -> int | None:
    """How long the frame header that starts `head` is, once two bytes are known."""
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    extra = 2 if length == 126 else 8 if length == 127 else 0
    return 2 + extra + (4 if head[1] & 0x80 else 0)
