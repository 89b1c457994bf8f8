"""Random values drawn in blocks: each fresh, of its size, and never shared across a fork."""

from __future__ import annotations

import base64
import os
from typing import Callable

import pytest

from gforward.proto import frames, handshake
from gforward.proto.draws import Draws


def test_values_are_fresh_of_their_size_and_encoded() -> None:
    raw = Draws(4, 8)
    values = [raw.take() for _ in range(20)]  # more than a block
    assert all(type(v) is bytes and len(v) == 4 for v in values)
    assert len(set(values)) == 20
    encoded = Draws(16, 4, base64.b64encode)
    assert all(len(base64.b64decode(encoded.take(), validate=True)) == 16 for _ in range(9))


@pytest.mark.parametrize("take", [frames.mask_key, handshake._new_key],
                         ids=["masking keys", "Sec-WebSocket-Key"])
def test_a_forked_child_draws_values_of_its_own(take: Callable[[], bytes]) -> None:
    """Values drawn ahead are not inherited: parent and child must not send the same ones
    (RFC 6455 10.3 wants keys unpredictable)."""
    size = len(take())  # the parent has values in reserve
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next values, to the parent
        os.write(write, b"".join(take() for _ in range(8)))
        os._exit(0)
    os.close(write)
    try:
        theirs = os.read(read, 8 * size)
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    ours = b"".join(take() for _ in range(8))
    assert len(theirs) == 8 * size and theirs != ours
