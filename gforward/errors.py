"""The package's exceptions: one base class that callers can catch."""

from __future__ import annotations


class ForwardError(Exception):
    """Base of every error gforward raises on purpose.

    `cause` is a short key that stays the same from release to release ("http 401",
    "timeout", ...), under which a forwarder counts the tunnels it failed; the README
    lists them.
    """

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause


class SpecError(ForwardError, ValueError):
    """A forwarding spec that cannot be parsed; the message quotes the spec."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "spec")
