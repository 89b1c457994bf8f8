"""The package's exceptions: one base class that callers can catch."""

from __future__ import annotations


class ForwardError(Exception):
    """Base of every error gforward raises on purpose."""


class SpecError(ForwardError, ValueError):
    """A forwarding spec that cannot be parsed; the message quotes the spec."""
