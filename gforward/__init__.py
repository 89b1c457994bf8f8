"""gforward: forward local TCP ports and unix sockets into Slicer microVMs.

A drop-in for the Go `forward` package: each accepted local connection gets
its own WebSocket to the daemon's /vm/{name}/forward endpoint.
"""

import logging

from ._version import __version__
from .errors import ForwardError, SpecError
from .forwarder import Forwarder, Listener, Options, start
from .mapping import AddressMapping, parse_address_mapping

# Silent unless the app configures logging, as a library should be: without a handler
# anywhere on the way up, logging would print our warnings on stderr (logging.lastResort).
# This one covers every child logger too, "gforward.daemon" among them.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AddressMapping",
    "ForwardError",
    "Forwarder",
    "Listener",
    "Options",
    "SpecError",
    "__version__",
    "parse_address_mapping",
    "start",
]
