"""A tiny site run by gunicorn's gevent worker: its config (hooks, logging) and its WSGI app.

    gunicorn -k gevent -w 2 --chdir tests/apps -c python:gunicorn_site gunicorn_site:app

Each worker starts its own forwarder to the HTTP guest (support.py's blob pages)
behind a daemon, in the hook that GFORWARD_HOOK names:

* ``post_fork``: gunicorn calls it in the new worker *before* the gevent worker
  patches the process, so the forwarder finds a plain process and runs in its
  own hub thread; once gevent has patched the worker, its first tunnel logs
  gforward.forwarder.PATCHED_LATE, once;
* ``post_worker_init``: after patching, so the forwarder joins the worker's own
  hub, and says nothing of the kind.

A request for /blob/SEED/SIZE is fetched through the worker's forwarder and
answered with the guest's body, and the worker's pid in X-Worker.  The gforward
logger's records go to stderr as ``gforward-log pid=PID LEVEL MESSAGE`` (the
harness, gunicorn_app.py, reads them there).  GFORWARD_DAEMON is the daemon's
URL, GFORWARD_GUEST the guest's HOST:PORT.

gunicorn loads this module as its config in the master (the workers inherit it
when forked) and again, the same module object, as the worker's WSGI app.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from typing import Any, Callable

from gunicorn.glogging import CONFIG_DEFAULTS

HOOK = os.environ.get("GFORWARD_HOOK", "post_worker_init")
LOG_PREFIX = "gforward-log"

# gunicorn settings -------------------------------------------------------------------

worker_class = "gevent"
workers = 2
graceful_timeout = 5
timeout = 30
control_socket_disable = True  # gunicorn 24+: no control socket under ~/.gunicorn
# gunicorn's own logging on stderr (no access log), and the gforward logger's warnings
# there too, marked.
logconfig_dict: dict[str, Any] = {
    **CONFIG_DEFAULTS,
    "root": {"level": "INFO", "handlers": []},
    "loggers": {**CONFIG_DEFAULTS["loggers"],
                "gunicorn.access": {"level": "WARNING", "handlers": [], "propagate": False},
                "gforward": {"handlers": ["gforward"], "level": "WARNING",
                             "propagate": False}},
    "formatters": {**CONFIG_DEFAULTS["formatters"], "gforward": {
        "format": f"{LOG_PREFIX} pid=%(process)d %(levelname)s %(message)s"}},
    "handlers": {**CONFIG_DEFAULTS["handlers"], "gforward": {
        "class": "logging.StreamHandler", "formatter": "gforward",
        "stream": "ext://sys.stderr"}},
}

forwarder: Any = None  # this worker's


def _start_forwarder() -> None:
    global forwarder
    import gforward

    forwarder = gforward.start(base_url=os.environ["GFORWARD_DAEMON"], vm_name="gunicorn",
                               specs=[f"127.0.0.1:0:{os.environ['GFORWARD_GUEST']}"],
                               proxy="")


def post_fork(server: Any, worker: Any) -> None:
    if HOOK == "post_fork":
        _start_forwarder()


def post_worker_init(worker: Any) -> None:
    if HOOK == "post_worker_init":
        _start_forwarder()


# The WSGI app ------------------------------------------------------------------------


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    path = environ.get("PATH_INFO", "")
    if forwarder is None or not path.startswith("/blob/"):
        start_response("404 Not Found", [("Content-Length", "0")])
        return []
    port = forwarder.listeners[0].port
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://127.0.0.1:{port}{path}", timeout=15) as reply:
            body = reply.read()
    except OSError as exc:
        print(f"worker {os.getpid()}: {path}: {exc!r}", file=sys.stderr, flush=True)
        start_response("502 Bad Gateway", [("Content-Length", "0")])
        return []
    start_response("200 OK", [("Content-Length", str(len(body))),
                              ("X-Worker", str(os.getpid()))])
    return [body]
