"""`start()` and the Forwarder: the life of one local connection, and operating the whole.

Each accepted connection gets its own WebSocket to the daemon, as the Go
`forward` package does; `_accept` below is that whole life, top to bottom:
dial, upgrade, hand over to a pump, count and log the end.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable

import gevent
from gevent import socket
from gevent.monkey import is_module_patched

from . import dial, hub
from .errors import ForwardError
from .listen import ListeningSocket
from .opener import Opener
from .options import Options, settle
from .proto import frames, handshake
from .proto.mapping import AddressMapping, join_host_port, parse_address_mapping
from .proto.records import Counters, ForwarderStats, Listener, ListenerStats
from .proto.tunnel import Tunnel
from .pump import Pump
from .service import Connection, Door, Service

# Logged once per listener that binds every interface (the command line prints its own line).
WILDCARD_WARNING = ("listening on all interfaces (%s): anyone who can reach this machine can "
                    "reach vm %s; prefix the spec with 127.0.0.1: to keep it local")
# Logged once when gevent patched the process after start() in a plain process.
PATCHED_LATE = ("gevent patched this process after gforward.start(): the tunnels still run in "
                "gforward's own hub thread, and every message crosses threads; start the "
                "forwarder after patching (gunicorn's gevent worker: in post_worker_init, "
                "not in post_fork)")
_RETRIED_STATUSES = (408, 429)  # besides 5xx: answers that wait_ready tries again
_PROBE_BACKOFF = (0.1, 1.0)  # wait_ready's first and longest pause between probes


@dataclass(frozen=True)
class _Route:
    """Where one listener's tunnels go: its record and its upgrade request."""

    listener: Listener
    upgrade: handshake.Upgrade


class Forwarder(Service):
    """Bound listeners and their tunnels; every method works from any thread or greenlet."""

    def __init__(self, options: Options) -> None:
        mappings, self._settings = settle(options)
        super().__init__(options.logger or logging.getLogger("gforward"))
        endpoint = self._settings.endpoint
        if options.insecure and endpoint.tls:
            self._log.warning("TLS verification is off (insecure=True): the certificate of %s "
                              "is not checked, so anyone on the way can read the token and "
                              "the tunnels", endpoint.describe())
        if self._settings.proxy is not None:
            self._log.info("reaching %s through proxy %s", endpoint.describe(),
                           self._settings.proxy.describe())
        self._patch_noticed = False
        # Where the Opener dials, from the hub's callbacks; None: every dial in a greenlet.
        self._known = (dial.known_address(endpoint)
                       if self._settings.tls is None and self._settings.proxy is None else None)
        self._probing: list[list[Any]] = []  # each wait_ready probe's sockets, for close()
        self._open(mappings)

    @property
    def listeners(self) -> list[Listener]:
        """What is bound, in spec order, then in the order `add()` bound it."""
        return [door.context.listener for door in list(self._doors)]

    def _prepare(self, mapping: AddressMapping, bound: ListeningSocket) -> _Route:
        listener = Listener(mapping.raw_spec, bound.address, mapping.remote_target(), bound.port)
        self._log.info("listening on %s -> vm %s %s", listener.local, self._settings.vm_name,
                       listener.remote)
        if mapping.listens_everywhere():
            self._log.warning(WILDCARD_WARNING, listener.local, self._settings.vm_name)
        return _Route(listener, self._settings.upgrade(listener.remote))

    # One connection -------------------------------------------------------------

    def _accept(self, door: Door, local: socket.socket, address: Any) -> None:
        """The life of one local connection, begun in the hub: dial and upgrade (from the
        hub's callbacks, or in a greenlet when a lookup, TLS or a proxy is in the way),
        then hand over to a pump, which counts and logs the outcome when it is over."""
        route, settings = door.context, self._settings
        if self._in_hub_thread and not self._patch_noticed and is_module_patched("socket"):
            self._patch_noticed = True
            self._log_soon(logging.WARNING, PATCHED_LATE)
        counts = (door.counters, self.counters)
        dial.set_nodelay(local)
        name = _TunnelName(route.listener, address)
        connection = Connection(door, local)
        for counters in counts:  # from here on, `failed` or `ended` counts its end
            counters.total += 1
            counters.open += 1

        def failed(exc: BaseException) -> None:
            """Log, count, close, in that order: the client sees the end once it is logged
            and counted.  In a greenlet, where a log handler may block."""
            if connection.aborted:  # the forwarder closed meanwhile: not a failure
                cause = ""
            elif isinstance(exc, (ForwardError, OSError)):
                cause = getattr(exc, "cause", "") or "unreachable"
                self._log.warning("tunnel %s failed: %s", name, settings.redact(str(exc)))
            else:  # a bug: end this tunnel, not the forwarder
                cause = "internal"
                self._log.error("tunnel %s failed", name, exc_info=exc)
            _over(counts, cause)
            local.close()
            connection.done()

        def fail_soon(exc: BaseException) -> None:
            """`failed`, from the hub's callbacks: in a greenlet of its own."""
            self._pool.spawn(failed, exc)

        def ended(pump: Pump) -> None:
            cut = pump.tunnel.failed and not connection.aborted
            _over(counts, pump.tunnel.cause if cut else "")
            self._log_soon(logging.ERROR if pump.exception else
                           logging.WARNING if cut else logging.DEBUG,
                           "tunnel %s closed (%d bytes up, %d down): %s", name,
                           pump.tunnel.sent, pump.tunnel.received, pump.tunnel.outcome,
                           exc_info=pump.exception)

        def opened(stream: dial.Stream, trailing: bytes) -> None:
            self._log_soon(logging.DEBUG, "tunnel %s opened", name)
            try:
                tunnel = Tunnel(client=True, ping_interval=settings.ping_interval,
                                ping_timeout=settings.ping_timeout, now=time.monotonic())
                pump = dial.open_pump(local, stream, tunnel, ended, counts)
            except Exception as exc:  # a bug: end this tunnel, not the hub
                stream.close()
                fail_soon(exc)
                return
            connection.open(pump)
            pump.start(trailing)

        try:
            upgrade = route.upgrade.handshake()
            if self._known is None:
                self._pool.spawn(self._dial_for, upgrade, connection, opened, failed)
                return
            opener = Opener(self._known, upgrade, settings.dial_timeout,
                            settings.endpoint.describe, opened, fail_soon)
            connection.dialling(opener)
        except Exception as exc:  # a bug before the dial: the tunnel ends, counted and logged
            fail_soon(exc)
            return
        opener.start()  # from here on, the opener ends the dial once: opened or fail_soon

    def _dial_for(self, upgrade: handshake.ClientHandshake, connection: Connection,
                  opened: Callable[[dial.Stream, bytes], None],
                  failed: Callable[[BaseException], None]) -> None:
        """A tunnel's dial in a greenlet, for what the Opener leaves: a name to look up,
        TLS, a proxy."""
        try:
            stream, trailing = self._dial(upgrade, self._settings.dial_timeout, connection.add)
        except Exception as exc:
            failed(exc)
            return
        opened(stream, trailing)

    def _dial(self, upgrade: handshake.ClientHandshake, timeout: float,
              track: Callable[[Any], None]) -> tuple[dial.Stream, bytes]:
        """Open a WebSocket with `upgrade` in a greenlet, as probes and some tunnels do."""
        settings = self._settings
        return dial.open_websocket(settings.endpoint, upgrade, timeout=timeout,
                                   tls=settings.tls, track=track,
                                   proxy=settings.proxy_handshake())

    # Operating it ---------------------------------------------------------------

    def stats(self) -> ForwarderStats:
        """Counters since start, and each listener's; cheap, from any thread."""
        doors = list(self._doors)
        return ForwarderStats(*_counts(self.counters), listeners=tuple(
            ListenerStats(*_counts(door.counters), listener=door.context.listener)
            for door in doors))

    def add(self, spec: str) -> Listener:
        """Bind one more listener and serve it; raises as start() does, leaving nothing bound."""
        listener: Listener = self._add(parse_address_mapping(spec)).context.listener
        return listener

    def remove(self, what: Listener | str, drain: float = 0.0) -> None:
        """Stop a listener (given, or named by its spec) and end its tunnels as
        close(drain=...) ends them; KeyError if this forwarder has no such listener."""
        for door in list(self._doors):
            if door.context.listener.is_named(what):
                self._remove(door, drain)
                return
        raise KeyError(what)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Whether, within `timeout` seconds, the daemon reaches every listener's upstream:
        a probe tunnel is upgraded and closed at once, again and again while the daemon
        answers 502 (or another answer that may get better) or cannot be reached.  A
        refusal that will not get better raises ForwardError; a close meanwhile: False."""
        deadline = None if timeout is None else time.monotonic() + timeout
        routes = [door.context for door in list(self._doors)]

        def probe_all() -> bool:
            probes = [gevent.spawn(self._probe, route, deadline) for route in routes]
            try:  # the first False (or refusal) settles it, and the rest are stopped
                for probe in gevent.iwait(probes):
                    outcome = probe.get()
                    if isinstance(outcome, ForwardError):
                        raise outcome
                    if not outcome:
                        return False
                return True
            finally:
                gevent.killall(probes)

        ready: bool = hub.run_in(self._hub, probe_all)
        return ready

    def _probe(self, route: _Route, deadline: float | None) -> bool | ForwardError:
        """Probe one listener's upstream until the daemon reaches it (see wait_ready).  A
        refusal comes back, not raised: the hub would print a greenlet's error on stderr."""
        pause = _PROBE_BACKOFF[0]
        sockets: list[Any] = []  # the current attempt's, for a close to cut
        self._probing.append(sockets)
        try:
            while not self.stopping():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                dial_timeout = self._settings.dial_timeout
                try:
                    if self._reached(route, min(dial_timeout, left or dial_timeout), sockets):
                        return True
                except ForwardError as refusal:
                    return refusal
                if not self.stopping():
                    gevent.sleep(pause if left is None else min(pause, left))
                    pause = min(pause * 2, _PROBE_BACKOFF[1])
            return False
        finally:
            self._probing.remove(sockets)

    def _reached(self, route: _Route, timeout: float, sockets: list[Any]) -> bool:
        """One probe: whether a tunnel to `route`'s upstream opens (it is closed at once).
        Raises ForwardError for a refusal that will not get better."""
        try:
            stream, _ = self._dial(route.upgrade.handshake(), timeout, sockets.append)
        except (ForwardError, OSError) as exc:
            sockets.clear()  # open_websocket closed them
            if self.stopping() or _worth_another_probe(exc):  # a close cut it short, or not yet
                return False
            raise ForwardError(f"{route.listener.local} -> {route.listener.remote}: "
                               f"{self._settings.redact(str(exc))}",
                               getattr(exc, "cause", "")) from None
        try:
            stream.sendall(frames.encode_frame(frames.OP_CLOSE,
                                               frames.close_payload(1000), mask=True))
        except OSError:
            pass  # the daemon reached the upstream: that was the question
        finally:
            stream.close()
            sockets.clear()
        return True

    def _begin_close(self, drain: float) -> None:
        """Closing also ends the probes of a wait_ready under way (which then says False)."""
        super()._begin_close(drain)
        for sockets in self._probing:
            for sock in sockets:
                sock.close()


def _worth_another_probe(exc: BaseException) -> bool:
    """Whether wait_ready tries again after `exc`: the daemon or the guest's port may come
    up; a refusal of the request itself (a 4xx, a bad accept, a bad certificate) will not."""
    status = getattr(exc, "status", 0)
    if status:
        return status >= 500 or status in _RETRIED_STATUSES
    return not isinstance(exc.__cause__, ssl.SSLCertVerificationError)


def _over(counts: tuple[Counters, ...], failure: str) -> None:
    """A tunnel is over; `failure` names its cause if it failed."""
    for counters in counts:
        counters.open -= 1
        if failure:
            counters.fail(failure)


def _counts(counters: Counters) -> tuple[int, int, int, int, int, dict[str, int]]:
    """The stats fields, in order, read from `counters`."""
    return (counters.open, counters.total, counters.failed, counters.up, counters.down,
            dict(counters.failures))


class _TunnelName:
    """"127.0.0.1:50312 -> 127.0.0.1:80" for the log, spelled out only if a line is written."""

    __slots__ = ("address", "listener")

    def __init__(self, listener: Listener, address: Any) -> None:
        self.listener = listener
        self.address = address

    def __str__(self) -> str:
        address, listener = self.address, self.listener
        peer = join_host_port(*address[:2]) if isinstance(address, tuple) else listener.local
        return f"{peer} -> {listener.remote}"


def start(options: Options | None = None, /, **fields: Any) -> Forwarder:
    """Parse every spec, bind every listener, start accepting, and return.

    Accepts an Options, keyword fields, or both (keywords override).
    """
    if options is None:
        options = Options(**fields)
    elif fields:
        options = dataclasses.replace(options, **fields)
    if options.isolation == "process":
        from .isolated import IsolatedForwarder  # it builds on this module: imported late

        return IsolatedForwarder(options)
    return Forwarder(options)

