"""A process where gevent patched `threading` but not `socket`.

A "thread" of its own would only be a greenlet of the caller's hub there, and
freeing that hub on close would break the app's own hub; so gforward joins
the caller's hub openly, as in a fully patched process.  The client uses
gevent's socket, and the guest runs in a process of its own (blocking
sockets would stall the hub they share).  After
close(), the app's hub must still run greenlets.  Prints what it checked.

    python tests/apps/partial_patch.py
"""

from gevent import monkey

monkey.patch_thread()

import sys  # noqa: E402

import gevent  # noqa: E402
import support  # noqa: E402
from gevent import socket  # noqa: E402

import gforward  # noqa: E402
import gforward.daemon  # noqa: E402


def main() -> int:
    support.watchdog(20)
    support.say(f"patched: socket {monkey.is_module_patched('socket')}, "
                f"threading {monkey.is_module_patched('threading')}")
    guests = support.GuestProcess()  # its blocking sockets must not share our hub
    with gforward.daemon.start() as daemon:
        fwd = gforward.start(base_url=daemon.url, vm_name="partial",
                             specs=[f"127.0.0.1:0:{guests.echo}"])
        with fwd, socket.create_connection(("127.0.0.1", fwd.listeners[0].port), timeout=10) as s:
            support.exchange(s, b"through a partly patched process" * 1000)
        support.say(f"forwarder carried data and closed: {fwd.wait(0)}")
    guests.stop()
    sleeper = gevent.spawn(gevent.sleep, 0.05)
    sleeper.join(timeout=5)
    support.say(f"the app's hub still runs greenlets: {sleeper.successful()}")
    support.say("ok" if sleeper.successful() and fwd.wait(0) else "FAILED")
    return 0 if sleeper.successful() else 1


if __name__ == "__main__":
    sys.exit(main())
