"""Fetch pages through gforward from a gevent-patched process.

Run by tests/test_forwarder.py as a subprocess.  After monkey.patch_all(),
gforward serves from the app's own hub, in greenlets; the guest is a
gevent.pywsgi server in the same hub, and urllib.request (patched, so
cooperative) fetches through the forwarder, several greenlets at once.
Prints what it checked and exits 0; any failed check raises (exit 1).
"""

from gevent import monkey

monkey.patch_all()

import hashlib  # noqa: E402
import sys  # noqa: E402
import urllib.request  # noqa: E402

import gevent  # noqa: E402
import gevent.pywsgi  # noqa: E402

import gforward  # noqa: E402
import gforward.daemon  # noqa: E402

TOKEN = "app-token-7c21"
BODY = b"".join(b"line %05d of the guest page\n" % i for i in range(4000))


def app(environ, start_response):  # type: ignore[no-untyped-def]
    body = BODY + environ["PATH_INFO"].encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def fetch(port: int, i: int) -> tuple[int, bytes, str]:
    path = f"/page/{i}"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as resp:
        return resp.status, resp.read(), path


def main() -> int:
    print(f"patched: {monkey.is_module_patched('socket')}")
    guest = gevent.pywsgi.WSGIServer(("127.0.0.1", 0), app, log=None)
    guest.start()
    upstream = f"127.0.0.1:{guest.server_port}"
    try:
        with gforward.daemon.start(token=TOKEN) as daemon, gforward.start(
            base_url=daemon.url, token=TOKEN, vm_name="app-vm", specs=[f"127.0.0.1:0:{upstream}"]
        ) as fwd:
            port = fwd.listeners[0].port
            jobs = [gevent.spawn(fetch, port, i) for i in range(5)]
            gevent.joinall(jobs, timeout=30, raise_error=True)
            for job in jobs:
                assert job.successful(), job.exception
                status, body, path = job.value
                assert status == 200, status
                assert body == BODY + path.encode(), (len(body), body[-40:])
            print(f"fetched 5 pages concurrently via 127.0.0.1:{port}: status 200, "
                  f"{len(body)} bytes, sha256 {hashlib.sha256(BODY).hexdigest()[:16]}")
        assert fwd.wait(0), "forwarder not closed"
        print("forwarder closed")
    finally:
        guest.stop(timeout=5)
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
