"""Binding listeners through gforward.start(): TCP ports, unix socket files, failed binds.

Every test here goes through the public API (start(), Forwarder.listeners,
close()), with the reference daemon and loopback echo guests from conftest,
and checks what is left on the machine afterwards: ports free again, socket
files removed (only ours), other people's files untouched.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator

import pytest

import gforward
import gforward.daemon
from tests.support import can_bind, echo_once, free_port

PAYLOAD = os.urandom(64 * 1024)


def is_listening(path: str) -> bool:
    """Whether something accepts connections on the unix socket at `path`."""
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(2)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


@pytest.fixture
def held_port() -> Iterator[tuple[socket.socket, int]]:
    """A loopback port the test holds listening for the whole test."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    try:
        yield sock, int(sock.getsockname()[1])
    finally:
        sock.close()


def start(daemon: gforward.daemon.Daemon, *specs: str) -> gforward.Forwarder:
    return gforward.start(base_url=daemon.url, vm_name="sbox-1", specs=list(specs))


def assert_socket_serves(path: str) -> os.stat_result:
    """A socket file is at `path`, and a tunnel through it works; returns its lstat()."""
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert echo_once(path, PAYLOAD) == PAYLOAD
    return st


# TCP listeners ---------------------------------------------------------------------------


def test_port_zero_is_resolved(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    spec = f"127.0.0.1:0:{echo_server}"
    with start(daemon, spec, spec) as fwd:
        first, second = fwd.listeners
        for listener in (first, second):
            assert listener.spec == spec
            assert 0 < listener.port < 65536
            assert listener.local == f"127.0.0.1:{listener.port}"
            assert listener.remote == echo_server
            assert not can_bind(listener.port)
        assert first.port != second.port
        assert echo_once(("127.0.0.1", second.port), PAYLOAD) == PAYLOAD


def test_fixed_port_and_short_spec(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    port = free_port()
    with start(daemon, f"127.0.0.1:{port}:{echo_server}") as fwd:
        (listener,) = fwd.listeners
        assert (listener.local, listener.port) == (f"127.0.0.1:{port}", port)
        assert echo_once(("127.0.0.1", port), PAYLOAD) == PAYLOAD
    assert can_bind(port)


def test_listener_is_frozen(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    with start(daemon, f"127.0.0.1:0:{echo_server}") as fwd, pytest.raises(AttributeError):
        fwd.listeners[0].port = 1  # type: ignore[misc]


def test_port_taken_fails_and_unbinds_everything(
    daemon: gforward.daemon.Daemon,
    echo_server: str,
    short_tmp: str,
    held_port: tuple[socket.socket, int],
) -> None:
    _, taken = held_port
    first = free_port()
    sock_path = os.path.join(short_tmp, "first.sock")
    specs = [
        f"127.0.0.1:{first}:{echo_server}",
        f"{sock_path}:{echo_server}",
        f"127.0.0.1:{taken}:{echo_server}",
    ]
    with pytest.raises(gforward.ForwardError) as info:
        start(daemon, *specs)
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == errno.EADDRINUSE
    assert str(taken) in str(info.value)
    assert can_bind(first), "the first listener was left bound"
    assert not os.path.lexists(sock_path), "the unix socket file start() made was left behind"


def test_port_taken_as_first_spec(
    daemon: gforward.daemon.Daemon, echo_server: str, held_port: tuple[socket.socket, int]
) -> None:
    held, taken = held_port
    with pytest.raises(gforward.ForwardError) as info:
        start(daemon, f"127.0.0.1:{taken}:{echo_server}")
    assert isinstance(info.value.__cause__, OSError)
    held.settimeout(5)
    with socket.create_connection(("127.0.0.1", taken), timeout=5):
        conn, _ = held.accept()  # the test's socket still owns the port
        conn.close()


def test_forwarder_can_be_started_again_after_failure(
    daemon: gforward.daemon.Daemon, echo_server: str, held_port: tuple[socket.socket, int]
) -> None:
    _, taken = held_port
    port = free_port()
    specs = [f"127.0.0.1:{port}:{echo_server}", f"127.0.0.1:{taken}:{echo_server}"]
    with pytest.raises(gforward.ForwardError):
        start(daemon, *specs)
    with start(daemon, specs[0]) as fwd:
        assert fwd.listeners[0].port == port
        assert echo_once(("127.0.0.1", port), PAYLOAD) == PAYLOAD


# Unix listeners --------------------------------------------------------------------------


def test_unix_listener_fields_and_mode(
    daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "web.sock")
    spec = f"{path}:{echo_server}"
    with start(daemon, spec) as fwd:
        (listener,) = fwd.listeners
        assert listener == gforward.Listener(spec=spec, local=path, remote=echo_server, port=0)
        st = assert_socket_serves(path)
        assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
        assert st.st_uid == os.getuid()
    assert not os.path.lexists(path), "socket file not removed on close()"


def test_unix_mode_ignores_a_loose_umask(
    daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "loose.sock")
    old = os.umask(0)
    try:
        fwd = start(daemon, f"{path}:{echo_server}")
    finally:
        os.umask(old)
    with fwd:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600


def test_unix_relative_path_is_made_absolute(
    daemon: gforward.daemon.Daemon,
    echo_server: str,
    short_tmp: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(short_tmp)
    with start(daemon, f"./rel.sock:{echo_server}") as fwd:
        local = fwd.listeners[0].local
        assert os.path.isabs(local)
        assert os.path.samefile(local, os.path.join(short_tmp, "rel.sock"))
        assert echo_once(local, PAYLOAD) == PAYLOAD
    assert not os.path.lexists(os.path.join(short_tmp, "rel.sock"))


def test_unix_parent_directory_is_created(
    daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "a", "b", "fwd.sock")
    with start(daemon, f"{path}:{echo_server}"):
        assert os.path.isdir(os.path.dirname(path))
        assert_socket_serves(path)
    assert not os.path.lexists(path)


def test_stale_socket_file_is_replaced(
    daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # the file stays; nothing listens on it
    assert stat.S_ISSOCK(os.lstat(path).st_mode) and not is_listening(path)
    with start(daemon, f"{path}:{echo_server}"):
        st = assert_socket_serves(path)
        assert stat.S_IMODE(st.st_mode) == 0o600
    assert not os.path.lexists(path)


def test_live_socket_is_refused_and_left_alone(
    daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "live.sock")
    first = free_port()
    other = socket.socket(socket.AF_UNIX)
    try:
        other.bind(path)
        other.listen(8)
        inode = os.lstat(path).st_ino
        with pytest.raises(gforward.ForwardError) as info:
            start(daemon, f"127.0.0.1:{first}:{echo_server}", f"{path}:{echo_server}")
        assert path in str(info.value)
        assert os.lstat(path).st_ino == inode, "someone else's live socket was replaced"
        assert is_listening(path)
        assert can_bind(first)
    finally:
        other.close()


def test_regular_file_is_refused_and_untouched(
    daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "notes.txt")
    with open(path, "wb") as f:
        f.write(b"precious data\n")
    os.chmod(path, 0o644)
    before = os.lstat(path)
    first = free_port()
    made = os.path.join(short_tmp, "made.sock")
    specs = [f"127.0.0.1:{first}:{echo_server}", f"{made}:{echo_server}", f"{path}:{echo_server}"]
    with pytest.raises(gforward.ForwardError) as info:
        start(daemon, *specs)
    message = str(info.value)
    assert path in message
    assert "not a socket" in message
    after = os.lstat(path)
    assert stat.S_ISREG(after.st_mode)
    assert (after.st_ino, after.st_mode, after.st_size) == (before.st_ino, before.st_mode,
                                                            before.st_size)
    with open(path, "rb") as f:
        assert f.read() == b"precious data\n"
    assert not os.path.lexists(made), "the unix socket file start() made was left behind"
    assert can_bind(first)


def test_directory_at_path_is_refused(
    daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "adir")
    os.mkdir(path)
    with pytest.raises(gforward.ForwardError):
        start(daemon, f"{path}:{echo_server}")
    assert os.path.isdir(path)


def test_close_leaves_a_recreated_socket_alone(
    daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "shared.sock")
    fwd = start(daemon, f"{path}:{echo_server}")
    other = socket.socket(socket.AF_UNIX)
    try:
        os.unlink(path)  # someone removes ours and binds their own at the same path
        other.bind(path)
        other.listen(8)
        inode = os.lstat(path).st_ino
        fwd.close()
        assert os.path.lexists(path), "close() removed a socket file that is not ours"
        assert os.lstat(path).st_ino == inode
        assert is_listening(path)
    finally:
        fwd.close()
        other.close()


def test_close_leaves_a_regular_file_at_the_path_alone(
    daemon: gforward.daemon.Daemon, echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "swap.sock")
    fwd = start(daemon, f"{path}:{echo_server}")
    try:
        os.unlink(path)
        with open(path, "w") as f:
            f.write("not a socket")
    finally:
        fwd.close()
    with open(path) as f:
        assert f.read() == "not a socket"


def test_unix_socket_file_removed_after_tunnels(
    daemon: gforward.daemon.Daemon, unix_echo_server: str, short_tmp: str
) -> None:
    path = os.path.join(short_tmp, "u2u.sock")
    with start(daemon, f"{path}:{unix_echo_server}") as fwd:
        assert fwd.listeners[0].remote == f"unix:{unix_echo_server}"
        for _ in range(3):
            assert echo_once(path, PAYLOAD) == PAYLOAD
    assert not os.path.lexists(path)
    assert os.path.lexists(unix_echo_server), "the guest's socket must not be touched"
