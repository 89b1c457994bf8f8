"""The helper process of a forwarder started with isolation="process".

    python -m gforward.helper FD

FD is one end of a unix socket pair; the app holds the other (`isolated.py`).
Over it, one JSON document per line: first the options, answered with the
listeners bound (or the error that stopped them); then requests, each
answered by id, from a thread of its own so that a long one (a drain, a wait
for the guest) does not hold up the rest; and the forwarder's log records,
which the app writes to its own logger.  When the app goes away, even killed,
the kernel closes its end: the helper closes the forwarder (removing its unix
socket files) and exits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Callable

from .errors import ForwardError, SpecError
from .forwarder import Forwarder, start
from .options import Options
from .proto.records import Listener

Send = Callable[[dict[str, Any]], None]
RELAY_QUEUE = 10_000  # log records waiting for the app at most


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the app's to handle: we end when it lets go
    channel = socket.socket(fileno=int(args[0]))
    channel.setblocking(True)  # a gevent-patched app hands it over non-blocking
    lines = channel.makefile("rb")
    send = _sender(channel)
    request = json.loads(lines.readline() or "null")
    if request is None:
        return 0  # the app went away before it said anything
    logger = logging.getLogger("gforward")
    logger.setLevel(request.pop("log_level"))
    logger.addHandler(_Relay(send))  # records go through a queue: see _Relay
    logger.propagate = False
    try:
        fwd = start(Options(**request, logger=logger))
    except (ForwardError, ValueError) as exc:
        send({"error": error_fields(exc)})
        return 1
    with fwd:
        send({"started": [asdict(listener) for listener in fwd.listeners]})
        for line in lines:  # until the app closes its end, or dies
            threading.Thread(target=_answer, args=(fwd, json.loads(line), send),
                             daemon=True).start()
    return 0


def _answer(fwd: Forwarder, request: dict[str, Any], send: Send) -> None:
    """Run one request on the forwarder and send back its result or its error."""
    op, args = request["op"], request.get("args", {})
    try:
        if op == "stats":
            result: Any = asdict(fwd.stats())
        elif op == "add":
            result = asdict(fwd.add(args["spec"]))
        elif op == "remove":
            fwd.remove(Listener(**args["listener"]), args["drain"])
            result = None
        elif op == "wait_ready":
            result = fwd.wait_ready(args["timeout"])
        elif op == "close":
            fwd.close(args["drain"])
            result = None
        else:
            raise ForwardError(f"no such request {op!r}")
    except Exception as exc:  # every request gets an answer, or its caller waits for ever
        answer = {"id": request["id"], "error": error_fields(exc)}
    else:
        answer = {"id": request["id"], "result": result}
    with contextlib.suppress(OSError):  # the app closed meanwhile: it needs no answer
        send(answer)


ERROR_KINDS = (SpecError, KeyError, ValueError, ForwardError)  # the most specific first


def error_fields(exc: BaseException) -> dict[str, str]:
    """An exception as the app raises it again (`rebuilt_error`): kind, message, cause."""
    kind = next((k.__name__ for k in ERROR_KINDS if isinstance(exc, k)), "ForwardError")
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return {"kind": kind, "message": str(message), "cause": getattr(exc, "cause", "")}


def rebuilt_error(error: dict[str, str]) -> Exception:
    """An error the helper reported, as the app would have had it in thread isolation."""
    kind = next((k for k in ERROR_KINDS if k.__name__ == error["kind"]), ForwardError)
    if kind is SpecError:
        return SpecError(error["message"])
    if kind is ForwardError:
        return ForwardError(error["message"], error["cause"])
    return kind(error["message"])


def as_line(document: dict[str, Any]) -> bytes:
    """One document as the channel carries it: JSON on a line of its own."""
    return json.dumps(document).encode() + b"\n"


def _sender(channel: socket.socket) -> Send:
    """Whole lines to the app, from any thread."""
    lock = threading.Lock()

    def send(document: dict[str, Any]) -> None:
        data = as_line(document)
        with lock:
            channel.sendall(data)

    return send


class _Relay(logging.Handler):
    """The forwarder's log records, on their way to the app's logger.  They are logged
    in the hub's thread, which must never wait for the app to read: a thread of its own
    sends them, and records that find the queue full are dropped (and counted)."""

    def __init__(self, send: Send) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.Queue[dict[str, Any]] = queue.Queue(RELAY_QUEUE)
        self._dropped = 0
        self._send = send
        threading.Thread(target=self._relay, name="gforward log relay", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._queue.put_nowait({"level": record.levelno, "message": self.format(record)})
        except queue.Full:
            self._dropped += 1

    def _relay(self) -> None:
        with contextlib.suppress(OSError):  # the app is gone: nobody to tell
            while True:
                record = self._queue.get()
                if self._dropped:
                    dropped, self._dropped = self._dropped, 0
                    self._send({"log": {"level": logging.WARNING, "message":
                                        f"{dropped} log records dropped: the app read too slowly"}})
                self._send({"log": record})


if __name__ == "__main__":
    sys.exit(main())
