"""A forwarder whose listeners and tunnels live in a helper process (isolation="process").

In a plain app, tunnels run in a thread of the app's own interpreter, and each
message has to win the GIL from the app's threads: behind a thread busy in
Python, every hop waits a switch interval.  In a process of its own
(`helper.py`), they never wait for the app.  The app keeps the same API: this
class forwards each call over a unix socket pair and waits for the answer;
the helper's log records come back to the app's logger.  The helper ends when
the app closes it, exits, or dies (its end of the pair then closes), and
removes its unix socket files as it goes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from dataclasses import asdict, fields
from typing import Any

from . import fork, live
from .errors import ForwardError
from .forwarder import Forwarder
from .helper import as_line, rebuilt_error
from .options import Options, settle
from .proto.records import ForwarderStats, Listener, ListenerStats

STOP_TIMEOUT = 10.0  # how long close() waits for the helper to exit before killing it


class IsolatedForwarder(Forwarder):
    """Forwarder's API, served by a helper process.  A subclass so that it is what
    `start()` promises, though none of Forwarder's machinery runs in this process."""

    def __init__(self, options: Options) -> None:  # no super().__init__(): nothing is served here
        settle(options)  # every ValueError here, before a process starts
        if options.ssl_context is not None:
            raise ValueError("ssl_context cannot cross to a helper process: with "
                             "isolation='process', use ca_file or insecure")
        self._log = options.logger or logging.getLogger("gforward")
        self._detached = False
        self._closed_event = threading.Event()  # gevent's in a patched app: waits cooperate
        self._final: ForwarderStats | None = None  # the stats at close, for calls after it
        self._letting_go = False  # the helper's end will come from us
        self._records: queue.Queue[tuple[int, str] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._waiting: dict[int, list[Any]] = {}  # request id: [event, answer]
        self._next_id = 0
        mine, theirs = socket.socketpair()
        self._channel = mine
        try:
            # A session of its own: a terminal's Ctrl-C or a process group's SIGTERM is
            # the app's to handle; the helper ends when the app lets go of it.
            self._process = subprocess.Popen(
                [_python(), "-m", "gforward.helper", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_environment(),
                start_new_session=True)
        finally:
            theirs.close()
        self._lines = mine.makefile("rb")
        document = {field.name: getattr(options, field.name) for field in fields(Options)
                    if field.name not in ("logger", "ssl_context")}
        self._send({**document, "isolation": "thread",  # in the helper, the tunnels are at home
                    "log_level": self._log.getEffectiveLevel()})
        answer = self._read()
        if answer is None or "error" in answer:
            self._stop()
            if answer is None:
                raise ForwardError(f"the gforward helper exited ({self._process.returncode}) "
                                   f"before starting: {self._stderr_tail()}")
            raise rebuilt_error(answer["error"])
        self._listeners = [Listener(**fields_) for fields_ in answer["started"]]
        threading.Thread(target=self._listen, name="gforward helper channel",
                         daemon=True).start()
        threading.Thread(target=self._write_records, name="gforward helper log",
                         daemon=True).start()
        threading.Thread(target=self._relay_stderr, name="gforward helper stderr",
                         daemon=True).start()
        self._order = live.opened()
        live.services.add(self)

    @property
    def helper_pid(self) -> int:
        """The helper process's id."""
        return self._process.pid

    @property
    def listeners(self) -> list[Listener]:
        return list(self._listeners)

    @property
    def closed(self) -> bool:
        return self._closed_event.is_set()

    def stats(self) -> ForwarderStats:
        if self._final is not None:
            return self._final
        doc = self._call("stats")
        listeners = tuple(ListenerStats(**{**one, "listener": Listener(**one["listener"])})
                          for one in doc.pop("listeners"))
        return ForwarderStats(**doc, listeners=listeners)

    def add(self, spec: str) -> Listener:
        listener = Listener(**self._call("add", spec=spec))
        self._listeners.append(listener)
        return listener

    def remove(self, what: Listener | str, drain: float = 0.0) -> None:
        with self._lock:
            at = next((i for i, ln in enumerate(self._listeners) if ln.is_named(what)), None)
            if at is None:
                raise KeyError(what)
            listener = self._listeners.pop(at)  # gone from `listeners` at once, as in thread mode
        try:
            if not self.closed:  # once closed, as in thread mode: nothing is left to stop
                self._call("remove", listener=asdict(listener), drain=drain)
        except ForwardError:
            if not (self._letting_go or self.closed):
                self._listeners.insert(at, listener)  # still bound
                raise
            # a close() meanwhile ended the listener with everything else, as in thread mode

    def wait_ready(self, timeout: float | None = None) -> bool:
        try:
            return bool(self._call("wait_ready", timeout=timeout))
        except ForwardError:
            if self.closed or self._final is not None:
                return False  # closed meanwhile
            raise

    def close(self, drain: float = 0.0) -> None:
        if self._detached:
            return
        if not self.closed:
            with contextlib.suppress(ForwardError):  # the helper is gone: nothing to close
                self._call("close", drain=drain)
                self._final = self.stats()  # what stats() says from now on
        self._stop()  # also reaps a helper that died on its own

    def wait(self, timeout: float | None = None) -> bool:
        return self._detached or self._closed_event.wait(timeout)

    # The channel -----------------------------------------------------------------

    def _call(self, op: str, **args: Any) -> Any:
        """One request to the helper, and its answer (an error raised again here)."""
        waiter: list[Any] = [threading.Event(), None]
        with self._lock:
            if self.closed:
                raise ForwardError("the forwarder is closed")
            self._next_id += 1
            ask = self._next_id
            self._waiting[ask] = waiter
            try:
                self._send({"id": ask, "op": op, "args": args})
            except OSError as exc:
                del self._waiting[ask]
                raise ForwardError(f"the gforward helper is gone: {exc}") from None
        waiter[0].wait()
        answer = waiter[1]
        if "error" in answer:
            raise rebuilt_error(answer["error"])
        return answer["result"]

    def _send(self, document: dict[str, Any]) -> None:
        self._channel.sendall(as_line(document))

    def _read(self) -> dict[str, Any] | None:
        """The next document that is not a log record (those go to the logger); None once
        the helper is gone."""
        while line := self._lines.readline():
            document: dict[str, Any] = json.loads(line)
            if "log" not in document:
                return document
            self._records.put((document["log"]["level"], document["log"]["message"]))
        return None

    def _listen(self) -> None:
        """The channel's reader: answers to their callers, log records to their writer."""
        try:
            while (document := self._read()) is not None:
                with self._lock:
                    waiter = self._waiting.pop(document["id"])
                waiter[1] = document
                waiter[0].set()
        except OSError:
            pass  # the helper died: the same as its end of the channel
        finally:
            self._gone()

    def _gone(self) -> None:
        """The helper is gone: no answer will come, and the forwarder is closed."""
        if not self._letting_go:
            self._log.warning("the gforward helper (pid %d) ended on its own; its "
                              "listeners and tunnels are gone", self._process.pid)
        gone = {"error": {"kind": "ForwardError", "message": "the gforward helper is gone",
                          "cause": ""}}
        with self._lock:
            self._closed_event.set()
            for waiter in self._waiting.values():
                waiter[1] = gone
                waiter[0].set()
            self._waiting.clear()
        self._records.put(None)

    def _write_records(self) -> None:
        """The helper's log records, written to the app's logger in a thread of their own,
        so that a handler that calls back into the forwarder waits for no one but itself."""
        while (record := self._records.get()) is not None:
            with contextlib.suppress(Exception):  # a failing handler loses its record only
                self._log.log(record[0], "%s", record[1])

    def _relay_stderr(self) -> None:
        """Whatever the helper itself prints (a crash's traceback, say), as warnings."""
        assert self._process.stderr is not None
        for line in self._process.stderr:
            self._log.warning("gforward helper: %s", line.decode(errors="replace").rstrip())

    def _stop(self) -> None:
        """Let the helper go (it closes what is left) and wait for it to exit."""
        self._request_close(0.0)
        try:
            self._process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._log.warning("the gforward helper did not exit in %g s; killing it",
                              STOP_TIMEOUT)
            self._process.kill()
            self._process.wait()
        self._closed_event.set()
        live.services.discard(self)

    def _stderr_tail(self) -> str:
        assert self._process.stderr is not None
        lines = self._process.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(nothing on its stderr)"

    # For the exit hook and a forked child (see live.py) -------------------------------

    def _request_close(self, drain: float) -> None:
        """Close our end: the helper sees its channel end, closes everything and exits."""
        self._letting_go = True
        with contextlib.suppress(OSError):  # already shut
            self._channel.shutdown(socket.SHUT_RDWR)

    def _await_closed(self, timeout: float | None) -> bool:
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._closed_event.set()
        return True

    def _detach(self) -> None:
        """In a forked child: the helper is the parent's.  The child lets go of its copy
        of the channel, so that the parent's death still ends the helper."""
        self._detached = True
        fork.release([self._channel])
        if self._process.stderr is not None:
            fork.release([self._process.stderr])
        self._closed_event.set()


def _python() -> str:
    """The interpreter for the helper: GFORWARD_PYTHON, else this one when it is a Python
    (under uWSGI or in an embedding program, sys.executable is not), else the base
    installation's python3.X."""
    explicit = os.environ.get("GFORWARD_PYTHON")
    if explicit:
        return explicit
    if os.path.basename(sys.executable).startswith("python"):
        return sys.executable
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidate = os.path.join(sys.base_exec_prefix, "bin", version)
    if os.access(candidate, os.X_OK):
        return candidate
    raise ForwardError("isolation='process' needs a Python to run its helper in; "
                       f"none found at {candidate}: set GFORWARD_PYTHON")


def _environment() -> dict[str, str]:
    """The app's environment, and its import path, so that any interpreter finds
    gforward, gevent and wsproto where the app found them."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
