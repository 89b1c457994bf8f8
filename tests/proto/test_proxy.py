"""gforward.proto.proxy without sockets: which proxy, NO_PROXY, the CONNECT request and its answer.

Where the module claims to do what urllib.request does, the tests ask urllib
itself; where it claims to differ, they pin the difference down.
"""

from __future__ import annotations

import base64
import os
import urllib.request
from typing import Callable
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gforward.proto.mapping import join_host_port
from gforward.proto.proxy import (
    ConnectHandshake,
    Proxy,
    ProxyError,
    bypass,
    environment_proxies,
    parse_proxy_url,
    select_proxy,
)

# Undocumented in urllib (and so absent from typeshed), but what urllib.request.proxy_bypass
# runs on Linux.
URLLIB_BYPASS: Callable[[str, dict[str, str]], bool] = (
    urllib.request.proxy_bypass_environment)  # type: ignore[attr-defined]
SECRET = "pa:ss/w@rd"  # percent-encoded in URLs as pa%3Ass%2Fw%40rd


# The environment, as urllib reads it -------------------------------------------------

_NAMES = st.sampled_from([
    "http_proxy", "HTTP_PROXY", "Http_Proxy", "https_proxy", "HTTPS_PROXY", "HTTPS_proxy",
    "no_proxy", "NO_PROXY", "all_proxy", "REQUEST_METHOD", "PATH",
])
_VALUES = st.sampled_from(["", "http://a:1", "http://b:2", "*", "example.com"])


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=8))
def test_environment_is_read_as_urllib_reads_it(pairs: list[tuple[str, str]]) -> None:
    environ = dict(pairs)
    with mock.patch.object(os, "environ", environ):  # urllib reads os.environ itself
        expected = urllib.request.getproxies_environment()
    assert environment_proxies(environ) == expected


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"HTTPS_PROXY": "http://up:1", "https_proxy": "http://low:2"}, "http://low:2"),
        ({"HTTPS_PROXY": "http://up:1", "https_proxy": ""}, None),  # empty lower-case wins
        ({"HTTPS_PROXY": "http://up:1"}, "http://up:1"),
        ({"HTTP_PROXY": "http://plain:1"}, None),  # an https daemon reads HTTPS_PROXY only
        ({"ALL_PROXY": "http://all:1"}, None),  # ignored, as urllib does
    ],
)
def test_https_daemon_reads_https_proxy(environ: dict[str, str], expected: str | None) -> None:
    chosen = select_proxy("https", "daemon.example", 443, explicit=None, environ=environ)
    shown = None if chosen is None else f"http://{chosen.host}:{chosen.port}"
    assert shown == expected


def test_http_daemon_reads_http_proxy_but_not_under_cgi() -> None:
    environ = {"HTTP_PROXY": "http://plain:1", "HTTPS_PROXY": "http://secure:2"}
    assert select_proxy("http", "d", 80, explicit=None, environ=environ) == Proxy(
        "plain", 1, source="HTTP_PROXY")
    cgi = {**environ, "REQUEST_METHOD": "GET"}  # httpoxy: a client may have set HTTP_PROXY
    assert select_proxy("http", "d", 80, explicit=None, environ=cgi) is None
    assert select_proxy("http", "d", 80, explicit=None,
                        environ={**cgi, "http_proxy": "http://mine:3"}) == Proxy(
        "mine", 3, source="HTTP_PROXY")


def test_explicit_proxy_overrides_the_whole_environment() -> None:
    environ = {"HTTPS_PROXY": "http://env:1", "NO_PROXY": "*"}
    chosen = select_proxy("https", "d", 443, explicit="http://opt:2", environ=environ)
    assert chosen == Proxy("opt", 2, source="Options.proxy")  # NO_PROXY does not apply
    assert select_proxy("https", "d", 443, explicit="", environ=environ) is None
    assert select_proxy("https", "d", 443, explicit="  ", environ=environ) is None


@pytest.mark.parametrize("explicit", [None, "http://opt:2"])
def test_unix_daemons_never_use_a_proxy(explicit: str | None) -> None:
    environ = {"HTTP_PROXY": "http://env:1", "HTTPS_PROXY": "http://env:1"}
    assert select_proxy("unix", "", 0, explicit=explicit, environ=environ) is None


def test_no_proxy_applies_to_the_environment() -> None:
    environ = {"https_proxy": "http://env:1", "no_proxy": "internal.example"}
    assert select_proxy("https", "api.internal.example", 443, explicit=None,
                        environ=environ) is None
    assert select_proxy("https", "public.example", 443, explicit=None,
                        environ=environ) is not None


def test_invalid_proxy_in_the_environment_is_named() -> None:
    with pytest.raises(ValueError, match="HTTPS_PROXY") as caught:
        select_proxy("https", "d", 443, explicit=None,
                     environ={"HTTPS_PROXY": "socks5://user:hunter2@socks:1080"})
    assert "hunter2" not in str(caught.value)


# NO_PROXY ---------------------------------------------------------------------------

# (NO_PROXY value, host, port, bypassed); urllib agrees on every row.
SAME_AS_URLLIB = [
    ("example.com", "example.com", 443, True),
    ("example.com", "api.example.com", 443, True),
    (".example.com", "api.example.com", 443, True),
    (".example.com", "example.com", 443, True),
    ("example.com", "badexample.com", 443, False),
    ("EXAMPLE.com", "example.com", 443, True),
    (" other.org , example.com ", "example.com", 443, True),
    ("example.com:8443", "example.com", 8443, True),
    ("example.com:8443", "example.com", 9443, False),
    ("127.0.0.1", "127.0.0.1", 8080, True),
    ("[::1]", "::1", 8080, True),
    ("[::1]:8080", "::1", 8080, True),
    ("localhost", "127.0.0.1", 8080, False),  # names are not resolved
    ("*", "anything.example", 1, True),
    ("", "example.com", 443, False),
    (",,", "example.com", 443, False),
]


def _urllib_bypass(no_proxy: str, host: str, port: int) -> bool:
    """What urllib says for a URL with an explicit port (so "host:port" is its host)."""
    return bool(URLLIB_BYPASS(join_host_port(host, port), {"no": no_proxy}))


@pytest.mark.parametrize(("no_proxy", "host", "port", "expected"), SAME_AS_URLLIB)
def test_no_proxy_like_urllib(no_proxy: str, host: str, port: int, expected: bool) -> None:
    assert _urllib_bypass(no_proxy, host, port) == expected  # the table is urllib's behaviour
    assert bypass(no_proxy, host, port) == expected


# Where we differ: (NO_PROXY value, host, port, ours); urllib says the opposite.
DIFFERENT_FROM_URLLIB = [
    ("10.0.0.0/8", "10.1.2.3", 443, True),  # CIDR, as requests
    ("fd00::/8", "fd12::1", 443, True),
    ("*.example.com", "api.example.com", 443, True),  # as Go and curl
    ("other.org,*", "example.com", 443, True),  # "*" as one entry of a list
    ("::1", "::1", 8080, True),  # urllib wants IPv6 entries in brackets
    ("0:0::1", "::1", 8080, True),  # addresses, not spellings
    ("example.com:443", "example.com", 443, True),  # the effective port counts
]


@pytest.mark.parametrize(("no_proxy", "host", "port", "ours"), DIFFERENT_FROM_URLLIB)
def test_no_proxy_where_we_differ(no_proxy: str, host: str, port: int, ours: bool) -> None:
    if no_proxy == "example.com:443":  # https://example.com: no port in urllib's host
        assert not URLLIB_BYPASS(host, {"no": no_proxy})
    else:
        assert _urllib_bypass(no_proxy, host, port) != ours
    assert bypass(no_proxy, host, port) == ours


@pytest.mark.parametrize(
    ("no_proxy", "host", "port"),
    [
        ("10.0.0.0/8", "11.0.0.1", 443),
        ("10.0.0.0/8", "ten.example", 443),
        ("::/0", "10.0.0.1", 443),  # an IPv6 block never covers an IPv4 address
        ("not/a-network", "not", 443),
        ("[::1]:80", "::1", 8080),
        ("example.com:https", "example.com", 443),  # a port must be a number
        (".", "example.com", 443),
        ("*.", "example.com", 443),
    ],
)
def test_no_proxy_does_not_match(no_proxy: str, host: str, port: int) -> None:
    assert not bypass(no_proxy, host, port)


# Proxy URLs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "host", "port", "user", "password"),
    [
        ("http://proxy.corp:3128", "proxy.corp", 3128, "", ""),
        ("http://proxy.corp:3128/", "proxy.corp", 3128, "", ""),
        ("proxy.corp:3128", "proxy.corp", 3128, "", ""),  # no scheme: http://
        ("HTTP://Proxy.Corp", "proxy.corp", 80, "", ""),  # no port: 80, as urllib
        ("http://[::1]:3128", "::1", 3128, "", ""),
        ("http://alice@proxy:1", "proxy", 1, "alice", ""),
        ("http://alice:pa%3Ass%2Fw%40rd@proxy:1", "proxy", 1, "alice", SECRET),
        ("http://alice:p@ss@proxy:1", "proxy", 1, "alice", "p@ss"),  # the last @ ends it
        ("  http://proxy:1  ", "proxy", 1, "", ""),
    ],
)
def test_proxy_url(url: str, host: str, port: int, user: str, password: str) -> None:
    proxy = parse_proxy_url(url, "Options.proxy")
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == (host, port, user,
                                                                       password)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://user:hunter2@proxy:443", "only http:// proxies"),
        ("socks5h://user:hunter2@proxy:1080", "only http:// proxies"),
        ("http://user:hunter2@proxy:3128/path", "no path"),
        ("http://user:hunter2@proxy:3128?x=1", "no path"),
        ("http://user:hunter2@proxy:99999", "out of range"),
        ("http://user:hunter2@proxy:31a", "invalid port"),
        ("http://user:hunter2@:3128", "no host"),
        ("http://user:hunter2@::1:3128", "brackets"),
        ("http://user:hunter2@prox y:3128", "ASCII without spaces"),
    ],
)
def test_unusable_proxy_url(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        parse_proxy_url(url, "HTTPS_PROXY")
    message = str(caught.value)
    assert "HTTPS_PROXY" in message
    assert "hunter2" not in message, message


def test_credentials_stay_out_of_repr_and_descriptions() -> None:
    proxy = parse_proxy_url("http://alice:pa%3Ass%2Fw%40rd@proxy:3128", "HTTPS_PROXY")
    assert SECRET not in repr(proxy) and "alice" not in repr(proxy)
    assert proxy.describe() == "http://proxy:3128 (from HTTPS_PROXY)"
    assert parse_proxy_url("http://[::1]:1", "x").describe() == "http://[::1]:1 (from x)"


# CONNECT ----------------------------------------------------------------------------


def _connect(proxy_url: str = "http://proxy:3128", host: str = "daemon.example",
             port: int = 443) -> ConnectHandshake:
    return ConnectHandshake(parse_proxy_url(proxy_url, "Options.proxy"), host, port, "ua/1")


def test_connect_request_without_credentials() -> None:
    assert _connect().request == (b"CONNECT daemon.example:443 HTTP/1.1\r\n"
                                  b"Host: daemon.example:443\r\nUser-Agent: ua/1\r\n\r\n")


def test_connect_request_with_credentials_and_ipv6_target() -> None:
    handshake = _connect("http://alice:pa%3Ass%2Fw%40rd@proxy:3128", "::1", 8080)
    lines = handshake.request.decode().split("\r\n")
    assert lines[0] == "CONNECT [::1]:8080 HTTP/1.1"
    assert "Host: [::1]:8080" in lines
    expected = base64.b64encode(f"alice:{SECRET}".encode()).decode()
    assert f"Proxy-Authorization: Basic {expected}" in lines


def test_user_name_alone_is_sent_with_an_empty_password() -> None:
    handshake = _connect("http://bob@proxy:3128")
    assert b"Proxy-Authorization: Basic " + base64.b64encode(b"bob:") in handshake.request


@pytest.mark.parametrize(
    "chunks",
    [
        [b"HTTP/1.1 200 Connection established\r\n\r\n"],
        [b"HTTP/1.0 200 OK\r\nProxy-agent: x\r\n\r\n"],
        [b"HTTP/1.1 2", b"00 OK\r\n", b"\r", b"\n"],
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"],
    ],
    ids=["one read", "HTTP/1.0", "byte by byte", "100 first"],
)
def test_tunnel_opens_on_2xx(chunks: list[bytes]) -> None:
    handshake = _connect()
    results = [handshake.receive(chunk) for chunk in chunks]
    assert results == [False] * (len(chunks) - 1) + [True]


@pytest.mark.parametrize(
    ("proxy_url", "answer", "logged"),
    [
        ("http://proxy:1", b"HTTP/1.1 407 Proxy Authentication Required\r\n"
         b"Proxy-Authenticate: Basic realm=\"corp\"\r\n\r\n",
         "HTTP/1.1 407 Proxy Authentication Required (it wants credentials"),
        ("http://alice:wrong@proxy:1", b"HTTP/1.1 407 Proxy Authentication Required\r\n"
         b"Proxy-Authenticate: Basic realm=\"corp\"\r\n\r\n",
         "(it did not accept the user name and password"),
        ("http://alice:pw@proxy:1", b"HTTP/1.1 407 Proxy Authentication Required\r\n"
         b"Proxy-Authenticate: Negotiate\r\nProxy-Authenticate: NTLM\r\n\r\n",
         "(it asks for Negotiate, NTLM authentication; gforward sends Basic only)"),
        ("http://proxy:1", b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
         "refused with HTTP/1.1 403 Forbidden"),
        ("http://proxy:1", b"HTTP/1.1 502 Bad Gateway\r\n\r\n", "HTTP/1.1 502 Bad Gateway"),
    ],
)
def test_refusals_say_why(proxy_url: str, answer: bytes, logged: str) -> None:
    handshake = _connect(proxy_url)
    with pytest.raises(ProxyError) as caught:
        handshake.receive(answer)
    message = str(caught.value)
    assert logged in message
    assert message.startswith("CONNECT daemon.example:443 through proxy http://proxy:1 "
                              "(from Options.proxy): ")
    assert "wrong" not in message and "pw" not in message


@pytest.mark.parametrize(
    ("chunks", "problem"),
    [
        ([b""], "closed the connection before answering"),
        ([b"HTTP/1.1 200 OK\r\n", b""], "closed the connection before answering"),
        ([b"SSH-2.0-OpenSSH_9.2\r\n\r\n"], "invalid answer from the proxy"),
        ([b"HTTP/1.1 200 OK\r\n\r\n\x16\x03\x01"], "bytes after 'HTTP/1.1 200 OK'"),
        ([b"HTTP/1.1 200 OK\r\nX: " + b"y" * 20000], "invalid answer from the proxy"),
    ],
    ids=["EOF", "EOF mid-head", "not HTTP", "bytes after 200", "head too big"],
)
def test_broken_answers(chunks: list[bytes], problem: str) -> None:
    handshake = _connect()
    with pytest.raises(ProxyError, match=problem):
        for chunk in chunks:
            handshake.receive(chunk)


def test_each_tunnel_gets_a_fresh_exchange() -> None:
    """One refused CONNECT must not poison the next tunnel's."""
    proxy = Proxy("proxy", 1)
    first = ConnectHandshake(proxy, "d", 1, "ua")
    with pytest.raises(ProxyError):
        first.receive(b"HTTP/1.1 503 Busy\r\n\r\n")
    assert ConnectHandshake(proxy, "d", 1, "ua").receive(b"HTTP/1.1 200 OK\r\n\r\n")
