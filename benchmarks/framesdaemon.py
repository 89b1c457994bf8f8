"""A daemon that only streams 32 KiB frames: `python -m benchmarks.framesdaemon`.

The reference daemon sends frames as large as its reads, so a download through it
says little about what a client pays per frame of the size Slicer sends. This
one accepts the upgrade on any `/vm/NAME/forward` (no token, no upstream: it
dials nothing), then sends one pre-encoded run of 32 KiB binary frames over and
over with large sendall()s until the client sends Close (answered) or goes. It
costs next to nothing, so a forwarder's CPU per GiB through it is the client's
own cost. It prints ``listening on http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import struct
import sys
import threading

from benchmarks.children import child_arguments, child_setup
from gforward.proto.frames import (
    CLOSE_NORMAL,
    OP_BINARY,
    OP_CLOSE,
    close_payload,
    encode_frame,
    frame_header,
)
from gforward.proto.handshake import accept_token

FRAME = 32 * 1024
RUN = 32  # frames per sendall
FORWARD_PATH = re.compile(r"(?:/[^/?]+)*/vm/[^/?]+/forward(?:\?.*)?")


def frames(size: int, count: int) -> bytes:
    """`count` unmasked binary frames of `size` random bytes, as a server sends them."""
    return (frame_header(OP_BINARY, size) + os.urandom(size)) * count


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """The request head and whatever came after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more or len(data) > 65536:
            raise ConnectionError("no request head")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_exact(sock: socket.socket, buf: bytearray, n: int) -> bytes:
    while len(buf) < n:
        more = sock.recv(max(n - len(buf), 65536))
        if not more:
            raise ConnectionError("EOF")
        buf += more
    data = bytes(buf[:n])
    del buf[:n]
    return data


def wait_for_close(sock: socket.socket, buf: bytearray, closed: threading.Event) -> None:
    """Read the client's frames, skipping payloads, until its Close (or its end)."""
    try:
        while True:
            b0, b1 = read_exact(sock, buf, 2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", read_exact(sock, buf, 2))
            elif n == 127:
                (n,) = struct.unpack("!Q", read_exact(sock, buf, 8))
            read_exact(sock, buf, n + (4 if b1 & 0x80 else 0))
            if b0 & 0x0F == OP_CLOSE:
                return
    except OSError:
        pass
    finally:
        closed.set()


def serve(sock: socket.socket, run: bytes, timeout: float) -> None:
    sock.settimeout(timeout)
    try:
        head, rest = read_head(sock)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:])}
        key = headers.get("sec-websocket-key", "")
        if len(parts) < 2 or not FORWARD_PATH.fullmatch(parts[1]) or not key:
            sock.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close"
                         b"\r\n\r\n")
            return
        accept = accept_token(key.encode())
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        closed = threading.Event()
        reader = threading.Thread(target=wait_for_close, args=(sock, bytearray(rest), closed),
                                  daemon=True)
        reader.start()
        while not closed.is_set():
            sock.sendall(run)
        sock.sendall(encode_frame(OP_CLOSE, close_payload(CLOSE_NORMAL), mask=False))
        sock.shutdown(socket.SHUT_WR)
        reader.join(timeout)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def main() -> int:
    args = child_arguments(__doc__.split("\n\n")[0]).parse_args()
    child_setup(args.deadline_at, args.nofile)
    run = frames(FRAME, RUN)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    print(f"listening on http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    while True:
        sock, _ = listener.accept()
        threading.Thread(target=serve, args=(sock, run, args.io_timeout), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
