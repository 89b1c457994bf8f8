"""The tunnel's rules (gforward.proto.tunnel), without a socket: bytes in, queues and verdicts out,
with a fake clock for keepalive.  wsproto reads what the tunnel writes."""

from __future__ import annotations

import struct

import pytest
from wsproto.frame_protocol import FrameProtocol, Opcode

from gforward.proto.frames import OP_BINARY, OP_CLOSE, OP_PING, encode_frame
from gforward.proto.tunnel import Tunnel, consume

INTERVAL, TIMEOUT = 30.0, 10.0


def peer_frame(opcode: int, payload: bytes = b"", *, client: bool = True) -> bytes:
    """A frame as the peer of a `client`-role tunnel sends it (a server does not mask)."""
    return encode_frame(opcode, payload, mask=not client)


def close_frame(code: int, *, client: bool = True) -> bytes:
    return peer_frame(OP_CLOSE, struct.pack("!H", code), client=client)


def sent_frames(tunnel: Tunnel, *, client: bool = True, skip: int = 0
                ) -> list[tuple[Opcode, bytes]]:
    """Everything queued for the WebSocket, as wsproto (the peer) parses it, after the first
    `skip` bytes (the rest of a frame the driver had started); the queue is then taken, as
    a driver that wrote it all would."""
    proto = FrameProtocol(client=not client, extensions=[])
    proto.receive_bytes(b"".join(bytes(b) for b in tunnel.to_ws)[skip:])
    tunnel.to_ws.clear()
    found = []
    for frame in proto.received_frames():
        payload = frame.payload
        if frame.opcode is Opcode.CLOSE:
            payload = struct.pack("!H", payload[0]) if payload[0] else b""
        found.append((frame.opcode, bytes(payload)))
    return found


def delivered(tunnel: Tunnel) -> bytes:
    """What the driver would write to plain; the queue is then taken."""
    data = b"".join(bytes(b) for b in tunnel.to_plain)
    tunnel.to_plain.clear()
    return data


@pytest.mark.parametrize("client", [True, False], ids=["client", "server"])
def test_plain_bytes_go_as_one_binary_frame_each(client: bool) -> None:
    tunnel = Tunnel(client=client)
    tunnel.plain_data(b"hello")
    tunnel.plain_data(b"x" * 70000)
    assert sent_frames(tunnel, client=client) == [(Opcode.BINARY, b"hello"),
                                                  (Opcode.BINARY, b"x" * 70000)]
    assert tunnel.sent == 70005


@pytest.mark.parametrize("client", [True, False], ids=["client", "server"])
def test_frames_from_the_peer_go_to_plain_in_order(client: bool) -> None:
    tunnel = Tunnel(client=client)
    wire = b"".join(peer_frame(OP_BINARY, bytes([i]) * i, client=client) for i in range(1, 200))
    tunnel.ws_data(wire[:1000], 0.0)
    tunnel.ws_data(wire[1000:], 0.0)
    assert delivered(tunnel) == b"".join(bytes([i]) * i for i in range(1, 200))
    assert tunnel.received == sum(range(1, 200))
    assert tunnel.to_ws == []


def test_flow_control_reads_a_side_only_while_the_other_queue_is_empty() -> None:
    tunnel = Tunnel(client=True)
    assert tunnel.reading_plain and tunnel.reading_ws
    tunnel.ws_data(peer_frame(OP_BINARY, b"for plain"), 0.0)
    assert not tunnel.reading_ws  # plain has not taken it yet
    delivered(tunnel)
    assert tunnel.reading_ws


def test_a_peer_that_pings_and_reads_nothing_cannot_grow_the_queue() -> None:
    """One Pong waits at most, answering the latest Ping (RFC 6455 5.5.3)."""
    tunnel = Tunnel(client=True)
    tunnel.plain_data(b"d" * 100)
    consume(tunnel.to_ws, 3)  # the data frame has started: Pongs go after it
    for i in range(1000):
        tunnel.ws_data(peer_frame(OP_PING, b"%d" % i) * 50, 0.0)  # 50 Pings a read
        assert len(tunnel.to_ws) <= 4
    left = 2 + 4 + 100 - 3  # what is left of the data frame, skipped
    assert sent_frames(tunnel, skip=left) == [(Opcode.PONG, b"999")]


def test_local_eof_sends_close_after_what_came_before_and_the_reply_still_arrives() -> None:
    tunnel = Tunnel(client=True)
    tunnel.plain_data(b"request")
    tunnel.plain_eof()
    assert not tunnel.reading_plain
    assert sent_frames(tunnel) == [(Opcode.BINARY, b"request"), (Opcode.CLOSE, b"\x03\xe8")]
    tunnel.ws_data(peer_frame(OP_BINARY, b"reply"), 1e6)  # however late
    assert delivered(tunnel) == b"reply"
    assert not tunnel.finished and not tunnel.outcome
    tunnel.ws_data(close_frame(1000), 1e6)
    assert tunnel.shut_plain and tunnel.finished
    assert sent_frames(tunnel) == []  # our Close went already


def test_client_answers_the_daemons_close_at_once_and_ends() -> None:
    tunnel = Tunnel(client=True)
    tunnel.plain_data(b"in flight")
    tunnel.ws_data(peer_frame(OP_BINARY, b"last words") + close_frame(1000), 0.0)
    assert tunnel.shut_plain and not tunnel.reading_plain
    assert sent_frames(tunnel) == [(Opcode.BINARY, b"in flight"), (Opcode.CLOSE, b"\x03\xe8")]
    assert not tunnel.finished  # plain still has to take the last words
    assert delivered(tunnel) == b"last words"
    assert tunnel.finished and not tunnel.failed


def test_daemon_takes_a_clients_close_as_a_half_close() -> None:
    tunnel = Tunnel(client=False)
    tunnel.ws_data(peer_frame(OP_BINARY, b"request", client=False)
                   + close_frame(1000, client=False), 0.0)
    assert delivered(tunnel) == b"request"
    assert tunnel.shut_plain and tunnel.reading_plain  # the upstream may still answer
    assert sent_frames(tunnel, client=False) == []
    tunnel.plain_data(b"answer")
    assert not tunnel.finished
    tunnel.plain_eof()
    assert sent_frames(tunnel, client=False) == [(Opcode.BINARY, b"answer"),
                                                 (Opcode.CLOSE, b"\x03\xe8")]
    assert tunnel.finished and not tunnel.failed


def test_close_with_an_error_code_cuts_the_tunnel() -> None:
    tunnel = Tunnel(client=True)
    tunnel.ws_data(close_frame(1011), 0.0)
    assert tunnel.failed
    assert tunnel.outcome == "peer closed with code 1011 ''"
    assert sent_frames(tunnel) == [(Opcode.CLOSE, b"\x03\xf3")]  # answered with its code


def test_protocol_error_keeps_what_came_before_and_cuts() -> None:
    tunnel = Tunnel(client=True)
    tunnel.ws_data(peer_frame(OP_BINARY, b"good") + b"\x83\x00", 0.0)  # opcode 3: reserved
    assert delivered(tunnel) == b"good"
    assert tunnel.failed and tunnel.outcome.startswith("protocol error")
    assert sent_frames(tunnel) == [(Opcode.CLOSE, b"\x03\xea")]  # 1002


def test_websocket_lost_without_a_close_is_a_cut() -> None:
    tunnel = Tunnel(client=True)
    tunnel.ws_lost("WebSocket lost without a Close frame")
    assert tunnel.failed and tunnel.outcome == "WebSocket lost without a Close frame"


def test_a_peer_that_hangs_up_after_its_close_ends_cleanly() -> None:
    """Some daemons close TCP right after their Close: fine when only our answer was left."""
    tunnel = Tunnel(client=True)
    tunnel.ws_data(peer_frame(OP_BINARY, b"bye") + close_frame(1000), 0.0)
    tunnel.ws_lost("WebSocket lost without a Close frame")
    assert not tunnel.outcome and not tunnel.reading_ws
    assert delivered(tunnel) == b"bye"
    assert tunnel.finished


def test_a_hang_up_that_drops_queued_data_is_a_cut() -> None:
    tunnel = Tunnel(client=True)
    tunnel.plain_data(b"never sent")
    tunnel.ws_data(close_frame(1000), 0.0)
    tunnel.ws_lost("WebSocket: Connection reset by peer")
    assert tunnel.failed


def test_ping_is_answered_after_the_frame_being_written_and_before_the_rest() -> None:
    tunnel = Tunnel(client=True)
    tunnel.plain_data(b"a" * 1000)
    tunnel.plain_data(b"b" * 1000)
    consume(tunnel.to_ws, 500)  # the driver got half of the first frame out
    tunnel.ws_data(peer_frame(OP_PING, b"are you there"), 0.0)
    first_left = 1000 + 8 - 500  # header (2 + 2 + 4 mask) and payload, less what went
    assert [op for op, _ in sent_frames(tunnel, skip=first_left)] == [Opcode.PONG, Opcode.BINARY]


def test_pings_after_both_closes_are_not_answered() -> None:
    tunnel = Tunnel(client=True)
    tunnel.ws_data(close_frame(1000), 0.0)
    sent_frames(tunnel)
    tunnel.ws_data(peer_frame(OP_PING), 0.0)
    assert tunnel.to_ws == []


def test_consume_cuts_into_the_head() -> None:
    buffers: list = [b"abc", b"defg", b"h"]
    consume(buffers, 5)
    assert [bytes(b) for b in buffers] == [b"fg", b"h"]
    assert isinstance(buffers[0], memoryview)
    consume(buffers, 2)
    assert buffers == [b"h"]


def test_a_ping_goes_first_when_no_frame_has_started() -> None:
    tunnel = Tunnel(client=True)
    tunnel.plain_data(b"a" * 1000)
    tunnel.ws_data(peer_frame(OP_PING, b"?"), 0.0)
    assert [op for op, _ in sent_frames(tunnel)] == [Opcode.PONG, Opcode.BINARY]


def test_a_ping_waits_for_a_header_cut_into() -> None:
    tunnel = Tunnel(client=True)
    tunnel.plain_data(b"a" * 1000)
    consume(tunnel.to_ws, 2)  # half of the 2 + 2 + 4 byte header went
    tunnel.ws_data(peer_frame(OP_PING, b"?"), 0.0)
    assert [op for op, _ in sent_frames(tunnel, skip=6 + 1000)] == [Opcode.PONG]


# Keepalive, with a fake clock ---------------------------------------------------------


def keepalive() -> Tunnel:
    return Tunnel(client=True, ping_interval=INTERVAL, ping_timeout=TIMEOUT, now=0.0)


def test_silence_gets_a_ping_then_a_cut() -> None:
    tunnel = keepalive()
    assert tunnel.timer(0.0, held=False) == INTERVAL
    assert tunnel.timer(INTERVAL, held=False) == INTERVAL + TIMEOUT
    assert sent_frames(tunnel) == [(Opcode.PING, b"")]
    assert tunnel.timer(INTERVAL + TIMEOUT, held=False) is None
    assert tunnel.failed and tunnel.outcome == "no answer to a ping within 10 s"


def test_any_byte_from_the_peer_proves_it_alive() -> None:
    tunnel = keepalive()
    tunnel.timer(INTERVAL, held=False)
    sent_frames(tunnel)
    tunnel.ws_data(peer_frame(OP_BINARY, b"x"), INTERVAL + 1)
    delivered(tunnel)
    assert tunnel.timer(INTERVAL + TIMEOUT, held=False) == 2 * INTERVAL + 1
    assert not tunnel.outcome


def test_traffic_from_the_peer_postpones_the_ping() -> None:
    tunnel = keepalive()
    tunnel.ws_data(peer_frame(OP_BINARY, b"x"), 20.0)
    delivered(tunnel)
    assert tunnel.timer(INTERVAL, held=False) == 20.0 + INTERVAL
    assert tunnel.to_ws == []


def test_flow_control_is_not_silence_however_long() -> None:
    """A side that reads slowly holds the tunnel back: that proves nothing about the peer."""
    tunnel = keepalive()
    tunnel.timer(INTERVAL, held=False)  # a ping went out...
    sent_frames(tunnel)
    for now in range(40, 100000, 40):  # ...then the tunnel waits on flow control for a day
        assert tunnel.timer(float(now), held=True) == now + INTERVAL
    assert not tunnel.outcome
    assert tunnel.timer(100000.0 + INTERVAL, held=False) == 100000.0 + INTERVAL + TIMEOUT


def test_half_closed_tunnel_waits_for_a_slow_reply_while_pings_are_answered() -> None:
    tunnel = keepalive()
    tunnel.plain_eof()
    sent_frames(tunnel)
    now = 0.0
    for _ in range(100):  # an hour and more of thinking on the other side
        now = tunnel.timer(now, held=False) or 0.0
        if tunnel.to_ws:
            assert sent_frames(tunnel) == [(Opcode.PING, b"")]
            tunnel.ws_data(peer_frame(0xA), now + 0.1)  # the Pong
    assert not tunnel.outcome
    tunnel.ws_data(peer_frame(OP_BINARY, b"reply") + close_frame(1000), now)
    assert delivered(tunnel) == b"reply" and tunnel.finished


def test_an_answer_to_the_peers_close_that_cannot_get_out_is_bounded() -> None:
    tunnel = keepalive()
    tunnel.plain_data(b"stuck")
    tunnel.ws_data(close_frame(1000), 5.0)
    assert tunnel.timer(5.0, held=True) == 5.0 + TIMEOUT
    assert tunnel.timer(5.0 + TIMEOUT, held=True) is None
    assert tunnel.failed and "Close answer" in tunnel.outcome


def test_no_keepalive_when_off() -> None:
    tunnel = Tunnel(client=True)
    assert tunnel.timer(1e9, held=False) is None
    assert tunnel.to_ws == []


def test_a_peer_still_taking_our_data_is_not_judged_silent() -> None:
    """We sent data since it last spoke: a slow guest may keep it busy however long, and a
    Ping would wait behind that data, so no Ping is due."""
    tunnel = keepalive()
    tunnel.plain_data(b"upload")
    sent_frames(tunnel)
    for now in range(30, 100000, 30):
        assert tunnel.timer(float(now), held=False) == now + INTERVAL
    assert not tunnel.outcome and tunnel.to_ws == []
    tunnel.ws_data(peer_frame(OP_BINARY, b"done"), 100000.0)  # it spoke: judged again
    delivered(tunnel)
    tunnel.timer(100000.0 + INTERVAL, held=False)
    assert sent_frames(tunnel) == [(Opcode.PING, b"")]


def test_a_peer_whose_host_acknowledges_nothing_is_judged() -> None:
    tunnel = keepalive()
    tunnel.plain_data(b"upload")
    sent_frames(tunnel)
    assert tunnel.timer(INTERVAL, held=False, acking=False) == INTERVAL + TIMEOUT
    assert tunnel.timer(INTERVAL + TIMEOUT, held=False, acking=False) is None
    assert tunnel.cause == "keepalive"
