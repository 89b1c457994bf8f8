"""What the load generator and the guest service say on one TCP connection.

The first byte picks the mode:

* ``E``: echo everything (the ``E`` itself included) until EOF;
* ``U`` + 8-byte size: swallow that many bytes, then answer ``K``;
* ``D`` + 8-byte size: send that many bytes, then EOF;
* ``R`` + 4-byte request size + 4-byte reply size: answer one reply for every
  request's worth of bytes received, until EOF (keep-alive; pipelining is fine,
  since only sizes count, never contents).

Sizes are big-endian. The guest closes at the client's EOF in every mode.
"""

from __future__ import annotations

import struct

ECHO, UPLOAD, DOWNLOAD, REQUESTS = b"E", b"U", b"D", b"R"
UPLOADED = b"K"
SIZE = struct.Struct("!Q")  # after U and D
SHAPE = struct.Struct("!II")  # after R: request size, reply size
HEAD_SIZE = {ECHO: 0, UPLOAD: SIZE.size, DOWNLOAD: SIZE.size, REQUESTS: SHAPE.size}

MiB = 1 << 20
GiB = 1 << 30
CHUNK = MiB  # read and write size of bulk transfers, on both ends


def requests_head(request: int, reply: int) -> bytes:
    """What opens a request/reply connection."""
    return REQUESTS + SHAPE.pack(request, reply)
