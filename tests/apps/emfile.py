"""A forwarder in a process that runs out of file descriptors, so that accept() fails (EMFILE).

Run by tests/test_faults.py as a subprocess (plain process, no gevent patching):

    python tests/apps/emfile.py DAEMON_URL UPSTREAM

The token comes from SLICER_TOKEN.  The app starts a forwarder to UPSTREAM
with every gforward record going to stderr, runs one tunnel of its own (so
that lazy imports and the resolver's thread pool have their descriptors
already), then lowers RLIMIT_NOFILE so that exactly SPARE more descriptors
can be opened: two tunnels' worth (the accepted connection and the one to
the daemon, each).  A third client then makes accept() fail, until a tunnel
ends and frees its two.

It prints one JSON line, {"port": ..., "spare": ...}, serves until its
stdin closes, closes the forwarder and prints "closed".
"""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
import sys
import time

import gforward

SPARE = 4


def open_fds() -> set[int]:
    """The descriptors open now, less the one the listing itself used."""
    return {int(name) for name in os.listdir("/proc/self/fd")
            if os.path.lexists(f"/proc/self/fd/{name}")}


def lower_limit(spare: int) -> None:
    """Set RLIMIT_NOFILE so that exactly `spare` descriptor numbers below it are free."""
    in_use = open_fds()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = len(in_use)
    while limit - sum(fd < limit for fd in in_use) < spare:
        limit += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def main() -> int:
    url, upstream = sys.argv[1], sys.argv[2]
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    fwd = gforward.start(base_url=url, token=os.environ.get("SLICER_TOKEN", ""), vm_name="emfile",
                         specs=[f"127.0.0.1:0:{upstream}"], dial_timeout=5)
    port = fwd.listeners[0].port
    before = open_fds()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as warm:
        warm.sendall(b"warm")
        warm.shutdown(socket.SHUT_WR)
        while warm.recv(4096):
            pass
    deadline = time.monotonic() + 5
    while open_fds() - before and time.monotonic() < deadline:  # its sockets, closing
        time.sleep(0.01)
    lower_limit(SPARE)
    print(json.dumps({"port": port, "spare": SPARE}), flush=True)
    sys.stdin.read()  # until the test closes our stdin
    fwd.close()
    print("closed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
