"""The `gforward` command run as a user runs it: flags, environment, output, signals, exit codes.

The path under test is CLI -> reference daemon (subprocess) -> guest HTTP
server, all on loopback.  Host names in URLs that must never be dialled end
in `.invalid` (RFC 2606).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers.programs import READ_TIMEOUT, Program, Programs
from tests.support import (
    announced_listeners,
    assert_cli_serves,
    closed_port,
    gforward_cli,
    http_get,
)

TOKEN = "tok-5e2b9c-never-print-me"


@pytest.fixture(scope="module")
def daemon_url() -> Iterator[str]:
    """One reference daemon (a subprocess, token required) for the whole module."""
    every = Programs()
    try:
        _, [url] = every.daemon("--listen", "127.0.0.1:0", "--token", TOKEN)
        yield url
    finally:
        every.close()


def assert_secret_kept(program: Program, secret: str = TOKEN) -> None:
    assert secret not in program.stdout
    assert secret not in program.stderr


# Forwarding -----------------------------------------------------------------


def test_forwards_http_through_the_reference_daemon(programs: Programs, daemon_url: str,
                                                    http_guest: str) -> None:
    cli = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}", "--url", daemon_url,
                       "--token", TOKEN)
    [(local, vm, remote)] = announced_listeners(cli)
    assert re.fullmatch(r"127\.0\.0\.1:[1-9]\d*", local)
    assert (vm, remote) == ("sbox-1", http_guest)
    assert http_get(local, "/hello?x=1") == "guest says /hello?x=1"
    assert http_get(local, "/again") == "guest says /again"
    assert cli.stop(signal.SIGINT) == 0
    assert cli.stderr == ""  # loopback everywhere: no warning; tunnels fine: no log
    assert_secret_kept(cli)


def test_line_format_is_exact(programs: Programs, daemon_url: str, http_guest: str) -> None:
    port = closed_port()
    cli = gforward_cli(programs, "sbox-1", f"127.0.0.1:{port}:{http_guest}", "--url", daemon_url)
    assert cli.readline() == f"127.0.0.1:{port} -> sbox-1 {http_guest}"


def test_environment_variables(programs: Programs, daemon_url: str, http_guest: str) -> None:
    cli = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}",
                       env={"SLICER_URL": daemon_url, "SLICER_TOKEN": TOKEN})
    assert_cli_serves(cli, "/env")
    assert cli.stop() == 0
    assert_secret_kept(cli)


def test_flags_take_precedence_over_environment(programs: Programs, daemon_url: str,
                                                http_guest: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    wrong = {"SLICER_URL": f"http://127.0.0.1:{closed_port()}", "SLICER_TOKEN": "wrong",
             "SLICER_TOKEN_FILE": str(tmp_path / "missing")}
    by_token = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}", "--url", daemon_url,
                            "--token", TOKEN, env=wrong)
    by_file = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}", "--url", daemon_url,
                           "--token-file", str(token_file), env=wrong)
    for cli in (by_token, by_file):
        assert_cli_serves(cli, "/flag")
        assert cli.stop() == 0
        assert_secret_kept(cli)


@pytest.mark.parametrize("via", ["flag", "env"])
def test_token_file_with_tilde_and_whitespace(programs: Programs, daemon_url: str, http_guest: str,
                                              tmp_path: Path, via: str) -> None:
    (tmp_path / ".slicer").mkdir()
    (tmp_path / ".slicer" / "token").write_text(f"\n  {TOKEN} \n\n")
    env = {"HOME": str(tmp_path), "SLICER_URL": daemon_url}
    if via == "flag":  # a literal ~, as when the shell does not expand it (--token-file=~/...)
        cli = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}",
                           "--token-file=~/.slicer/token", env=env)
    else:
        cli = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}",
                           env={**env, "SLICER_TOKEN_FILE": "~/.slicer/token"})
    assert_cli_serves(cli, "/file")
    assert cli.stop() == 0
    assert_secret_kept(cli)


def test_several_specs_positional_and_dash_l(programs: Programs, daemon_url: str,
                                             http_guest: str, short_tmp: str) -> None:
    sock_path = os.path.join(short_tmp, "web.sock")
    cli = gforward_cli(programs, "sbox-1", "-L", f"127.0.0.1:0:{http_guest}",
                       f"{sock_path}:{http_guest}", "-L", f"127.0.0.1:0:{http_guest}",
                       "--url", daemon_url, "--token", TOKEN)
    lines = announced_listeners(cli, 3)
    # positional SPECs first, then -L ones, each in the order given
    assert lines[0][0] == sock_path
    assert all(vm == "sbox-1" and remote == http_guest for _, vm, remote in lines)
    for local, _, _ in lines[1:]:
        assert http_get(local, "/tcp") == "guest says /tcp"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(READ_TIMEOUT)
        sock.connect(sock_path)
        sock.sendall(b"GET /unix HTTP/1.0\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(4096), b""))
    assert answer.endswith(b"guest says /unix")
    assert cli.stop() == 0
    assert not os.path.exists(sock_path)


def test_console_script(programs: Programs, daemon_url: str, http_guest: str) -> None:
    cli = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}", "--url", daemon_url,
                       "--token", TOKEN, script=True)
    assert_cli_serves(cli, "/script")
    assert cli.stop(signal.SIGINT) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_exits_0_on_signal_with_a_tunnel_open(programs: Programs, daemon_url: str,
                                              http_guest: str, sig: int) -> None:
    cli = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}", "--url", daemon_url,
                       "--token", TOKEN)
    [(local, _, _)] = announced_listeners(cli)
    host, port = local.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=READ_TIMEOUT):
        assert cli.stop(sig) == 0
    assert "Traceback" not in cli.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=READ_TIMEOUT).close()


def test_help_and_version(programs: Programs) -> None:
    helped = gforward_cli(programs, "--help")
    assert helped.finish() == 0
    assert "SLICER_URL" in helped.stdout and "-L SPEC" in helped.stdout
    version = gforward_cli(programs, "--version")
    assert version.finish() == 0
    assert version.stdout.startswith("gforward ")


# Logging --------------------------------------------------------------------


def test_verbose_shows_tunnel_events(programs: Programs, daemon_url: str, http_guest: str) -> None:
    cli = gforward_cli(programs, "-v", "sbox-1", f"127.0.0.1:0:{http_guest}", "--url", daemon_url,
                       "--token", TOKEN)
    assert_cli_serves(cli, "/v")
    assert cli.stop() == 0
    assert re.search(rf"tunnel \S+ -> {http_guest} opened", cli.stderr), cli.stderr
    assert re.search(rf"tunnel \S+ -> {http_guest} closed", cli.stderr), cli.stderr
    assert_secret_kept(cli)


def test_failures_show_without_verbose_and_never_the_token(
    programs: Programs, daemon_url: str, http_guest: str
) -> None:
    secret = "wrong-token-4d1f-never-print-me"
    cli = gforward_cli(programs, "sbox-1", f"127.0.0.1:0:{http_guest}", "--url", daemon_url,
                       "--token", secret)
    [(local, _, _)] = announced_listeners(cli)
    host, port = local.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=READ_TIMEOUT) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):  # refused: closed without a byte
            assert sock.recv(4096) == b""
    assert cli.stop() == 0
    assert "401" in cli.stderr and "failed" in cli.stderr, cli.stderr
    assert "opened" not in cli.stderr  # per-tunnel events need -v
    assert_secret_kept(cli, secret)


# Warnings -------------------------------------------------------------------


def _warnings(program: Program) -> list[str]:
    return [line for line in program.stderr.splitlines() if "warning" in line]


def test_wildcard_listener_warns_once(programs: Programs) -> None:
    # nothing answers behind these listeners: the daemon URL is a closed loopback port
    cli = gforward_cli(programs, "sbox-1", "0:127.0.0.1:1", "0.0.0.0:0:127.0.0.1:2",
                       "--url", f"http://127.0.0.1:{closed_port()}")
    lines = announced_listeners(cli, 2)
    assert all(local.startswith("0.0.0.0:") for local, _, _ in lines)
    assert cli.stop() == 0
    [warning] = _warnings(cli)
    assert "all interfaces" in warning
    assert all(local in warning for local, _, _ in lines)
    assert cli.stderr.count("all interfaces") == 1, cli.stderr  # not the library's lines too


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this Python")
def test_ipv6_wildcard_listener_warns(programs: Programs) -> None:
    try:
        socket.socket(socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 on this machine")
    cli = gforward_cli(programs, "sbox-1", "[::]:0:127.0.0.1:1",
                       "--url", f"http://127.0.0.1:{closed_port()}")
    [(local, _, _)] = announced_listeners(cli)
    assert local.startswith("[::]:")
    assert cli.stop() == 0
    [warning] = _warnings(cli)
    assert "all interfaces" in warning
    assert cli.stderr.count("all interfaces") == 1, cli.stderr


def test_token_over_plain_http_to_another_host_warns(programs: Programs) -> None:
    # the forwarder dials only when a local connection arrives: nothing is resolved here
    cli = gforward_cli(programs, "sbox-1", "127.0.0.1:0:127.0.0.1:80",
                       "--url", "http://slicer.invalid:8080", "--token", TOKEN)
    announced_listeners(cli)
    assert cli.stop() == 0
    [warning] = _warnings(cli)
    assert "slicer.invalid" in warning and "https" in warning
    assert_secret_kept(cli)


@pytest.mark.parametrize(("url", "token"), [
    ("http://127.0.0.1:8080", TOKEN),
    ("http://localhost:8080/prefix", TOKEN),
    ("http://[::1]:8080", TOKEN),
    ("https://slicer.invalid", TOKEN),
    ("http://slicer.invalid:8080", ""),
    ("unix:///run/slicer/slicer.sock", TOKEN),
])
def test_no_warning_when_the_token_stays_safe(programs: Programs, url: str, token: str) -> None:
    args = ["sbox-1", "127.0.0.1:0:127.0.0.1:80", "--url", url]
    cli = gforward_cli(programs, *args, *(["--token", token] if token else []))
    announced_listeners(cli)
    assert cli.stop() == 0
    assert cli.stderr == ""


# Exit codes -----------------------------------------------------------------


@pytest.mark.parametrize(("args", "problem"), [
    ([], "required: VM"),
    (["sbox-1"], "no SPEC"),
    (["sbox-1", "nonsense"], "invalid spec 'nonsense'"),
    (["sbox-1", "127.0.0.1:0:127.0.0.1:80", "127.0.0.1:70000:127.0.0.1:80"], "70000"),
    (["", "127.0.0.1:0:127.0.0.1:80"], "vm_name is empty"),
    (["sbox-1", "127.0.0.1:0:127.0.0.1:80", "--url", "ftp://x"], "invalid base URL"),
    (["sbox-1", "127.0.0.1:0:127.0.0.1:80", "--dial-timeout", "0"], "--dial-timeout"),
    (["sbox-1", "127.0.0.1:0:127.0.0.1:80", "--dial-timeout", "soon"], "--dial-timeout"),
    (["sbox-1", "127.0.0.1:0:127.0.0.1:80", "--token", TOKEN, "--token-file", "f"],
     "not allowed with"),
    (["sbox-1", "127.0.0.1:0:127.0.0.1:80", "--bogus"], "--bogus"),
])
def test_exits_2_for_bad_arguments(programs: Programs, args: list[str], problem: str) -> None:
    env = {} if "--url" in args else {"SLICER_URL": "http://127.0.0.1:9"}
    cli = gforward_cli(programs, *args, env=env)
    assert cli.finish() == 2
    assert cli.stdout == ""
    [error] = [line for line in cli.stderr.splitlines() if "error" in line]
    assert error.startswith("gforward: error: ") and problem in error, cli.stderr
    assert "Traceback" not in cli.stderr
    assert_secret_kept(cli)


def test_exits_2_without_a_url(programs: Programs) -> None:
    cli = gforward_cli(programs, "sbox-1", "127.0.0.1:0:127.0.0.1:80",
                       env={"SLICER_URL": ""})
    assert cli.finish() == 2
    assert cli.stderr.splitlines()[-1] == \
        "gforward: error: no daemon URL: pass --url or set SLICER_URL"


@pytest.mark.parametrize("content", [None, "", " \n\t\n"])
@pytest.mark.parametrize("via", ["flag", "env"])
def test_exits_2_for_a_missing_or_empty_token_file(programs: Programs, tmp_path: Path,
                                                   content: str | None, via: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    args = ["sbox-1", "127.0.0.1:0:127.0.0.1:80", "--url", "http://127.0.0.1:9"]
    if via == "flag":
        cli = gforward_cli(programs, *args, "--token-file", str(path))
    else:
        cli = gforward_cli(programs, *args, env={"SLICER_TOKEN_FILE": str(path)})
    assert cli.finish() == 2
    last = cli.stderr.splitlines()[-1]
    assert str(path) in last
    assert ("No such file" if content is None else "is empty") in last


def test_exits_1_when_the_port_is_in_use(programs: Programs) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cli = gforward_cli(programs, "sbox-1", "127.0.0.1:0:127.0.0.1:80",
                           f"127.0.0.1:{port}:127.0.0.1:80", "--url", "http://127.0.0.1:9")
        assert cli.finish() == 1
    assert cli.stdout == ""  # all or nothing: the first listener was closed again
    [line] = cli.stderr.splitlines()
    assert f"127.0.0.1:{port}" in line and "Address already in use" in line


def test_exits_1_when_a_unix_path_is_taken(programs: Programs, short_tmp: str) -> None:
    path = os.path.join(short_tmp, "not-a-socket")
    Path(path).write_text("keep me")
    cli = gforward_cli(programs, "sbox-1", f"{path}:127.0.0.1:80", "--url", "http://127.0.0.1:9")
    assert cli.finish() == 1
    [line] = cli.stderr.splitlines()
    assert path in line and "not a socket" in line
    assert Path(path).read_text() == "keep me"
