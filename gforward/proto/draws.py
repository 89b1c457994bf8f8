"""Random values the wire needs by the thousand (masking keys, Sec-WebSocket-Key nonces),
drawn from os.urandom in blocks: one getrandom call per block, not per frame or tunnel."""

from __future__ import annotations

import os
import struct
from typing import Callable


class Draws:
    """Values of `size` random bytes, each passed through `encode` if given, drawn
    `per_block` at a time.  list.pop and list.extend are atomic, so threads may share one;
    a forked child draws its own, never its parent's (RFC 6455 10.3: keys must not be
    predictable)."""

    __slots__ = ("_block", "_encode", "_ready", "_split")

    def __init__(self, size: int, per_block: int,
                 encode: Callable[[bytes], bytes] | None = None) -> None:
        self._block = size * per_block
        self._split = struct.Struct(f"{size}s" * per_block).unpack  # a block cut up in C
        self._encode = encode
        self._ready: list[bytes] = []
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._ready.clear)

    def take(self) -> bytes:
        """A fresh value."""
        try:
            return self._ready.pop()
        except IndexError:
            values: tuple[bytes, ...] = self._split(os.urandom(self._block))
            self._ready.extend(values if self._encode is None else map(self._encode, values))
            return self._ready.pop()
