"""gforward: forward local TCP ports and unix sockets into Slicer microVMs.

A drop-in for the Go `forward` package: each accepted local connection gets
its own WebSocket to the daemon's /vm/{name}/forward endpoint.

How it is built, floor by floor (a module imports only from floors below):

1. `proto/`: pure protocol, never a socket: spec `mapping`, base-URL `endpoint`,
   the upgrade `handshake`, `frames`, random keys (`draws`), the CONNECT `proxy`
   exchange, the daemon's upstream policy `allow`, the `tunnel`'s rules as a
   state machine, and the `records` a forwarder reports.  `errors` sits under
   everything.
2. I/O: `listen` (listening sockets), `pump` (the event-driven driver of a
   tunnel), `tls` (TLS through memory BIOs, for the dial and the pump), `dial`
   (the connection to the daemon and the upgrade, in a greenlet), `opener` (the
   same for the usual daemon, event-driven as the pump), `hub` (which hub, and how
   threads reach it), `fork` (a forked child lets go), `service` (the server core).
3. The roles: `options` and `forwarder` (`start()`; the life of one local
   connection is `Forwarder._accept`), `daemon` (the reference daemon).
4. Command lines: `command` (what both share) and `cli` (the `gforward` command).
"""

import logging

from ._version import __version__
from .errors import ForwardError, SpecError
from .forwarder import Forwarder, start
from .options import Options
from .proto.mapping import AddressMapping, parse_address_mapping
from .proto.records import ForwarderStats, Listener, ListenerStats

# A library's logger stays silent until the app configures logging: without a handler of
# its own, logging's last resort would print warnings on stderr.
logging.getLogger("gforward").addHandler(logging.NullHandler())

__all__ = [
    "AddressMapping",
    "ForwardError",
    "Forwarder",
    "ForwarderStats",
    "Listener",
    "ListenerStats",
    "Options",
    "SpecError",
    "__version__",
    "parse_address_mapping",
    "start",
]
