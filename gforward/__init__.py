"""gforward: forward local TCP ports and unix sockets into Slicer microVMs.

A drop-in for the Go `forward` package: each accepted local connection gets
its own WebSocket to the daemon's /vm/{name}/forward endpoint.
"""

from ._version import __version__
from .errors import ForwardError, SpecError
from .forwarder import Forwarder, Listener, Options, start
from .mapping import AddressMapping, parse_address_mapping

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
