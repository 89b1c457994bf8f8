"""TLS through `ssl.MemoryBIO`: the same objects serve the dial and the pump.

The dialling greenlet drives the handshake and the upgrade through a
`TLSChannel` as if it were a socket (`sendall`, `recv`, both cooperative
since the socket underneath is gevent's).  The event-driven pump then takes
its parts over: the SSLObject and its two BIOs never touch a socket, so they
never block a hub, whatever context class made them.  That is also why any
`ssl.SSLContext` works here, gevent's, the standard library's or a subclass
of either: its own `wrap_bio` is called.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

RECV_SIZE = 64 * 1024


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
