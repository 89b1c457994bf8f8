"""close() from inside the forwarder's own hub, in a plain (unpatched) process.

In a plain process the only app code that runs in gforward's hub thread is a
logging handler.  This one closes the forwarder when a tunnel fails, as an
app might to stop after the first error.  close() should then return
normally (the contract: "safe from any greenlet or thread") and the process
should exit 0.  Prints what happened; exit 1 if close() misbehaved.
"""

from __future__ import annotations

import logging
import socket
import sys
import time

import gforward

outcome: list[str] = []


class CloseOnFailure(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.fwd: gforward.Forwarder | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if "failed" not in record.getMessage() or self.fwd is None:
            return
        began = time.monotonic()
        try:
            self.fwd.close()
        except BaseException as exc:
            outcome.append(f"close() raised {type(exc).__name__} "
                           f"after {time.monotonic() - began:.1f} s")
            raise
        outcome.append(f"close() returned after {time.monotonic() - began:.1f} s")


def main() -> int:
    handler = CloseOnFailure()
    logger = logging.getLogger("close_in_hub")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    with socket.socket() as probe:  # a daemon address where nothing listens
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    fwd = gforward.start(base_url=f"http://127.0.0.1:{dead}", vm_name="vm",
                         specs=["127.0.0.1:0:127.0.0.1:9"], logger=logger)
    handler.fwd = fwd
    with socket.create_connection(("127.0.0.1", fwd.listeners[0].port), timeout=10) as client:
        client.recv(1)
    closed = fwd.wait(15)
    print(f"closed: {closed}")
    print(f"handler: {outcome}", flush=True)
    fwd.close()
    ok = closed and len(outcome) == 1 and outcome[0].startswith("close() returned")
    print("ok" if ok else "FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
