"""TLS through `ssl.MemoryBIO`: the same objects serve the dial and the pump.

The dialling greenlet drives the handshake and the upgrade through a
`TLSChannel` as if it were a socket (`sendall`, `recv`, both cooperative
since the socket underneath is gevent's).  `TLSPump` then takes its parts
over: what the kernel has is decrypted in as many records as it holds, and
queued frames are encrypted in one go.  The SSLObject and its two BIOs never
touch a socket, so they never block a hub, whatever context class made them;
that is also why any `ssl.SSLContext` works here, gevent's, the standard
library's or a subclass of either: its own `wrap_bio` is called.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import time
from typing import Any, Callable, cast

from .proto.frames import Buffer
from .proto.records import Counters
from .proto.tunnel import Tunnel
from .pump import Pump
from .queues import BUFFER, CHUNK, raw

RECV_SIZE = 64 * 1024  # bytes per recv while a dial or a daemon's handshake reads


def client_context(ca_file: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """A client context that verifies the certificate and host name against the system's
    CAs (which honour SSL_CERT_FILE and SSL_CERT_DIR), or against `ca_file` (a PEM file
    or a hashed directory) alone, as curl's --cacert does; `insecure` checks nothing.

    A missing or unreadable `ca_file` raises OSError or ssl.SSLError here, once,
    rather than on every tunnel.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif ca_file:
        if os.path.isdir(ca_file):
            context.load_verify_locations(capath=ca_file)
        else:
            context.load_verify_locations(cafile=ca_file)
    else:
        context.load_default_certs()
    return context


def check_context(context: object) -> None:
    """Refuse what is not an SSLContext (ValueError), before anything is bound."""
    if not isinstance(context, ssl.SSLContext):
        raise ValueError(f"ssl_context must be an ssl.SSLContext, not {type(context).__name__}")


class TLSChannel:
    """TLS over a connected gevent socket, through a pair of memory BIOs."""

    def __init__(self, sock: Any, context: ssl.SSLContext, *, server_hostname: str | None = None,
                 server_side: bool = False) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                    server_hostname=server_hostname)

    def handshake(self) -> None:
        self._until_done(self.tls.do_handshake)

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def recv(self, size: int) -> bytes:
        """Up to `size` bytes of plaintext; b"" at the end of the stream, ragged or not."""
        try:
            data: bytes = self._until_done(lambda: self.tls.read(size))
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return b""
        return data

    def close(self) -> None:
        self.sock.close()

    def _until_done(self, step: Any) -> Any:
        """Run `step`, feeding the TLS object from the socket while it wants more."""
        while True:
            try:
                result = step()
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(RECV_SIZE)
                if data:
                    self.incoming.write(data)
                else:
                    self.incoming.write_eof()
                continue
            self._flush()
            return result

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)


class TLSPump(Pump):
    """A Pump whose WebSocket runs in TLS over `ssl.MemoryBIO`s, as `dial` set it up."""

    __slots__ = ("_cipher", "_incoming", "_outgoing", "_reading_socket", "_tls")

    def __init__(self, plain: Any, channel: TLSChannel, tunnel: Tunnel,
                 on_end: Callable[[Pump], None], counts: tuple[Counters, Counters]) -> None:
        super().__init__(raw(plain), raw(channel.sock), tunnel, on_end, counts)
        self._tls = channel.tls
        self._incoming = channel.incoming
        self._outgoing = channel.outgoing
        self._cipher: Buffer = b""  # encrypted bytes the socket has not taken yet
        self._reading_socket = True  # False only for the records read along with the 101

    def start(self, trailing: bytes = b"") -> None:
        super().start(trailing)
        if self._on_end is not None and self._incoming.pending:  # records read with the 101
            self._reading_socket = False
            self._ws_readable()
            self._reading_socket = True

    def _take_ws(self, buf: bytearray) -> None:
        """Read what the socket has, decrypt every whole record, give them to the tunnel."""
        tunnel = self.tunnel
        if self._reading_socket:
            count = self._ws.recv_into(buf, CHUNK)
            if not count:
                tunnel.ws_lost("WebSocket lost without a Close frame", backlog=bool(self._cipher))
                return
            self._incoming.write(memoryview(buf)[:count])
        count, ended = self._decrypt(buf)
        if count:
            self._count_down(tunnel.ws_data(memoryview(buf)[:count], time.monotonic()))
        if ended:  # close_notify: the TLS stream's end
            tunnel.ws_lost("WebSocket lost without a Close frame", backlog=bool(self._cipher))
        if self._outgoing.pending:  # TLS may answer while reading (a key update)
            self._take_cipher()
            if self._ws_w is None:
                self._flush_ws()

    def _decrypt(self, buf: bytearray) -> tuple[int, bool]:
        """Every whole record the BIO holds, into `buf`: how many bytes that made, and
        whether the stream ended.  All of them, always: no socket event would come for
        records left behind."""
        view = memoryview(buf)
        count = 0
        while count < BUFFER:  # never reached: one read's records and a part are smaller
            try:
                # With a buffer, read() returns a count (typeshed says bytes).
                got = cast(int, self._tls.read(BUFFER - count, view[count:]))
            except ssl.SSLWantReadError:
                return count, False
            if not got:
                return count, True
            count += got
        return count, False

    def _flush_ws(self) -> None:
        tunnel = self.tunnel
        try:
            if not self._cipher and tunnel.to_ws:
                self._encrypt(tunnel.to_ws)
                tunnel.to_ws.clear()
            sent = self._ws.send(self._cipher) if self._cipher else 0
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._ws_failed(exc)
            return
        self._cipher = memoryview(self._cipher)[sent:] if sent < len(self._cipher) else b""
        if self._cipher or tunnel.to_ws:
            self._ws_w = self._wait_writable(self._ws, self._ws_writable)
        else:
            self._ws_sent()

    def _encrypt(self, buffers: list[Buffer]) -> None:
        """Whole frames into TLS records: small ones joined, so one record holds many."""
        if sum(map(len, buffers)) <= 16384:
            self._tls.write(b"".join(buffers))
        else:
            for buf in buffers:
                if buf:
                    self._tls.write(buf)
        self._take_cipher()

    def _take_cipher(self) -> None:
        """What TLS wrote into its outgoing BIO, after what the socket has yet to take."""
        more = self._outgoing.read()
        self._cipher = bytes(self._cipher) + more if self._cipher else more

    def _ws_backlog(self) -> bool:
        return bool(self._cipher)

    def _last_words(self) -> None:
        with contextlib.suppress(OSError):
            if self.tunnel.to_ws:
                self._encrypt(self.tunnel.to_ws)
            if not self.tunnel.failed:
                with contextlib.suppress(ssl.SSLError):
                    self._tls.unwrap()  # close_notify, for proxies that log its absence
                self._take_cipher()
            self._ws.send(self._cipher)
