"""A first end-to-end check: client, reference daemon and guest in one process."""

from __future__ import annotations

import gforward
import gforward.daemon
from tests.support import echo_once


def test_echo_through_reference_daemon(daemon: gforward.daemon.Daemon, echo_server: str) -> None:
    with gforward.start(base_url=daemon.url, vm_name="sbox-1",
                        specs=[f"127.0.0.1:0:{echo_server}"]) as fwd:
        port = fwd.listeners[0].port
        assert echo_once(("127.0.0.1", port), b"hello" * 1000) == b"hello" * 1000
