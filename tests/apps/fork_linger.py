"""A fork while an ended tunnel lingers, in a plain process.

The guest answers and half-closes while the client still uploads, so the
daemon closes the tunnel; the client has stopped reading, so the forwarder
keeps its local socket until the client has acknowledged the whole reply.  A
child forked then must let go of that socket at once: once the client reads
again, it gets the whole reply, and its upload learns that it was cut (a
reset) though the child lives on: the child's copy would keep the connection
open, the upload waiting, until the child exits.  Exit 0 only if it does.
With `removing`, the fork comes while the listener is being removed with a
drain, which waits for that tunnel: a listener on its way out is let go of too.

    python tests/apps/fork_linger.py [removing]
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import warnings

import support

import gforward
import gforward.daemon

# Python 3.12+ warns on fork() in a process with threads (the hub thread): the point here.
warnings.filterwarnings("ignore", r".*use of fork\(\) may lead to deadlocks",
                        DeprecationWarning)

REPLY = os.urandom(1 << 20)  # far more than the client's socket takes while it does not read
CHILD_LIVES = 8.0  # seconds: the client must see its end well before the child exits


def answer_early(listener: socket.socket) -> None:
    """The guest: the whole reply and a half-close at once, then the upload dropped."""
    sock, _ = listener.accept()
    with sock:
        sock.sendall(REPLY)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 20):
            pass


def upload(sock: socket.socket, cut: threading.Event) -> None:
    block = b"u" * (64 << 10)
    try:
        while True:
            sock.sendall(block)
    except OSError:  # the reset: the upload was cut
        cut.set()


def main(removing: bool) -> int:
    support.watchdog(30)
    problems: list[str] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    threading.Thread(target=answer_early, args=(listener,), daemon=True).start()
    daemon = gforward.daemon.start()
    fwd = gforward.start(base_url=daemon.url, vm_name="fork",
                         specs=[f"127.0.0.1:0:127.0.0.1:{listener.getsockname()[1]}"])
    client = socket.create_connection(("127.0.0.1", fwd.listeners[0].port), timeout=20)
    cut = threading.Event()
    threading.Thread(target=upload, args=(client, cut), daemon=True).start()
    received = len(client.recv(1 << 16))
    deadline = time.monotonic() + 10
    while fwd.stats().tunnels_open and time.monotonic() < deadline:  # ended, still lingering
        time.sleep(0.01)
    if fwd.stats().tunnels_open or not any(door.connections for door in fwd._doors):
        problems.append("the tunnel did not end and linger: nothing was tested")
        return support.verdict(problems)
    if removing:  # the drain waits for the lingering tunnel, past the fork
        threading.Thread(target=fwd.remove, args=(fwd.listeners[0], 6.0), daemon=True).start()
        while fwd.listeners and time.monotonic() < deadline:
            time.sleep(0.01)
    pid = os.fork()
    if pid == 0:
        time.sleep(CHILD_LIVES)
        os._exit(0)
    try:
        began = time.monotonic()
        end = "eof"
        try:
            while data := client.recv(1 << 20):
                received += len(data)
        except OSError:
            end = "reset"
        told = cut.wait(CHILD_LIVES / 2)
        support.say(f"forked while the tunnel lingered: the client got {received} of "
                    f"{len(REPLY)} bytes, then {end}; its upload was told of the cut: {told}, "
                    f"{support.elapsed(began)} after it read again")
        if received != len(REPLY):
            problems.append("the reply was cut short")
        if not told:
            problems.append("the child held the lingering connection open")
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        client.close()
        fwd.close()
        daemon.close()
        listener.close()
    return support.verdict(problems)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] == ["removing"]))
