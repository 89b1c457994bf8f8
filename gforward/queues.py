"""Bytes between queues and non-blocking sockets: the pool of read buffers, and sends
that take as much of a queue as the socket will."""

from __future__ import annotations

import socket
from typing import Any

from .proto.frames import Buffer
from .proto.tunnel import consume

CHUNK = 256 * 1024  # bytes per read
# Reads go into buffers used again and again: a fresh 256 KiB bytes object per read
# costs mmap, mremap and munmap.  TLS may decrypt a little more than one read's CHUNK.
BUFFER = CHUNK + 32 * 1024
_free: list[bytearray] = []  # list.pop and list.append are atomic: hub threads may share it
_FREE_MAX = 16
IOV_MAX = 1024  # Linux refuses a sendmsg with more buffers (EMSGSIZE)
SMALL = 2048  # payloads joined to their header for one send rather than a vectored one
READ, WRITE = 1, 2  # the events a watcher of gevent's loop.io waits for (libev's masks)


def send_queue(sock: socket.socket, out: list[Buffer]) -> None:
    """Write from the front of `out` without blocking, taking off what went (all of it
    when the socket takes it all).  Raises OSError."""
    try:
        while len(out) > IOV_MAX:
            batch = out[:IOV_MAX]  # an even count: to_ws keeps its frame parity
            count = sock.sendmsg(batch)
            if count < sum(map(len, batch)):
                consume(out, count)
                return
            del out[:IOV_MAX]
        if len(out) == 1:  # a plain send is cheaper than a vectored one
            count, total = sock.send(out[0]), len(out[0])
        elif len(out) == 2 and len(out[1]) <= SMALL:  # one small frame: joined, and sent so
            joined = b"".join(out)
            count, total = sock.send(joined), len(joined)
        else:
            count, total = sock.sendmsg(out), sum(map(len, out))
    except BlockingIOError:
        return
    if count == total:
        out.clear()
    else:
        consume(out, count)


def take_buffer() -> bytearray:
    """A read buffer from the pool every pump shares; a new one when none is free."""
    try:
        return _free.pop()
    except IndexError:
        return bytearray(BUFFER)


def give_buffer(buf: bytearray) -> None:
    """A read buffer back to the pool, which keeps a few."""
    if len(_free) < _FREE_MAX:
        _free.append(buf)


def describe(exc: OSError) -> str:
    """A socket error's text, for a tunnel's log line."""
    return exc.strerror or str(exc) or type(exc).__name__


def raw(sock: Any) -> socket.socket:
    """The standard socket under one of gevent's (which wraps it as `_sock`, non-blocking):
    its wrapper, with two idle watchers, can then go."""
    inner: socket.socket = getattr(sock, "_sock", sock)
    return inner
