"""The gevent-websocket peer: a WebSocket implementation other than ours.

`python -m tests.peers.gws [--prefix /p]` serves gevent.pywsgi with
geventwebsocket's handler in its own process, prints
`listening on http://127.0.0.1:PORT` when ready, and runs until killed.
Behaviour per VM name (the `{name}` of `/vm/{name}/forward`):
`echo` echoes each message; `headers` sends one JSON message with the
request line and headers it saw, then closes; `ping` sends a ping with
the payload `gws-ping-<n>`, waits for the pong, sends one JSON message
`{"ping": <what it sent>, "pong": <what came back>}`, then echoes; `bye`
sends `bye` and closes at once.
Paths outside `{prefix}/vm/*/forward` get a plain 404, never an upgrade.
Keep its payloads small: its masking runs at a few MB/s.
"""

from __future__ import annotations

import json
import re
from itertools import count
from typing import Callable

import gevent
from gevent.pywsgi import WSGIServer
from gevent.queue import Queue
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket


def serve_gws(prefix: str) -> None:
    """gevent.pywsgi + geventwebsocket, serving the behaviours of the module doc."""
    forward_path = re.compile(re.escape(prefix) + r"/vm/([^/]+)/forward")
    pings = count(1)
    pong_queues: dict[int, Queue] = {}  # by id(ws): WebSocket has __slots__

    def handle_pong(self: WebSocket, header: object, payload: bytes) -> None:
        pongs = pong_queues.get(id(self))
        if pongs is not None:
            pongs.put(bytes(payload))

    WebSocket.handle_pong = handle_pong

    def not_an_upgrade(handler: WebSocketHandler) -> bool:
        """pre_start_hook: True sends the request to the plain WSGI app (the 404)."""
        return forward_path.fullmatch(handler.environ.get("PATH_INFO", "")) is None

    def app(environ: dict, start_response: Callable) -> list[bytes]:
        ws = environ.get("wsgi.websocket")
        if ws is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [f"no such endpoint {environ.get('PATH_INFO')}\n".encode()]
        mode = forward_path.fullmatch(environ["PATH_INFO"]).group(1)
        if mode == "headers":
            seen = {
                "request_line": ws.handler.requestline,
                "headers": [[k, v] for k, v in ws.handler.headers.items()],
            }
            ws.send(json.dumps(seen).encode(), binary=True)
            ws.close()
            return []
        if mode == "bye":
            ws.send(b"bye", binary=True)
            ws.close()
            return []
        if mode == "ping":
            pongs = pong_queues[id(ws)] = Queue()
            payload = f"gws-ping-{next(pings)}"
            ws.send_frame(payload, ws.OPCODE_PING)
            reader = gevent.spawn(_echo_gws, ws)  # reads, so handle_pong runs
            try:
                pong = pongs.get(timeout=10)
            finally:
                del pong_queues[id(ws)]
            ws.send(json.dumps({"ping": payload, "pong": pong.decode("latin-1")}).encode(),
                    binary=True)
            reader.join()
            return []
        _echo_gws(ws)
        return []

    server = WSGIServer(("127.0.0.1", 0), app, handler_class=WebSocketHandler, log=None,
                        error_log=None)
    server.pre_start_hook = not_an_upgrade
    server.start()
    print(f"listening on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()


def _echo_gws(ws: object) -> None:
    while True:
        message = ws.receive()  # type: ignore[attr-defined]
        if message is None:
            return
        ws.send(message, binary=True)  # type: ignore[attr-defined]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.peers.gws",
                                     description="serve the gevent-websocket peer")
    parser.add_argument("--prefix", default="", help="path prefix of /vm/{name}/forward")
    args = parser.parse_args()
    serve_gws(args.prefix.rstrip("/"))
