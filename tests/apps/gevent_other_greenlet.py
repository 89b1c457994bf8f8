"""close() / wait() from a greenlet other than the one that called start(), gevent-patched.

The contract: close() is "safe from any greenlet or thread" and wait() blocks
until closed.  In a patched app the usual shape is a supervisor or signal
greenlet that closes the forwarder the main greenlet started.  A watchdog on
a real OS thread ends the process with status 3 if it is not done in time,
so a hang shows up as a clean failure rather than a test timeout.  The
"same" scenario (close() from the greenlet that started it) is the control.

    python tests/apps/gevent_other_greenlet.py close|wait|same
"""

from gevent import monkey

monkey.patch_all()

import os  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

import gforward  # noqa: E402
import gforward.daemon  # noqa: E402

WATCHDOG = 6.0


def watchdog() -> None:
    sleep = monkey.get_original("time", "sleep")
    sleep(WATCHDOG)
    print(f"HUNG: not done within {WATCHDOG:g} s", flush=True)
    os._exit(3)


def main() -> int:
    scenario = sys.argv[1]
    monkey.get_original("_thread", "start_new_thread")(watchdog, ())
    daemon = gforward.daemon.start()
    fwd = gforward.start(base_url=daemon.url, vm_name="vm", specs=["127.0.0.1:0:127.0.0.1:9"])
    print("started", flush=True)
    if scenario == "close":
        closer = gevent.spawn(fwd.close)
        closer.join(timeout=5)
        assert closer.dead and closer.successful(), "close() in another greenlet did not return"
        assert fwd.wait(0)
        print("closed from another greenlet", flush=True)
    elif scenario == "same":
        fwd.close()
        assert fwd.wait(0)
        print("closed from the starting greenlet", flush=True)
    else:
        waiter = gevent.spawn(fwd.wait, 30)
        gevent.sleep(0.2)
        assert not waiter.dead, "wait() returned before close()"
        fwd.close()
        waiter.join(timeout=5)
        assert waiter.dead and waiter.value is True, waiter.value
        print("wait() in another greenlet returned True after close()", flush=True)
    daemon.close()
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
