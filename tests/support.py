"""What the test modules share besides fixtures (those are in conftest.py) and fake peers
(tests/peers/): the client's side of a tunnel, free ports, log checks, TLS files and
the command line.

Nothing here is a test module's own: a helper that one module alone uses stays there.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import re
import shutil
import socket
import ssl
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn, Union

import gevent.hub
import pytest

import gforward
import gforward.daemon
from tests.peers.fake_daemon import Peer, Script, accept_then_echo
from tests.peers.programs import READ_TIMEOUT, ROOT, Program, Programs, clean_env

if TYPE_CHECKING:
    import trustme

MARGIN = 2.0  # seconds allowed on top of a stated bound (a loaded CI machine)
IO_TIMEOUT = 10.0  # no test socket blocks longer than this, unless a test says otherwise
WAIT = 15.0  # how long a test waits for anything before failing (not a bound under test)
APPS = Path(__file__).parent / "apps"  # the app scripts, each run as a process of its own
# A test that runs over each way a tunnel is dialled: from the hub's callbacks (the
# daemon at an IP address) and in a greenlet (a name to look up first).
BOTH_DIALS = pytest.mark.parametrize("host", ["127.0.0.1", "localhost"],
                                     ids=["event-driven dial", "dial in a greenlet"])

Address = Union[tuple[str, int], str]  # ("127.0.0.1", port), or a unix socket's path


# A forwarder and its local side ---------------------------------------------------------


def forward(base_url: str, spec_target: str = "127.0.0.1:9",
            **options: object) -> gforward.Forwarder:
    """A forwarder with one loopback listener on a free port to `spec_target`."""
    fields: dict[str, object] = {"vm_name": "sbox-1", "token": ""}
    fields.update(options)
    specs = fields.pop("specs", [f"127.0.0.1:0:{spec_target}"])
    return gforward.start(base_url=base_url, specs=specs, **fields)


def local_address(where: gforward.Forwarder | gforward.Listener) -> Address:
    """Where a client connects to reach a listener (a forwarder's first one)."""
    listener = where.listeners[0] if isinstance(where, gforward.Forwarder) else where
    return ("127.0.0.1", listener.port) if listener.port else listener.local


def connect(where: gforward.Forwarder | gforward.Listener,
            timeout: float = IO_TIMEOUT) -> socket.socket:
    """A client connection to a listener (a forwarder's first one)."""
    address = local_address(where)
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        data = sock.recv(256 * 1024)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def read_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(min(n - len(data), 256 * 1024))
        assert chunk, f"EOF after {len(data)} of {n} bytes: {bytes(data[:100])!r}"
        data += chunk
    return bytes(data)


def echo_once(address: Address, payload: bytes, timeout: float = IO_TIMEOUT) -> bytes:
    """Connect, send `payload`, half-close, and read everything back."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_to_eof(sock)


def refused(where: gforward.Forwarder | gforward.Listener, payload: bytes = b"hello") -> bool:
    """Whether a tunnel fails: the client gets no byte back, only EOF or a reset."""
    try:
        return echo_once(local_address(where), payload) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError as exc:  # shutdown() after the reset arrived: ENOTCONN
        if exc.errno == errno.ENOTCONN:
            return True
        raise


def assert_closed_within(sock: socket.socket, seconds: float) -> None:
    """The local connection ends (EOF or reset) within `seconds`, without sending anything."""
    sock.settimeout(seconds)
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return
    except socket.timeout:
        pytest.fail(f"local connection still open after {seconds:g} s")
    assert data == b"", f"unexpected bytes from a failed tunnel: {data[:100]!r}"


def refused_then_echo_works(fwd: gforward.Forwarder, caplog: pytest.LogCaptureFixture,
                            *logged: str, secret: str) -> None:
    """First connection: closed and logged; second, on the same listener: a working tunnel."""
    with connect(fwd) as sock:
        sock.sendall(b"hello?")
        assert_closed_within(sock, IO_TIMEOUT)
    assert_logged(caplog, *logged)
    assert echo_once(local_address(fwd), b"next one works") == b"next one works"
    assert_secret_not_logged(caplog, secret)


def bug(message: str) -> Callable[..., NoReturn]:
    """A stand-in that raises RuntimeError(message) however it is called: a bug injected
    where the code under test calls it."""

    def broken(*args: object, **kwargs: object) -> NoReturn:
        raise RuntimeError(message)

    return broken


def wait_until(condition: Callable[[], object], timeout: float,
               sleep: Callable[[float], object] = time.sleep) -> bool:
    """Poll `condition` every 10 ms until it holds or `timeout` seconds pass; whether it
    held (the caller asserts that, or what it waited for).  `sleep=gevent.sleep` lets
    this thread's hub run meanwhile."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        sleep(0.01)
    return True


# Ports -----------------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    Ports from port 0 come from the ephemeral range, which any process's
    outgoing connections share: once we free one, another connection may take
    it at once, and a "the port is free again" check would fail for nothing.
    """
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    low = int(ephemeral[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def can_bind(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:port now.

    SO_REUSEADDR as servers (and gforward) set it: connections the forwarder
    closed linger in TIME_WAIT on that port, but a listener still holding it
    makes bind() fail even so.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen(1)
        except OSError:
            return False
        return True


@contextlib.contextmanager
def blackhole(host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
    """A loopback port that never answers a SYN; yields its number.

    An address that drops packets, made on loopback: a listener that never
    accepts, with a backlog of 0, whose accept queue is then filled.  The kernel
    drops the SYNs of every further connection, whose connect() retransmits until
    its own timeout, as towards a dead host.  Checked before it is handed out.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    queued: list[socket.socket] = []
    try:
        listener.bind((host, port))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(8):
            probe = socket.socket(family, socket.SOCK_STREAM)
            probe.settimeout(0.3)
            try:
                probe.connect((host, port))
            except socket.timeout:
                probe.close()
                break  # its SYN went unanswered: the queue is full
            queued.append(probe)  # it got in: one place less in the queue
        else:
            raise RuntimeError(f"{host}:{port} still accepts with a full backlog")
        yield port
    finally:
        for sock in queued:
            sock.close()
        listener.close()


def resolver_env(directory: Path, hosts: str) -> dict[str, str]:
    """Environment for a program whose name lookups are answered by the hosts-style text
    `hosts` alone (tests/resolver.py), written to a file in `directory`."""
    path = directory / "hosts"
    path.write_text(hosts)
    python_path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    return {"GEVENT_RESOLVER": "tests.resolver.HostsFile", "GFORWARD_TEST_HOSTS": str(path),
            "PYTHONPATH": python_path}


def ipv6_loopback() -> bool:
    """Whether this machine can bind ::1."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# Logs ------------------------------------------------------------------------------------


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The forwarder's own warnings (not the reference daemon's, on gforward.daemon)."""
    return [r.getMessage() for r in caplog.records
            if r.name == "gforward" and r.levelno >= logging.WARNING]


def assert_logged(caplog: pytest.LogCaptureFixture, *parts: str) -> str:
    """One gforward warning (or worse) holds every part; returns it."""
    messages = warnings_of(caplog)
    for message in messages:
        if all(part in message for part in parts):
            return message
    pytest.fail(f"no gforward warning holds {parts!r}; got {messages!r}")


def assert_secret_not_logged(caplog: pytest.LogCaptureFixture, secret: str) -> None:
    formatter = logging.Formatter()
    for record in caplog.records:
        text = formatter.format(record) + repr(record.args)
        assert secret not in text, f"token leaked into a log record: {text!r}"


# TLS -------------------------------------------------------------------------------------


def cert_files(ca: trustme.CA, directory: Path, *names: str) -> tuple[Path, Path]:
    """A certificate from `ca` for `names`: (chain file, key file) in `directory`."""
    cert = ca.issue_cert(*names)
    cert_file, key_file = directory / "daemon.pem", directory / "daemon.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return cert_file, key_file


def tls_daemon(ca: trustme.CA, directory: Path, *names: str) -> gforward.daemon.Daemon:
    """The reference daemon in this process, serving https with a certificate for `names`."""
    cert_file, key_file = cert_files(ca, directory, *names)
    return gforward.daemon.start(tls_cert=str(cert_file), tls_key=str(key_file))


def tls_script(ca: trustme.CA, names: list[str | None],
               then: Script = accept_then_echo) -> Script:
    """A FakeDaemon script that serves TLS as "localhost" (recording SNI), then runs `then`."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server)
    server.sni_callback = lambda _sock, name, _ctx: names.append(name)

    def tls(peer: Peer) -> None:
        peer.sock = server.wrap_socket(peer.sock, server_side=True)
        then(peer)

    return tls


# The command line ------------------------------------------------------------------------

CLI_LINE = re.compile(r"(\S+) -> (\S+) (\S+)")


def gforward_cli(programs: Programs, *args: str, env: dict[str, str] | None = None,
                 script: bool = False) -> Program:
    """`python -m gforward ARGS` (or the `gforward` console script) with only `env` set.

    The script is the one installed for this interpreter (a venv's bin/), not whatever
    `gforward` PATH holds: the tests run with a venv's python that need not be activated.
    """
    if script:
        scripts = sysconfig.get_path("scripts")
        found = shutil.which("gforward", path=scripts)
        assert found, f"no gforward console script in {scripts}: pip install -e ."
        command = [found]
    else:
        command = [sys.executable, "-m", "gforward"]
    return programs.run(*command, *args, env=clean_env(**(env or {})))


def announced_listeners(program: Program, count: int = 1) -> list[tuple[str, str, str]]:
    """The `local -> vm remote` lines of `count` listeners."""
    found = []
    for _ in range(count):
        line = program.readline()
        match = CLI_LINE.fullmatch(line)
        assert match, line
        local, vm, remote = match.groups()
        found.append((local, vm, remote))
    return found


def http_get(local: str, path: str = "/") -> str:
    """GET through a forwarded TCP port, bypassing any proxy settings."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{local}{path}", timeout=READ_TIMEOUT) as response:
        body: bytes = response.read()
    return body.decode()


def assert_cli_serves(program: Program, path: str) -> None:
    """The one listener `program` announces forwards a GET of `path` to conftest's
    `http_guest`."""
    [(local, _, _)] = announced_listeners(program)
    assert http_get(local, path) == f"guest says {path}"


@dataclass
class End:
    """How a local connection ended: "EOF" or "reset", the bytes before it, and when."""

    seen: str
    data: bytes
    at: float

    def describe(self) -> str:
        return f"{self.seen} after {len(self.data)} bytes" if self.data else self.seen


def watch_end(sock: socket.socket, timeout: float = WAIT) -> End:
    """Read until the connection ends; fail if it is still open after `timeout` seconds."""
    sock.settimeout(timeout)
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        return End("reset", bytes(data), time.monotonic())
    except socket.timeout:
        pytest.fail(f"the local connection was still open after {timeout:g} s")
    return End("EOF", bytes(data), time.monotonic())


class HubErrors:
    """Every error that reached a gevent hub's handle_error while installed."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._original = gevent.hub.Hub.handle_error

    def __enter__(self) -> HubErrors:
        original, errors = self._original, self.errors

        def handle_error(hub: Any, context: Any, kind: Any, value: Any, tb: Any) -> None:
            if not (isinstance(kind, type) and issubclass(kind, hub.NOT_ERROR)):
                errors.append(f"{context!r}: {kind.__name__}: {value}")
            original(hub, context, kind, value, tb)

        gevent.hub.Hub.handle_error = handle_error
        return self

    def __exit__(self, *exc_info: object) -> None:
        gevent.hub.Hub.handle_error = self._original
