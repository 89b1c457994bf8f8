"""Listening sockets, TCP and unix, bound so that nothing is clobbered, and the server
that accepts on them.

A unix socket path is only ever replaced when it is a stale socket (nothing
answers on it), and only removed on close when it is still the socket we
bound: a regular file, a live socket or someone else's socket is left alone.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import Any

import gevent
from gevent import socket
from gevent.server import StreamServer

from .errors import ForwardError
from .proto.mapping import join_host_port

BACKLOG = 1024


@dataclass
class ListeningSocket:
    """A bound, listening socket and how to describe and undo it."""

    sock: socket.socket
    address: str  # "127.0.0.1:8080", "[::1]:8080" or the unix path
    port: int = 0
    unix_path: str = ""
    _inode: tuple[int, int] = (0, 0)

    def close(self) -> None:
        """Close the socket and remove its file if it is still the one we made."""
        self.sock.close()
        if not self.unix_path:
            return
        try:
            st = os.lstat(self.unix_path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.unix_path)
        except OSError:
            pass


def listen_tcp(host: str, port: int) -> ListeningSocket:
    """Bind and listen on host:port (port 0 picks a free one)."""
    where = join_host_port(host, port)
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ForwardError(f"cannot listen on {where}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ForwardError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    bound_host, bound_port = sock.getsockname()[:2]
    return ListeningSocket(sock, join_host_port(bound_host, bound_port), bound_port)


def listen_unix(path: str) -> ListeningSocket:
    """Bind a unix socket readable by its owner only, creating its directory."""
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        _clear_stale(path)
    except OSError as exc:
        raise ForwardError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        st = os.lstat(path)
        # Before listen() nobody can connect, so there is no window with wider rights.
        os.chmod(path, 0o600)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ForwardError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    return ListeningSocket(sock, path, unix_path=path, _inode=(st.st_dev, st.st_ino))


def _clear_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else at `path`."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ForwardError(f"cannot listen on {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno != errno.ECONNREFUSED:
            raise
        os.unlink(path)  # stale: left by a process that is gone
        return
    finally:
        probe.close()
    raise ForwardError(f"cannot listen on {path}: another process is listening on it")


class AcceptingServer(StreamServer):  # type: ignore[misc]  # gevent ships no type hints
    """gevent's StreamServer, with failed accepts (EMFILE: out of descriptors) logged, and
    the accepted socket left to its handler, which may hand it to a pump that outlives it."""

    log: logging.Logger
    _failing = False

    def do_close(self, *args: Any) -> None:
        pass

    def do_read(self) -> Any:
        try:
            accepted = super().do_read()
        except OSError as exc:
            if self.is_fatal_error(exc):
                raise
            if not self._failing:
                self._failing = True
                self.log.warning("cannot accept on %s: %s; retrying, backing off up to %g s",
                                 self.address, exc.strerror or exc, self.max_delay)
            raise _AcceptFailed() from exc
        if self._failing and accepted:
            self._failing = False
            self.log.warning("accepting on %s again", self.address)
        return accepted


class _AcceptFailed(gevent.GreenletExit):  # type: ignore[misc]
    """A failed accept(), already logged.  gevent's server backs off on any error from
    do_read (10 ms, doubling to 1 s), and its hub prints no exception of the
    Hub.NOT_ERROR kinds (GreenletExit among them): so the app's logger, not stderr,
    hears of it, once per run of failures."""
