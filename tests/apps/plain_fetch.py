"""Fetch pages through gforward from a plain (unpatched) Python process.

Run by tests/test_forwarder.py as a subprocess: a reference daemon (with a
token), a threading http.server guest and a forwarder, all in this process;
urllib.request (blocking, in the main thread) fetches through the forwarder
while gforward serves from its own hub thread.  Prints what it checked and
exits 0; any failed check raises (exit 1).
"""

from __future__ import annotations

import hashlib
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import gforward
import gforward.daemon

TOKEN = "app-token-3f9d"
BODY = b"".join(b"line %05d of the guest page\n" % i for i in range(4000))


class Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = BODY + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    import gevent.monkey

    print(f"patched: {gevent.monkey.is_module_patched('socket')}")
    guest = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    guest.daemon_threads = True
    serving = threading.Thread(target=guest.serve_forever, daemon=True)
    serving.start()
    upstream = f"127.0.0.1:{guest.server_address[1]}"
    try:
        with gforward.daemon.start(token=TOKEN) as daemon, gforward.start(
            base_url=daemon.url, token=TOKEN, vm_name="app-vm", specs=[f"127.0.0.1:0:{upstream}"]
        ) as fwd:
            port = fwd.listeners[0].port
            for i in range(5):
                path = f"/page/{i}"
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as resp:
                    status, body = resp.status, resp.read()
                assert status == 200, status
                assert body == BODY + path.encode(), (len(body), body[-40:])
            print(f"fetched 5 pages via 127.0.0.1:{port}: status 200, "
                  f"{len(body)} bytes, sha256 {hashlib.sha256(BODY).hexdigest()[:16]}")
        assert fwd.wait(0), "forwarder not closed"
        print("forwarder closed")
    finally:
        guest.shutdown()
        guest.server_close()
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
