"""RFC 6455 frames as the fake daemons write and read them, independently of
gforward.proto.frames: the opcodes, the accept key, one server frame's bytes, and
`Frame`, a frame as read."""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import NamedTuple

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode("ascii")).digest()).decode()


def unmask(payload: bytes, key: bytes) -> bytes:
    """A masked payload's bytes (RFC 6455 5.3): XOR with the key, repeated."""
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One unmasked frame, as a server sends it."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", first, n) + payload
    if n < 1 << 16:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


class Frame(NamedTuple):
    fin: bool
    opcode: int
    masked: bool
    payload: bytes  # unmasked
    key: bytes  # the masking key, b"" when unmasked

