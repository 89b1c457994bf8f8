"""The `gforward` command: arguments, environment, exit codes; the library does the rest.

    gforward sbox-1 8080:127.0.0.1:80 --url http://192.168.1.10:8080 --token-file ~/.slicer/token

Exit status: 0 after SIGINT or SIGTERM, 1 when a listener cannot bind (or the
guest is not ready in time, with --wait-ready), 2 for bad arguments (specs, URL,
token file included), as argparse does.  SIGUSR1 prints every listener's
counters on stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ._version import __version__
from .command import log_to_stderr, read_token_file, seconds, serve
from .errors import ForwardError
from .forwarder import WILDCARD_WARNING, Forwarder, start
from .options import Options
from .proto.endpoint import parse_base_url
from .proto.mapping import is_loopback_host, parse_address_mapping

PROG = "gforward"


def _not_said_twice(record: logging.LogRecord) -> bool:
    """Logging filter: the library's per-listener wildcard warning goes, since announce()
    below says the same for every listener in one line."""
    return record.msg != WILDCARD_WARNING


def _parser() -> argparse.ArgumentParser:
    """The options of `slicer vm forward`, plus ssh's -L for those whose fingers know it."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Forward local TCP ports and unix sockets into a Slicer microVM.",
        epilog="SPEC is [LISTEN_HOST:]PORT:REMOTE_HOST:PORT, HOST:PORT, or a unix socket path "
               "on either side (e.g. 8080:127.0.0.1:80, /tmp/docker.sock:/var/run/docker.sock). "
               "Flags take precedence over SLICER_URL, SLICER_TOKEN and SLICER_TOKEN_FILE.",
    )
    parser.add_argument("vm", metavar="VM", help="name of the microVM, e.g. sbox-1")
    parser.add_argument("specs", metavar="SPEC", nargs="*", help="what to forward")
    parser.add_argument("-L", dest="extra_specs", metavar="SPEC", action="append", default=[],
                        help="what to forward, ssh style; repeatable")
    parser.add_argument("--url", help="daemon URL: http(s)://host:port[/prefix], unix:///path "
                                      "or a socket path (env SLICER_URL)")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token", help="bearer token (env SLICER_TOKEN)")
    auth.add_argument("--token-file", metavar="FILE",
                      help="read the bearer token from FILE (env SLICER_TOKEN_FILE)")
    parser.add_argument("--dial-timeout", type=seconds, metavar="SECONDS",
                        help="bound on proxy + connect + TLS + upgrade per tunnel (default 10)")
    parser.add_argument("--ping-interval", type=lambda t: seconds(t, zero=True),
                        metavar="SECONDS", help="ping a daemon silent this long (default 30; "
                        "0 turns keepalive off)")
    parser.add_argument("--ping-timeout", type=seconds, metavar="SECONDS",
                        help="cut a tunnel whose ping gets no answer this long (default 10)")
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--ca-file", metavar="FILE",
                       help="trust only the CA certificates in FILE (PEM) for an https:// "
                            "daemon, instead of the system's")
    trust.add_argument("--insecure", action="store_true",
                       help="do not verify the https:// daemon's certificate (warns)")
    parser.add_argument("--proxy", metavar="URL",
                        help="HTTP proxy, http://[USER:PASSWORD@]HOST:PORT, used instead of "
                             "HTTPS_PROXY/HTTP_PROXY/NO_PROXY; '' for none")
    parser.add_argument("--drain", type=lambda t: seconds(t, zero=True), default=0.0,
                        metavar="SECONDS", help="on SIGINT/SIGTERM, let open tunnels end for up "
                        "to SECONDS first (a second signal cuts at once; default 0)")
    parser.add_argument("--wait-ready", type=seconds, metavar="SECONDS",
                        help="print 'ready' once the daemon reaches every upstream, or exit 1 "
                             "if it does not within SECONDS")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log every tunnel opening and closing on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _token(args: argparse.Namespace) -> str:
    """Flag over environment; a token given directly over a token file at the same level."""
    if args.token is not None:
        return str(args.token)
    if args.token_file is not None:
        return read_token_file(args.token_file)
    if os.environ.get("SLICER_TOKEN"):
        return os.environ["SLICER_TOKEN"]
    if os.environ.get("SLICER_TOKEN_FILE"):
        return read_token_file(os.environ["SLICER_TOKEN_FILE"])
    return ""


def _warn(message: str) -> None:
    """One line on stderr, apart from stdout, which holds only the listener lines."""
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `gforward` and `python -m gforward`; returns the exit status."""
    parser = _parser()
    # intermixed: `VM -L SPEC SPEC` would otherwise leave the last SPEC unrecognised
    args = parser.parse_intermixed_args(argv)
    specs: list[str] = [*args.specs, *args.extra_specs]
    if not specs:
        parser.error("no SPEC given: nothing to forward")
    url = args.url or os.environ.get("SLICER_URL", "")
    if not url:
        parser.error("no daemon URL: pass --url or set SLICER_URL")
    try:
        token = _token(args)
        endpoint = parse_base_url(url)
    except ValueError as exc:
        parser.error(str(exc))
    log_to_stderr("gforward", args.verbose).addFilter(_not_said_twice)
    if token and endpoint.scheme == "http" and not is_loopback_host(endpoint.host):
        _warn(f"the token travels unencrypted to {endpoint.describe()}: use https://")
    options = Options(base_url=url, vm_name=args.vm, specs=specs, token=token,
                      ca_file=args.ca_file, insecure=args.insecure, proxy=args.proxy)
    for name in ("dial_timeout", "ping_interval", "ping_timeout"):
        if getattr(args, name) is not None:
            setattr(options, name, getattr(args, name))

    def announce(forwarder: Forwarder) -> None:
        """Runs once every listener is bound, so the lines carry the real ports."""
        for listener in forwarder.listeners:
            print(f"{listener.local} -> {args.vm} {listener.remote}", flush=True)
        exposed = [ln.local for ln in forwarder.listeners
                   if parse_address_mapping(ln.spec).listens_everywhere()]
        if exposed:
            _warn(WILDCARD_WARNING % (", ".join(exposed), args.vm))

    def ready(forwarder: Forwarder) -> str | None:
        """For --wait-ready: says `ready`, or why not."""
        try:
            if forwarder.wait_ready(args.wait_ready):
                print("ready", flush=True)
                return None
            return f"{PROG}: not ready within {args.wait_ready:g} s"
        except ForwardError as exc:
            return f"{PROG}: not ready: {exc}"

    try:
        return serve(lambda: start(options), announce, drain=args.drain,
                     report=lambda forwarder: _report(forwarder, args.vm),
                     ready=ready if args.wait_ready else None)
    except ValueError as exc:  # SpecError included: bad input, whatever stage found it
        parser.error(str(exc))
    except (ForwardError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


def _report(forwarder: Forwarder, vm: str) -> None:
    """SIGUSR1: each listener's counters on stderr, one logfmt line each, exact counts."""
    for stats in forwarder.stats().listeners:
        listener = stats.listener
        print(f"{PROG}: {listener.local} -> {vm} {listener.remote} open={stats.tunnels_open} "
              f"total={stats.tunnels_total} failed={stats.tunnels_failed} up={stats.bytes_up} "
              f"down={stats.bytes_down}", file=sys.stderr, flush=True)
