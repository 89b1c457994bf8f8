"""Which HTTP proxy stands between us and the daemon, and the CONNECT that crosses it.

Pure (floor 1): the environment comes in as a mapping, bytes come in and go
out, and nothing here opens a socket, so every rule is tested without one.
dial.py does the I/O.

Selection follows Python's own clients, urllib.request (`getproxies_environment`
and `proxy_bypass_environment`) and requests, so a process behaves the same
whether it fetches a URL with them or opens a tunnel with us:

* `http_proxy`/`https_proxy`, `no_proxy` and their upper-case spellings; a
  lower-case variable wins over the upper-case one, even when it is empty
  (which then means "no proxy"); under CGI (`REQUEST_METHOD` set) the
  upper-case `HTTP_PROXY` is ignored, as it may come from a client's
  `Proxy:` header (httpoxy, CVE-2016-1000110).
* The daemon URL's scheme picks the variable: `HTTPS_PROXY` for `https://`
  daemons, `HTTP_PROXY` for `http://`.  Unix-socket daemons never use a proxy.
* `NO_PROXY` is a comma-separated list; an entry matches the host itself or
  any subdomain (`example.com` and `.example.com` both cover
  `api.example.com`, never `badexample.com`); an entry with a port matches
  that port only; `*` matches everything.
* A proxy URL without a scheme is `http://`, without a port is port 80;
  `user:password@` in it (percent-decoded) becomes `Proxy-Authorization: Basic`.
* An explicit proxy (`Options.proxy`) replaces the environment entirely,
  `NO_PROXY` included, as requests treats its `proxies=` argument; `""` means none.

Where we differ, on purpose:

* Both schemes go through a CONNECT tunnel.  urllib and requests send
  `http://` requests to the proxy in absolute form, but a WebSocket needs a
  byte stream, which only CONNECT gives through a forward proxy.
* `NO_PROXY` also takes CIDR blocks (`10.0.0.0/8`, `fd00::/8`, as requests
  does), `*.example.com` (as Go and curl do), `*` as one entry of a list
  (urllib wants the whole value to be `*`), and IP literals compared as
  addresses, so `::1`, `[::1]` and `0:0::1` all cover `http://[::1]:8080`
  (urllib takes the bracketed spelling only).  requests' looser raw-suffix match
  (`ample.com` covering `example.com`) is not copied.  A `host:port` entry
  compares with the daemon's effective port, so `example.com:443` covers
  `https://example.com` (urllib compares the text of the URL).
* Only `http://` proxy URLs: a `socks5://` or `https://` (TLS to the proxy)
  one is refused by start() with the variable's name, where urllib would
  fail on first use and requests would try it.  `ALL_PROXY` is ignored, as
  urllib does (requests and curl use it).
* A user name without a password is sent as `user:` (requests does;
  urllib sends nothing unless both are given); credentials are UTF-8
  (urllib; requests uses latin-1).
* Loopback daemons are not exempt unless `NO_PROXY` says so, as in urllib,
  requests and curl, but unlike Go's `http.ProxyFromEnvironment`.
* The environment is read once, by start(), not per connection.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import h11

from ..errors import ForwardError
from .endpoint import mask_userinfo, split_host_port
from .handshake import printable
from .mapping import join_host_port

__all__ = [
    "ConnectHandshake",
    "Proxy",
    "ProxyError",
    "bypass",
    "environment_proxies",
    "parse_proxy_url",
    "select_proxy",
]

DEFAULT_PORT = 80  # urllib's and requests' choice for http:// proxies (curl's is 1080)
MAX_HEAD = 16 * 1024  # h11's own default bound on one answer head


class ProxyError(ForwardError):
    """The proxy could not be used: unreachable, refused the CONNECT, or answered nonsense."""

    def __init__(self, message: str, cause: str = "proxy") -> None:
        super().__init__(message, cause)


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy to tunnel through; credentials are kept out of repr and messages."""

    host: str
    port: int
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    source: str = "Options.proxy"  # where it came from, for messages: "HTTPS_PROXY", ...

    def describe(self) -> str:
        """The proxy for logs: its address and where it was configured, never credentials."""
        return f"http://{join_host_port(self.host, self.port)} (from {self.source})"

    def authorization(self) -> str | None:
        """`Proxy-Authorization` value, when the URL carried a user name."""
        if not self.username:
            return None
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def environment_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """urllib.request.getproxies_environment() over `environ`: {"https": url, "no": list, ...}.

    Two passes, as urllib makes them: any spelling of `<scheme>_proxy` first,
    then the names that end in lower-case `_proxy` again, so that they win and
    so that an empty one removes what an upper-case one said.
    """
    proxies: dict[str, str] = {}
    for name, value in environ.items():
        key = name.lower()
        if value and key.endswith("_proxy"):
            proxies[key[: -len("_proxy")]] = value
    if "REQUEST_METHOD" in environ:  # CGI: HTTP_PROXY may be a client's "Proxy:" header
        proxies.pop("http", None)
    for name, value in environ.items():
        if name.endswith("_proxy"):
            key = name.lower()[: -len("_proxy")]
            if value:
                proxies[key] = value
            else:
                proxies.pop(key, None)
    return proxies


def select_proxy(
    scheme: str, host: str, port: int, *, explicit: str | None, environ: Mapping[str, str]
) -> Proxy | None:
    """The proxy for a daemon at scheme://host:port, or None to connect directly.

    `explicit` is Options.proxy: None defers to `environ`, "" means no proxy.
    Raises ValueError (credentials masked) for a proxy URL we cannot use.
    """
    if scheme not in ("http", "https"):
        return None  # a unix socket is on this machine: no proxy can help
    if explicit is not None:
        return parse_proxy_url(explicit, "Options.proxy") if explicit.strip() else None
    proxies = environment_proxies(environ)
    url = proxies.get(scheme)
    if not url or bypass(proxies.get("no", ""), host, port):
        return None
    return parse_proxy_url(url, f"{scheme.upper()}_PROXY")


def parse_proxy_url(url: str, source: str) -> Proxy:
    """`[http://][user[:password]@]host[:port][/]` into a Proxy; ValueError otherwise."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text  # "proxy.corp:3128", as urllib and requests accept it
    shown = mask_userinfo(text)
    try:
        parts = urlsplit(text)
        if parts.scheme != "http":
            raise ValueError(f"unsupported scheme {parts.scheme!r}: only http:// proxies "
                             "(HTTP CONNECT) are supported")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("a proxy URL has no path, query or fragment")
        if any(not 0x21 <= ord(c) <= 0x7E for c in text):
            raise ValueError("must be ASCII without spaces")
        userinfo, _, hostport = parts.netloc.rpartition("@")
        host, port = split_host_port(hostport, DEFAULT_PORT)
    except ValueError as exc:
        raise ValueError(f"invalid proxy URL {shown!r} in {source}: {exc}") from None
    username, _, password = userinfo.partition(":")
    return Proxy(host, port, unquote(username), unquote(password), source)


def bypass(no_proxy: str, host: str, port: int) -> bool:
    """Whether the NO_PROXY value `no_proxy` exempts the daemon at host:port.

    `host` is spelled as Endpoint.host is: lower-case, IPv6 without brackets.
    Names are not resolved: `localhost` does not cover `127.0.0.1`.
    """
    address = _ip(host)
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if entry == "*":
            return True
        name, entry_port = _split_entry(entry)
        if not name or (entry_port is not None and entry_port != port):
            continue
        if "/" in name:
            try:
                network = ipaddress.ip_network(name, strict=False)
            except ValueError:
                continue
            if address is not None and address.version == network.version \
                    and address in network:
                return True
            continue
        listed = _ip(name)
        if listed is not None:
            if listed == address:
                return True
            continue
        name = name.lstrip("*").lstrip(".")  # "*.example.com" and ".example.com": the domain
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _split_entry(entry: str) -> tuple[str, int | None]:
    """A NO_PROXY entry into (host or CIDR, port or None): `[::1]:80`, `::1`, `h:80`, `h`."""
    if entry.startswith("["):
        inner, _, rest = entry[1:].partition("]")
        return inner, _port(rest[1:]) if rest.startswith(":") else None
    if "/" in entry or entry.count(":") != 1:
        return entry, None  # a CIDR block, a bare IPv6 address, or a plain name
    name, _, port = entry.partition(":")
    return name, _port(port)


def _port(text: str) -> int | None:
    """An entry's port; an unreadable one is -1, which matches no daemon."""
    return int(text) if text.isascii() and text.isdigit() else -1


class ConnectHandshake:
    """`CONNECT host:port` for one tunnel: send `request`, then `receive` until True.

    Like handshake.ClientHandshake, one object per tunnel: h11 keeps the state
    of one exchange.  Bytes after a 2xx head would be the daemon's, but no
    daemon speaks first (neither TLS nor the upgrade do), so they are an error
    rather than something to hand on.
    """

    def __init__(self, proxy: Proxy, host: str, port: int, user_agent: str) -> None:
        self.proxy = proxy
        self.target = join_host_port(host, port)
        self._h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        headers = [("Host", self.target), ("User-Agent", user_agent)]
        credentials = proxy.authorization()
        if credentials is not None:
            headers.append(("Proxy-Authorization", credentials))
        self.request = self._h11.send(h11.Request(method="CONNECT", target=self.target,
                                                  headers=headers))
        self._h11.send(h11.EndOfMessage())

    def receive(self, data: bytes) -> bool:
        """Feed bytes from the proxy (b"" at EOF); True once the tunnel is open.

        Raises ProxyError for anything but a 2xx answer; a 407 says whether
        credentials were missing, refused, or of a kind we cannot send.
        """
        response = self._response(data)
        if response is None:
            return False
        status = f"HTTP/{response.http_version.decode()} {response.status_code} " \
                 f"{printable(response.reason)}".rstrip()
        if not 200 <= response.status_code < 300:
            raise self._error(f"refused with {status}{self._hint(response)}")
        if self._h11.trailing_data[0]:
            raise self._error(f"bytes after {status!r}, before we sent any")
        return True

    def _response(self, data: bytes) -> h11.Response | None:
        """The final answer once its head is in; a 100 Continue before it is skipped."""
        try:
            self._h11.receive_data(data)
            while True:
                event = self._h11.next_event()
                if event is h11.NEED_DATA:
                    return None
                if isinstance(event, h11.Response):
                    return event
        except h11.RemoteProtocolError as exc:
            if not data:
                raise self._error("the proxy closed the connection before answering") from None
            raise self._error(f"invalid answer from the proxy ({exc})") from None

    def _hint(self, response: h11.Response) -> str:
        """What to do about a 407, the one refusal a user can fix on our side."""
        if response.status_code != 407:
            return ""
        offered = [printable(value).split(" ", 1)[0] for name, value in response.headers
                   if name == b"proxy-authenticate"]
        if offered and not any(scheme.lower() == "basic" for scheme in offered):
            return (f" (it asks for {', '.join(offered)} authentication; gforward sends "
                    "Basic only)")
        if self.proxy.authorization() is None:
            return " (it wants credentials: put them in the proxy URL, " \
                   "http://USER:PASSWORD@host:port)"
        return " (it did not accept the user name and password of the proxy URL)"

    def _error(self, what: str) -> ProxyError:
        return ProxyError(f"CONNECT {self.target} through proxy {self.proxy.describe()}: {what}")
