"""The WebSocket upgrade, both roles, as bytes in and bytes out."""

from __future__ import annotations

import base64
import hashlib

import h11
import pytest
import wsproto.utilities
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from gforward.errors import ForwardError
from gforward.proto.frames import OP_BINARY, FrameReader, encode_frame
from gforward.proto.handshake import (
    BODY_PREVIEW,
    MAX_HEAD,
    Accepted,
    ClientHandshake,
    HandshakeError,
    ServerHandshake,
    Upgrade,
    UpgradeRequest,
    accept_token,
    fast_accept,
    rejection,
    upgrade_headers,
)

TARGET = "/prefix/vm/sbox-1/forward"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def make_client(token: str = "tok", host: str = "slicer.example:8080") -> ClientHandshake:
    return Upgrade(
        host=host,
        target=TARGET,
        headers=upgrade_headers(
            token=token, client_id="me", upstream="127.0.0.1:80", user_agent="gforward/x"
        ),
    ).handshake()


def parse_request(data: bytes) -> tuple[h11.Request, list[tuple[str, str]]]:
    """The request as an independent HTTP/1.1 parser sees it."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request = conn.next_event()
    assert isinstance(request, h11.Request)
    assert isinstance(conn.next_event(), h11.EndOfMessage)  # no body
    headers = [(k.decode(), v.decode()) for k, v in request.headers]
    return request, headers


def feed_all(client: ClientHandshake, chunks) -> Accepted | None:
    result = None
    for chunk in chunks:
        assert result is None, "bytes fed after the verdict"
        result = client.receive(chunk)
    return result


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def accept_for(request: bytes) -> bytes:
    server = ServerHandshake()
    assert server.receive(request) is not None
    return server.accept()


# --- the request --------------------------------------------------------------


def test_request_has_exactly_the_api_headers() -> None:
    client = make_client()
    request, headers = parse_request(client.request)
    assert request.method == b"GET"
    assert request.target == TARGET.encode()
    assert request.http_version == b"1.1"
    assert client.request.startswith(f"GET {TARGET} HTTP/1.1\r\n".encode())

    names = [name for name, _ in headers]
    assert len(names) == len(set(names)), "a header sent twice"
    values = dict(headers)
    assert set(values) == {
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "authorization",
        "x-inlets-client-id",
        "x-inlets-mode",
        "x-inlets-upstream",
        "user-agent",
    }
    assert values["host"] == "slicer.example:8080"
    assert values["upgrade"].lower() == "websocket"
    assert values["connection"].lower() == "upgrade"
    assert len(base64.b64decode(values["sec-websocket-key"], validate=True)) == 16
    assert values["sec-websocket-version"] == "13"
    assert values["authorization"] == "Bearer tok"
    assert values["x-inlets-client-id"] == "me"
    assert values["x-inlets-mode"] == "local"
    assert values["x-inlets-upstream"] == "127.0.0.1:80"
    assert values["user-agent"] == "gforward/x"


def test_no_subprotocol_or_extensions() -> None:
    lowered = make_client().request.lower()
    assert b"sec-websocket-protocol" not in lowered
    assert b"sec-websocket-extensions" not in lowered


def test_no_authorization_without_token() -> None:
    client = make_client(token="")
    _, headers = parse_request(client.request)
    assert "authorization" not in dict(headers)
    assert b"bearer" not in client.request.lower()
    assert dict(headers)["x-inlets-mode"] == "local"


def test_each_request_has_its_own_key() -> None:
    keys = {dict(parse_request(make_client().request)[1])["sec-websocket-key"] for _ in range(5)}
    assert len(keys) == 5


def test_unix_socket_host() -> None:
    _, headers = parse_request(
        Upgrade(host="localhost", target="/vm/a/forward", headers=[]).handshake().request
    )
    assert dict(headers)["host"] == "localhost"


# --- round trips --------------------------------------------------------------


def test_round_trip_with_server_handshake() -> None:
    client = make_client()
    server = ServerHandshake()
    upgrade = server.receive(client.request)
    assert isinstance(upgrade, UpgradeRequest)
    assert upgrade.target == TARGET
    assert upgrade.trailing == b""
    assert all(name == name.lower() for name in upgrade.headers)
    assert upgrade.headers["authorization"] == "Bearer tok"
    assert upgrade.headers["x-inlets-client-id"] == "me"
    assert upgrade.headers["x-inlets-mode"] == "local"
    assert upgrade.headers["x-inlets-upstream"] == "127.0.0.1:80"
    assert upgrade.headers["user-agent"] == "gforward/x"

    answer = server.accept()
    assert answer.startswith(b"HTTP/1.1 101 ")
    key = dict(parse_request(client.request)[1])["sec-websocket-key"].encode()
    expected_accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    assert b"Sec-WebSocket-Accept: " + expected_accept + b"\r\n" in answer
    assert client.receive(answer) == Accepted(b"")


def test_frames_after_the_101_come_back_as_trailing() -> None:
    client = make_client()
    frames = encode_frame(OP_BINARY, b"early", mask=False) + encode_frame(
        OP_BINARY, b"bytes", mask=False
    )
    result = client.receive(accept_for(client.request) + frames)
    assert result == Accepted(frames)
    payloads: list = []
    assert FrameReader(masked=False).feed(result.trailing, payloads) == []
    assert [bytes(piece) for piece in payloads] == [b"early", b"bytes"]


def test_answer_one_byte_at_a_time() -> None:
    client = make_client()
    answer = accept_for(client.request)
    for byte in bytewise(answer)[:-1]:
        assert client.receive(byte) is None
    assert client.receive(answer[-1:]) == Accepted(b"")


def test_answer_in_two_reads_with_trailing_frame() -> None:
    client = make_client()
    answer = accept_for(client.request)
    frame = encode_frame(OP_BINARY, b"x" * 300, mask=False)
    assert client.receive(answer[:-2]) is None
    assert client.receive(answer[-2:] + frame) == Accepted(frame)


def test_server_request_one_byte_at_a_time_with_trailing() -> None:
    client = make_client()
    frame = encode_frame(OP_BINARY, b"hello", mask=True)
    server = ServerHandshake()
    for byte in bytewise(client.request)[:-1]:
        assert server.receive(byte) is None
    upgrade = server.receive(client.request[-1:] + frame)
    assert upgrade is not None
    assert upgrade.target == TARGET
    assert upgrade.trailing == frame
    assert client.receive(server.accept()) == Accepted(b"")


def test_wsproto_server_accepts_our_request() -> None:
    client = make_client()
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.request)
    [event] = list(server.events())
    assert isinstance(event, Request)
    assert event.target == TARGET
    assert event.host == "slicer.example:8080"
    assert event.subprotocols == []
    assert event.extensions == []
    answer = server.send(AcceptConnection())
    assert client.receive(answer) == Accepted(b"")


# --- refusals and broken answers ------------------------------------------------


def test_wrong_accept_key() -> None:
    client = make_client()
    answer = accept_for(make_client().request)  # the accept for another key
    with pytest.raises(HandshakeError) as info:
        client.receive(answer)
    assert "HTTP/1.1 101 Switching Protocols" in str(info.value)
    assert info.value.status_line == "HTTP/1.1 101 Switching Protocols"
    assert isinstance(info.value, ForwardError)


def test_101_without_accept_key() -> None:
    client = make_client()
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    with pytest.raises(HandshakeError, match="101 Switching Protocols"):
        client.receive(answer)


HEAD_THEN_BODY = "head-then-body"


def split_modes(answer: bytes) -> dict[str, list[bytes]]:
    cut = answer.index(b"\r\n\r\n") + 4
    return {
        "whole": [answer],
        HEAD_THEN_BODY: [answer[:cut], answer[cut:]],
        "bytewise": bytewise(answer),
    }


@pytest.mark.parametrize("mode", ["whole", HEAD_THEN_BODY, "bytewise"])
@pytest.mark.parametrize(
    ("status", "line", "text"),
    [
        (401, "HTTP/1.1 401 Unauthorized", "bad token"),
        (404, "HTTP/1.1 404 Not Found", "no such vm"),
        (502, "HTTP/1.1 502 Bad Gateway", "cannot dial 127.0.0.1:80"),
    ],
)
def test_refusal_with_body(mode: str, status: int, line: str, text: str) -> None:
    client = make_client()
    with pytest.raises(HandshakeError) as info:
        feed_all(client, split_modes(rejection(status, text))[mode])
    error = info.value
    assert error.status_line == line
    assert error.body.startswith(text.encode())
    assert line in str(error)
    assert text in str(error)


def test_refusal_body_arriving_late_then_eof() -> None:
    """A body without a length ends at EOF; what came before it is reported."""
    client = make_client()
    assert client.receive(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n") is None
    assert client.receive(b"upstream not ") is None
    with pytest.raises(HandshakeError) as info:
        client.receive(b"allowed")
        client.receive(b"")
    assert info.value.status_line == "HTTP/1.1 403 Forbidden"
    assert info.value.body == b"upstream not allowed"


@pytest.mark.parametrize("mode", ["whole", HEAD_THEN_BODY, "bytewise"])
def test_long_refusal_body_is_cut(mode: str) -> None:
    client = make_client()
    with pytest.raises(HandshakeError) as info:
        feed_all(client, split_modes(rejection(502, "y" * 5000))[mode])
    assert info.value.body == b"y" * BODY_PREVIEW
    assert len(str(info.value)) < BODY_PREVIEW + 100


@pytest.mark.parametrize("mode", ["whole", HEAD_THEN_BODY, "bytewise"])
def test_chunked_refusal_body(mode: str) -> None:
    answer = (
        b"HTTP/1.1 403 Forbidden\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    client = make_client()
    with pytest.raises(HandshakeError) as info:
        feed_all(client, split_modes(answer)[mode])
    assert info.value.status_line == "HTTP/1.1 403 Forbidden"
    assert info.value.body == b"hello world"


def test_refusal_without_body() -> None:
    client = make_client()
    with pytest.raises(HandshakeError) as info:
        client.receive(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert info.value.status_line == "HTTP/1.1 404 Not Found"
    assert info.value.body == b""
    assert "404 Not Found" in str(info.value)


def test_refusal_without_body_one_byte_at_a_time() -> None:
    client = make_client()
    answer = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(HandshakeError) as info:
        feed_all(client, bytewise(answer))
    assert info.value.status_line == "HTTP/1.1 401 Unauthorized"


@pytest.mark.parametrize("partial", [b"", b"HTTP/1.1 101 Sw", b"HTTP/1.1 101 Switching\r\n"])
def test_eof_before_head_ends(partial: bytes) -> None:
    client = make_client()
    if partial:
        assert client.receive(partial) is None
    with pytest.raises(HandshakeError, match="closed the connection before answering"):
        client.receive(b"")


def test_head_over_64_kib() -> None:
    client = make_client()
    assert client.receive(b"HTTP/1.1 101 Switching Protocols\r\n") is None
    with pytest.raises(HandshakeError, match="64 KiB"):
        for _ in range(MAX_HEAD // 1000 + 2):
            assert client.receive(b"X-Pad: " + b"a" * 991 + b"\r\n") is None


def test_garbage_answer() -> None:
    client = make_client()
    with pytest.raises(HandshakeError) as info:
        client.receive(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    assert "SSH-2.0-OpenSSH_9.6" in str(info.value)


def test_error_text_is_one_printable_line() -> None:
    client = make_client()
    answer = rejection(400, "line one\nline two\x1b[31m red\x00")
    with pytest.raises(HandshakeError) as info:
        client.receive(answer)
    message = str(info.value)
    assert message.isprintable()
    assert "line one line two" in message


SECRET = "s3cr3t"
FAILURES = {
    "wrong-accept": lambda: accept_for(make_client().request),
    "401": lambda: rejection(401, "bad token"),
    "404-empty": lambda: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    "garbage": lambda: b"garbage\r\n\r\n",
    "eof": lambda: b"HTTP/1.1 10",
    "huge-head": lambda: b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD + 10),
}


@pytest.mark.parametrize("answer", list(FAILURES))
def test_errors_never_show_the_token(answer: str) -> None:
    client = make_client(token=SECRET)
    assert SECRET.encode() in client.request  # it was sent...
    with pytest.raises(HandshakeError) as info:
        client.receive(FAILURES[answer]())
        client.receive(b"")
    error = info.value
    for text in (str(error), repr(error), error.status_line, error.reason):
        assert SECRET not in text  # ...but never shows up in what gets logged
    assert SECRET.encode() not in error.body


# --- the server side -------------------------------------------------------------


def test_plain_get_is_not_an_upgrade() -> None:
    server = ServerHandshake()
    with pytest.raises(HandshakeError):
        server.receive(b"GET /vm/a/forward HTTP/1.1\r\nHost: localhost\r\n\r\n")


def test_upgrade_without_key_is_refused() -> None:
    server = ServerHandshake()
    request = (
        b"GET /vm/a/forward HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with pytest.raises(HandshakeError):
        server.receive(request)


@pytest.mark.parametrize(
    "garbage", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"hello there\r\n\r\n"]
)
def test_garbage_request(garbage: bytes) -> None:
    with pytest.raises(HandshakeError):
        ServerHandshake().receive(garbage)


@pytest.mark.parametrize("partial", [b"", b"GET /vm/a/forward HTTP/1.1\r\nHost: x\r\n"])
def test_eof_before_request_head(partial: bytes) -> None:
    server = ServerHandshake()
    if partial:
        assert server.receive(partial) is None
    with pytest.raises(HandshakeError):
        server.receive(b"")


def test_request_head_over_64_kib() -> None:
    server = ServerHandshake()
    with pytest.raises(HandshakeError, match="64 KiB"):
        server.receive(b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10))


@pytest.mark.parametrize(
    ("status", "message"),
    [(502, "cannot dial"), (401, "bad token"), (403, "upstream not allowed: 10.0.0.1:22")],
)
def test_rejection_is_a_well_formed_response(status: int, message: str) -> None:
    answer = rejection(status, message)
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(answer)
    response = conn.next_event()
    assert isinstance(response, h11.Response)
    assert response.status_code == status
    assert response.http_version == b"1.1"
    headers = dict(response.headers)
    assert headers[b"content-type"].startswith(b"text/plain")
    assert headers[b"connection"] == b"close"
    body = b""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.EndOfMessage):
            break
        assert isinstance(event, h11.Data)
        body += event.data
    assert body.decode("utf-8").strip() == message
    assert conn.their_state is h11.MUST_CLOSE  # Connection: close is understood
    assert conn.trailing_data == (b"", False)  # nothing after the body


def test_rejection_round_trip_through_client() -> None:
    client = make_client()
    server = ServerHandshake()
    assert server.receive(client.request) is not None
    with pytest.raises(HandshakeError) as info:
        client.receive(rejection(502, "cannot dial"))
    assert info.value.status_line == "HTTP/1.1 502 Bad Gateway"
    assert info.value.body.strip() == b"cannot dial"


# --- the fast check of a 101, held to wsproto's verdict -------------------------------------

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's example key
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # and its accept value (section 1.3)


def wsproto_accepts(head: bytes) -> bool:
    """wsproto's verdict on `head` as the answer to our request with KEY."""
    upgrade = Upgrade(host="h", target="/vm/v/forward", headers=[])
    h11 = upgrade.wsproto(KEY)
    try:
        h11.receive_data(head)
        events = list(h11.events())
    except wsproto.utilities.RemoteProtocolError:
        return False
    return bool(events) and isinstance(events[0], AcceptConnection)


def test_accept_token_is_rfc_6455s() -> None:
    assert accept_token(KEY) == ACCEPT


def test_wsproto_judges_with_our_key() -> None:
    """The fallback depends on wsproto keeping its key where Upgrade.wsproto puts ours."""
    good = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n")
    assert wsproto_accepts(good)
    assert not wsproto_accepts(good.replace(ACCEPT, accept_token(b"another key")))


COMMON_101S = {
    "ours": (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Accept: %s\r\n\r\n"),
    "coder/websocket (Go)": (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                             b"Sec-Websocket-Accept: %s\r\nUpgrade: websocket\r\n"
                             b"Date: Tue, 01 Dec 2026 20:00:00 GMT\r\n\r\n"),
    "nginx": (b"HTTP/1.1 101 Switching Protocols\r\nServer: nginx\r\n"
              b"Date: Tue, 01 Dec 2026 20:00:00 GMT\r\nConnection: upgrade\r\n"
              b"Upgrade: websocket\r\nSec-WebSocket-Accept: %s\r\n\r\n"),
    "bare status": b"HTTP/1.1 101\r\nupgrade: websocket\r\nconnection: keep-alive, Upgrade\r\n"
                   b"sec-websocket-accept:%s\r\n\r\n",
}


@pytest.mark.parametrize("template", COMMON_101S.values(), ids=COMMON_101S.keys())
def test_common_101s_pass_the_fast_check(template: bytes) -> None:
    head = template % ACCEPT
    assert fast_accept(head, ACCEPT)
    assert wsproto_accepts(head)


def test_the_servers_own_101_passes_the_fast_check() -> None:
    client = make_client()
    answer = accept_for(client.request)
    assert fast_accept(answer, accept_token(client._key))


LINES = st.sampled_from([
    b"Upgrade: websocket", b"Upgrade: WebSocket", b"Upgrade: websocket, h2c", b"Upgrade: h2c",
    b"Upgrade:", b"Upgrade : websocket", b"Connection: Upgrade", b"Connection: keep-alive",
    b"Connection: keep-alive, upgrade", b"Connection:upgrade", b"Connection: upgradez",
    b"Sec-WebSocket-Accept: " + ACCEPT, b"Sec-WebSocket-Accept:  " + ACCEPT + b" \t",
    b"Sec-WebSocket-Accept: " + ACCEPT.lower(), b"Sec-WebSocket-Accept: " + ACCEPT[:-1],
    b"Sec-WebSocket-Extensions: permessage-deflate", b"Sec-WebSocket-Extensions:",
    b"Sec-WebSocket-Protocol: chat", b"Content-Length: 0", b"Content-Length: x",
    b"Transfer-Encoding: gzip", b" folded: value", b"\tfolded", b"X-Empty:", b"X: \x80\xff",
    b"X-Ctl: a\x01b", b"Bad Name: v", b":novalue", b"X-Ok: fine", b"Date: today",
    b"Upgrade: websocket\n", b"Connection: Upgrade\r", b"x" * 9000,
])
STATUS = st.sampled_from([
    b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 101", b"HTTP/1.1 101 ", b"HTTP/1.0 101 OK",
    b"HTTP/1.1 200 OK", b"HTTP/1.1 1010 x", b"HTTP/2 101 x", b"http/1.1 101 x",
    b"HTTP/1.1 101 caf\xc3\xa9", b"HTTP/1.1  101 x",
])


@settings(max_examples=3000, deadline=None)
@given(STATUS, st.lists(LINES, max_size=8))
def test_fast_check_never_accepts_what_wsproto_refuses(status: bytes, lines: list[bytes]) -> None:
    head = b"\r\n".join([status, *lines]) + b"\r\n\r\n"
    if fast_accept(head, ACCEPT):
        assert wsproto_accepts(head), head
