"""The columns of a run, and the processes behind them.

A column is one way to reach the guest: `direct` (the limit), `process` (the
`gforward` command line), `app` (gforward.start() inside the app process that
also runs the load: its tunnels in a hub thread of the app, isolation="thread"),
`isolated` (the same with isolation="process": the tunnels in a helper process
that start() launches) and one per `--peer NAME=COMMAND`. Forwarders of the
`process` and peer columns are commands with placeholders, started the same
way: the benchmark picks a free port, passes the spec `127.0.0.1:PORT:GUEST`
and waits until that port listens, whatever the program prints. The daemon is
a command too (`--daemon`), so is the https one (`--tls-daemon`).
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shlex
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.children import BenchError, Child, Children, child_argv

VM = "bench"
PROCESS_COMMAND = "{python} -m gforward {vm} {spec} --url {url} --token-file {token_file}"
REFERENCE_DAEMON = "{python} -m gforward.daemon --listen {listen} --token-file {token_file}"
REFERENCE_TLS_DAEMON = REFERENCE_DAEMON + " --tls-cert {tls_cert} --tls-key {tls_key}"
FORWARDER_PLACEHOLDERS = ("python", "url", "token", "token_file", "vm", "spec", "port", "guest")
DAEMON_PLACEHOLDERS = ("python", "listen", "port", "token", "token_file", "tls_cert", "tls_key")
START_TIMEOUT = 30.0  # for a program to listen


@dataclass(frozen=True)
class Column:
    """One column of the table."""

    key: str  # "direct", "process", "app", "isolated", or "peer:NAME"
    title: str
    command: str = ""  # the forwarder's command line (process and peer columns)
    isolation: str = ""  # Options.isolation of a forwarder the app starts (in-app columns)

    @property
    def is_peer(self) -> bool:
        return self.key.startswith("peer:")

    @property
    def in_app(self) -> bool:
        """Whether the app starts this column's forwarder with gforward.start()."""
        return bool(self.isolation)


DIRECT = Column("direct", "direct")
PROCESS = Column("process", "gforward (process)", PROCESS_COMMAND)
APP = Column("app", "gforward (in-app)", isolation="thread")
ISOLATED = Column("isolated", "gforward (in-app, isolated)", isolation="process")
BUILTIN = (DIRECT, PROCESS, APP, ISOLATED)


def peer_column(text: str) -> Column:
    """A `--peer NAME=COMMAND` argument as a column; ValueError says what is wrong."""
    name, sep, command = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[\w.+-]+", name) or not command.strip():
        raise ValueError(f"--peer takes NAME=COMMAND (NAME of letters, digits, . _ + -): {text!r}")
    check_placeholders(command, FORWARDER_PLACEHOLDERS, "--peer")
    return Column(f"peer:{name}", name, command)


def check_placeholders(template: str, allowed: tuple[str, ...], option: str) -> None:
    unknown = sorted(set(re.findall(r"\{(\w+)\}", template)) - set(allowed))
    if unknown:
        raise ValueError(f"{option}: unknown placeholder(s) {', '.join(unknown)};"
                         f" known: {', '.join('{' + a + '}' for a in allowed)}")
    try:
        shlex.split(template)
    except ValueError as exc:
        raise ValueError(f"{option}: {exc}: {template!r}") from exc


def expand(template: str, values: dict[str, str]) -> list[str]:
    """argv of a command template: split as a shell would (no shell runs), then each
    `{name}` filled in; other braces are left alone."""
    return [re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), word)
            for word in shlex.split(template)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Daemon:
    """A daemon of the run (the reference one, one swapped in, or the frames daemon)."""

    url: str
    child: Child


@dataclass
class Endpoint:
    """Where one column's load goes, and which process is its forwarder."""

    column: Column
    addr: tuple[str, int]
    daemon: Daemon | None = None  # None for direct
    forwarder: Child | None = None  # process and peer columns
    app: Child | None = None  # in-app: the app runs the load itself
    name: str = ""  # the app's name for its forwarder
    helper: int = 0  # isolated: the pid of the forwarder's helper process


class Processes:
    """Starts the run's processes (all of them stopped with `children`)."""

    def __init__(self, children: Children, *, deadline_at: float, nofile: int,
                 io_timeout: float, values: dict[str, str]) -> None:
        self.children = children
        self.deadline_at = deadline_at
        self.nofile = nofile
        self.io_timeout = io_timeout
        self.values = {"python": sys.executable, "vm": VM, **values}  # token, token_file, tls_*

    def ours(self, module: str, name: str) -> Child:
        return self.children.spawn(name, child_argv(module, self.deadline_at, self.nofile,
                                                    self.io_timeout), talks=True)

    def guest(self) -> tuple[Child, tuple[str, int]]:
        child = self.ours("guest", "guest")
        match = child.expect(r"^guest (\S+):(\d+)$", START_TIMEOUT)
        return child, (match.group(1), int(match.group(2)))

    def daemon(self, template: str, name: str, *, tls: bool = False) -> Daemon:
        port = free_port()
        values = {**self.values, "listen": f"127.0.0.1:{port}", "port": str(port)}
        child = self.listening(name, expand(template, values), port)
        return Daemon(f"{'https' if tls else 'http'}://127.0.0.1:{port}", child)

    def listening(self, name: str, argv: list[str], port: int) -> Child:
        """A foreign command, once it listens on `port` (stopped at once if it does not)."""
        child = self.children.spawn(name, argv, talks=False)
        try:
            child.wait_listening(port, START_TIMEOUT)
        except BenchError:
            self.children.retire(child)
            raise
        return child

    def frames_daemon(self) -> Daemon:
        child = self.ours("framesdaemon", "frames-daemon")
        url = child.expect(r"^listening on (\S+)$", START_TIMEOUT).group(1)
        return Daemon(url, child)

    def app(self, name: str) -> Child:
        child = self.ours("app", name)
        child.expect(r"^BENCH ", START_TIMEOUT)
        return child

    @contextlib.contextmanager
    def fresh_app(self, name: str) -> Iterator[Child]:
        """An app of its own for one measurement, retired after it."""
        app = self.app(name)
        try:
            yield app
        finally:
            self.children.retire(app)

    def open(self, column: Column, daemon: Daemon | None, guest: tuple[str, int], label: str,
             app: Child | None = None) -> Endpoint:
        """`column`'s way to the guest through `daemon`; for an in-app column, a forwarder
        inside `app` (which must be given), with that column's isolation."""
        target = f"{guest[0]}:{guest[1]}"
        if column.key == "direct" or daemon is None:
            return Endpoint(column, guest)
        if column.in_app:
            assert app is not None
            name = f"{label}-{column.key}"
            answer = app.request({"op": "forward", "name": name, "url": daemon.url,
                                  "spec": f"127.0.0.1:0:{target}",
                                  "token": self.values.get("token", ""),
                                  "isolation": column.isolation}, START_TIMEOUT)
            return Endpoint(column, ("127.0.0.1", int(answer["port"])), daemon, app=app,
                            name=name, helper=int(answer["helper"]))
        port = free_port()
        values = {**self.values, "url": daemon.url, "spec": f"127.0.0.1:{port}:{target}",
                  "port": str(port), "guest": target}
        child = self.listening(f"{column.title}-{label}", expand(column.command, values), port)
        return Endpoint(column, ("127.0.0.1", port), daemon, forwarder=child)

    def close(self, endpoint: Endpoint) -> None:
        if endpoint.forwarder is not None:
            self.children.retire(endpoint.forwarder)
        elif endpoint.app is not None and endpoint.name:
            endpoint.app.request({"op": "unforward", "name": endpoint.name}, START_TIMEOUT)


def credentials(directory: Path) -> dict[str, str]:
    """A fresh token, and a file holding it: {token} and {token_file}."""
    token = secrets.token_hex(16)
    path = directory / "token"
    path.write_text(token + "\n")
    return {"token": token, "token_file": str(path)}


def make_certificates(directory: Path) -> dict[str, str]:
    """A CA and a certificate for 127.0.0.1 and localhost (trustme, of the test extra):
    the files behind {tls_cert} and {tls_key}, and the CA bundle ("ca")."""
    try:
        import trustme
    except ImportError as exc:
        raise BenchError("the tls scenario needs trustme (pip install -e '.[test]')") from exc
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files: dict[str, Any] = {"tls_cert": directory / "server-chain.pem",
                             "tls_key": directory / "server-key.pem", "ca": directory / "ca.pem"}
    cert.private_key_pem.write_to_path(str(files["tls_key"]))
    files["tls_cert"].write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    ca.cert_pem.write_to_path(str(files["ca"]))
    return {key: str(path) for key, path in files.items()}
