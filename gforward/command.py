"""What both command lines share: token files, seconds as arguments, logging on stderr,
and serving until a signal says stop.

Signals are taken with sigwait in the main thread, never by a handler, so that
no handler ever runs inside a hub: they are blocked before the hub thread
starts (threads inherit the mask).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from typing import Callable, TypeVar

from .service import Service

S = TypeVar("S", bound=Service)
_STOP = {signal.SIGINT, signal.SIGTERM}
_REPORT = signal.SIGUSR1  # print the counters, as dd does
POLL = 0.1  # seconds between looks at a helper thread while one runs


def read_token_file(path: str) -> str:
    """The token stored in `path` (`~` expanded, whitespace stripped).

    Raises ValueError, naming the file but never quoting its content, when it
    cannot be read or holds nothing: an empty token would silently mean "no auth".
    """
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as exc:
        raise ValueError(f"cannot read token file {path!r}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError(f"token file {path!r} is not UTF-8 text") from None
    if not token:
        raise ValueError(f"token file {path!r} is empty")
    return token


def seconds(text: str, *, zero: bool = False) -> float:
    """argparse type: a finite number of seconds above zero (or zero, where that means off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        kind = "zero or a positive" if zero else "a positive"
        raise argparse.ArgumentTypeError(f"must be {kind} number of seconds: {text!r}")
    return value


def log_to_stderr(name: str, verbose: bool) -> logging.Logger:
    """The logger `name`, writing "name: message" lines on stderr, every tunnel's when
    `verbose`, else warnings and worse."""
    logging.basicConfig(format="%(name)s: %(message)s", stream=sys.stderr)
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING)
    return logger


def serve(
    launch: Callable[[], S],
    announce: Callable[[S], None],
    *,
    drain: float = 0.0,
    report: Callable[[S], None] | None = None,
    ready: Callable[[S], str | None] | None = None,
) -> int:
    """Start, announce, serve until SIGINT or SIGTERM, close; returns the exit status.

    With `drain`, the first signal closes draining for that long and a second cuts
    at once.  `report` runs on SIGUSR1.  `ready`, run in a thread of its own, says
    why the service is not ready (then the exit status is 1) or None.
    """
    waited = {*_STOP, _REPORT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        service = launch()
        try:
            announce(service)
            return _serve(service, waited, drain, report, ready)
        finally:
            service.close()  # a drain cut short, or no drain: what is left ends now
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _serve(service: S, waited: set[signal.Signals], drain: float,
           report: Callable[[S], None] | None,
           ready: Callable[[S], str | None] | None) -> int:
    """The main thread's loop: one signal at a time until it is time to go.  While a
    helper thread (a drain, a readiness check) runs, it looks at it every POLL seconds."""
    problems: list[str | None] = []
    helpers: list[threading.Thread] = []
    closer: threading.Thread | None = None

    def in_thread(job: Callable[[], None]) -> threading.Thread:
        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        helpers.append(thread)
        return thread

    if ready is not None:
        def check() -> None:
            """Runs `ready`; whatever ends it, the loop below gets an answer to act on."""
            try:
                problems.append(ready(service))
            except BaseException as exc:  # a bug: its traceback, then the loop's answer
                traceback.print_exc(file=sys.stderr)
                problems.append(f"cannot tell whether it is ready: {exc!r}")

        in_thread(check)
    while True:
        # Looked at before what the helpers left: one that ends after this look is seen
        # on the next round, so the loop never blocks for good on a helper's answer.
        busy = any(thread.is_alive() for thread in helpers)
        if closer is not None and not closer.is_alive():
            return 0  # drained
        # Once a drain has begun, its close is what makes a readiness check say "not ready".
        if problems and problems[0] is not None and closer is None:
            print(problems[0], file=sys.stderr, flush=True)
            return 1
        if busy:
            info = signal.sigtimedwait(waited, POLL)
            received = info.si_signo if info is not None else None
        else:
            received = signal.sigwait(waited)
        if received == _REPORT and report is not None:
            report(service)
        elif received in _STOP:
            if drain <= 0 or closer is not None:
                return 0
            closer = in_thread(lambda: service.close(drain))
