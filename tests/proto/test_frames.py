"""The pump's frame codec, checked against wsproto byte for byte."""

from __future__ import annotations

import random
import struct
import tracemalloc
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.frame_protocol import FrameProtocol, Opcode, XorMaskerSimple

from gforward.proto import frames
from gforward.proto.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Close,
    FrameReader,
    Ping,
    Pong,
    ProtocolError,
    close_payload,
    encode_frame,
    frame_header,
    parse_close_payload,
)

SIZES = [0, 1, 125, 126, 65535, 65536, 300000]
CONTROL_SIZES = [0, 1, 125]
CASES = [(op, n) for op in (OP_BINARY, OP_TEXT) for n in SIZES] + [
    (op, n) for op in (OP_PING, OP_PONG) for n in CONTROL_SIZES
]


def payload_for(opcode: int, size: int, seed: int = 0) -> bytes:
    """Random bytes, or printable ASCII for text frames (valid UTF-8 at any cut)."""
    rng = random.Random(f"{opcode}:{size}:{seed}")
    if opcode == OP_TEXT:
        return bytes(rng.choices(range(32, 127), k=size))
    return rng.randbytes(size)


def reference_mask(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def wsproto_frames(data: bytes, *, client: bool) -> list[tuple[Opcode, object]]:
    """What wsproto's frame parser makes of `data`, partial frames joined."""
    proto = FrameProtocol(client=client, extensions=[])
    proto.receive_bytes(data)
    result: list[tuple[Opcode, object]] = []
    pending: list = []
    for frame in proto.received_frames():
        pending.append(frame.payload)
        if frame.frame_finished:
            if frame.opcode is Opcode.CLOSE:
                result.append((frame.opcode, pending[0]))
            else:
                joined = "".join(pending) if frame.opcode is Opcode.TEXT else b"".join(pending)
                result.append((frame.opcode, joined))
            pending = []
    assert not pending
    return result


class Data(NamedTuple):
    """A run of payload, in expected event lists."""

    payload: bytes


def canonical(events: list) -> tuple[bytes, list]:
    """What a reader reports of `events`: all payload in order, and the control frames in
    order (their order against the payload is not reported: a pump does not need it)."""
    data = b"".join(e.payload for e in events if isinstance(e, Data))
    return data, [e for e in events if not isinstance(e, Data)]


def read(reader: FrameReader, chunks) -> tuple[bytes, list]:
    """Feed `chunks` in order, copying each payload piece at once, as a pump would send it."""
    data = bytearray()
    controls: list = []
    for chunk in chunks:
        payloads: list = []
        try:
            controls += reader.feed(chunk, payloads)
        finally:
            for piece in payloads:
                assert len(piece), "empty payload piece"
                data += piece
    return bytes(data), controls


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


# --- our encoder, wsproto's parser -------------------------------------------


@pytest.mark.parametrize("mask", [True, False], ids=["client-masked", "server-unmasked"])
@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT], ids=["binary", "text"])
@pytest.mark.parametrize("size", SIZES)
def test_encoded_data_frame_parses_in_wsproto(mask: bool, opcode: int, size: int) -> None:
    payload = payload_for(opcode, size)
    wire = encode_frame(opcode, payload, mask=mask)
    # wsproto as server (client=False) insists on masked frames, and vice versa.
    [(op, got)] = wsproto_frames(wire, client=not mask)
    assert op == Opcode(opcode)
    if opcode == OP_TEXT:
        assert got == payload.decode("ascii")
    else:
        assert got == payload


@pytest.mark.parametrize("mask", [True, False], ids=["client-masked", "server-unmasked"])
@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG], ids=["ping", "pong"])
@pytest.mark.parametrize("size", CONTROL_SIZES)
def test_encoded_ping_pong_parses_in_wsproto(mask: bool, opcode: int, size: int) -> None:
    payload = payload_for(opcode, size)
    [(op, got)] = wsproto_frames(encode_frame(opcode, payload, mask=mask), client=not mask)
    assert op == Opcode(opcode)
    assert got == payload


@pytest.mark.parametrize("mask", [True, False], ids=["client-masked", "server-unmasked"])
@pytest.mark.parametrize(
    ("code", "reason"),
    [(1000, ""), (1001, "going away"), (1011, "x" * 123), (4000, "\u00e9t\u00e9")],
)
def test_encoded_close_parses_in_wsproto(mask: bool, code: int, reason: str) -> None:
    body = close_payload(code, reason)
    assert len(body) <= 125
    [(op, got)] = wsproto_frames(encode_frame(OP_CLOSE, body, mask=mask), client=not mask)
    assert op is Opcode.CLOSE
    assert got == (code, reason)


def test_empty_close_frame_parses_in_wsproto() -> None:
    [(op, got)] = wsproto_frames(encode_frame(OP_CLOSE, b"", mask=True), client=False)
    assert op is Opcode.CLOSE
    assert got == (1005, "")


@pytest.mark.parametrize(("opcode", "size"), CASES)
def test_unmasked_frame_is_byte_identical_to_wsproto(opcode: int, size: int) -> None:
    payload = payload_for(opcode, size)
    server = FrameProtocol(client=False, extensions=[])
    if opcode == OP_PING:
        theirs = server.ping(payload)
    elif opcode == OP_PONG:
        theirs = server.pong(payload)
    elif opcode == OP_TEXT:
        theirs = server.send_data(payload.decode("ascii"), fin=True)
    else:
        theirs = server.send_data(payload, fin=True)
    assert encode_frame(opcode, payload, mask=False) == bytes(theirs)


def test_unmasked_close_is_byte_identical_to_wsproto() -> None:
    theirs = FrameProtocol(client=False, extensions=[]).close(1001, "bye")
    assert encode_frame(OP_CLOSE, close_payload(1001, "bye"), mask=False) == bytes(theirs)


@pytest.mark.parametrize("size", SIZES)
def test_masked_frame_matches_reference_masking(size: int) -> None:
    payload = payload_for(OP_BINARY, size)
    wire = encode_frame(OP_BINARY, payload, mask=True)
    header_len = len(frame_header(OP_BINARY, size, b"\0\0\0\0"))
    key = wire[header_len - 4 : header_len]
    assert wire[:header_len] == frame_header(OP_BINARY, size, key)
    assert wire[header_len:] == bytes(XorMaskerSimple(key).process(payload))


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_encode_frame_accepts_any_buffer(kind) -> None:
    payload = payload_for(OP_BINARY, 300)
    for mask in (True, False):
        wire = encode_frame(OP_BINARY, kind(payload), mask=mask)
        assert wsproto_frames(wire, client=not mask) == [(Opcode.BINARY, payload)]


def test_masked_frames_use_a_fresh_key_each_time() -> None:
    payload = b"same payload, twice"
    first = encode_frame(OP_BINARY, payload, mask=True)
    second = encode_frame(OP_BINARY, payload, mask=True)
    assert first != second
    assert first[2:6] != second[2:6]  # the masking keys
    reader = FrameReader(masked=True)
    assert read(reader, [first, second]) == canonical([Data(payload * 2)])


# --- wsproto's encoder, our reader -------------------------------------------


def wsproto_wire(opcode: int, payload: bytes, *, client: bool) -> bytes:
    proto = FrameProtocol(client=client, extensions=[])
    if opcode == OP_PING:
        return bytes(proto.ping(payload))
    if opcode == OP_PONG:
        return bytes(proto.pong(payload))
    if opcode == OP_TEXT:
        return bytes(proto.send_data(payload.decode("ascii"), fin=True))
    return bytes(proto.send_data(payload, fin=True))


def expected_events(opcode: int, payload: bytes) -> list:
    if opcode == OP_PING:
        return [Ping(payload)]
    if opcode == OP_PONG:
        return [Pong(payload)]
    return [Data(payload)] if payload else []


@pytest.mark.parametrize("client", [True, False], ids=["from-client", "from-server"])
@pytest.mark.parametrize(("opcode", "size"), CASES)
def test_wsproto_frame_parses_in_reader(client: bool, opcode: int, size: int) -> None:
    payload = payload_for(opcode, size, seed=1)
    wire = wsproto_wire(opcode, payload, client=client)
    assert read(FrameReader(masked=client), [wire]) == canonical(expected_events(opcode, payload))


@pytest.mark.parametrize("client", [True, False], ids=["from-client", "from-server"])
@pytest.mark.parametrize(
    ("opcode", "size"),
    [c for c in CASES if c[1] <= 126] + [(OP_BINARY, 65535), (OP_BINARY, 65536)],
)
def test_wsproto_frame_parses_one_byte_at_a_time(client: bool, opcode: int, size: int) -> None:
    payload = payload_for(opcode, size, seed=2)
    wire = wsproto_wire(opcode, payload, client=client)
    events = read(FrameReader(masked=client), one_byte_at_a_time(wire))
    assert events == canonical(expected_events(opcode, payload))


@pytest.mark.parametrize("client", [True, False], ids=["from-client", "from-server"])
@pytest.mark.parametrize(
    ("code", "reason"), [(1000, ""), (1001, "bye"), (3000, "app"), (4999, "\u20ac" * 41)]
)
def test_wsproto_close_parses_in_reader(client: bool, code: int, reason: str) -> None:
    wire = bytes(FrameProtocol(client=client, extensions=[]).close(code, reason))
    expected = [Close(code, reason)]
    assert read(FrameReader(masked=client), [wire]) == canonical(expected)
    assert read(FrameReader(masked=client), one_byte_at_a_time(wire)) == canonical(expected)


@pytest.mark.parametrize("client", [True, False], ids=["from-client", "from-server"])
def test_wsproto_close_without_code_parses_as_1005(client: bool) -> None:
    wire = bytes(FrameProtocol(client=client, extensions=[]).close())
    assert read(FrameReader(masked=client), [wire]) == canonical([Close(1005, "")])


@pytest.mark.parametrize("client", [True, False], ids=["from-client", "from-server"])
def test_several_frames_in_one_chunk(client: bool) -> None:
    proto = FrameProtocol(client=client, extensions=[])
    big = payload_for(OP_BINARY, 70000, seed=3)
    wire = b"".join(
        bytes(part)
        for part in (
            proto.send_data(b"hello", fin=True),
            proto.ping(b"p1"),
            proto.send_data(big, fin=True),
            proto.pong(b""),
            proto.send_data(b"", fin=True),
            proto.send_data("world", fin=True),
            proto.close(1000, "done"),
        )
    )
    expected = [
        Data(b"hello"),
        Ping(b"p1"),
        Data(big),
        Pong(b""),
        Data(b"world"),
        Close(1000, "done"),
    ]
    assert read(FrameReader(masked=client), [wire]) == canonical(expected)
    assert read(FrameReader(masked=client), one_byte_at_a_time(wire)) == canonical(expected)


@pytest.mark.parametrize("client", [True, False], ids=["from-client", "from-server"])
def test_fragmented_message_with_interleaved_control_frames(client: bool) -> None:
    proto = FrameProtocol(client=client, extensions=[])
    parts = [
        proto.send_data(b"one ", fin=False),
        proto.ping(b"are you there"),
        proto.send_data(b"", fin=False),
        proto.send_data(b"two ", fin=False),
        proto.pong(b"yes"),
        proto.send_data(b"three", fin=True),
        proto.send_data(b"next", fin=True),  # a new message after the fragmented one
    ]
    # The continuation frames really are continuations on the wire.
    assert parts[2][0] & 0x0F == OP_CONTINUATION
    assert parts[5][0] == 0x80 | OP_CONTINUATION
    expected = [
        Data(b"one "),
        Ping(b"are you there"),
        Data(b"two "),
        Pong(b"yes"),
        Data(b"threenext"),
    ]
    wire = b"".join(bytes(p) for p in parts)
    assert read(FrameReader(masked=client), [bytes(p) for p in parts]) == canonical(expected)
    assert read(FrameReader(masked=client), [wire]) == canonical(expected)
    assert read(FrameReader(masked=client), one_byte_at_a_time(wire)) == canonical(expected)


@pytest.mark.parametrize("client", [True, False], ids=["from-client", "from-server"])
def test_fragmented_text_message_in_order(client: bool) -> None:
    proto = FrameProtocol(client=client, extensions=[])
    words = [f"part {i};" for i in range(50)]
    wire = b"".join(bytes(proto.send_data(w, fin=i == len(words) - 1)) for i, w in enumerate(words))
    assert read(FrameReader(masked=client), [wire]) == canonical([Data("".join(words).encode())])


def test_data_from_unmasked_frames_is_not_a_copy() -> None:
    """What the docstring promises: a server's payload is a view of the fed buffer."""
    buffer = bytearray(encode_frame(OP_BINARY, b"abcdef", mask=False))
    payloads: list = []
    assert FrameReader(masked=False).feed(buffer, payloads) == []
    [piece] = payloads
    assert bytes(piece) == b"abcdef"
    buffer[-1:] = b"Z"
    assert bytes(piece) == b"abcdeZ"


# hypothesis: random message sequences cut at random places

SEND = st.one_of(
    st.tuples(st.just("data"), st.binary(max_size=300), st.booleans()),
    st.tuples(st.just("data"), st.sampled_from([125, 126, 127, 1000, 65536]), st.booleans()),
    st.tuples(st.just("ping"), st.binary(max_size=125)),
    st.tuples(st.just("pong"), st.binary(max_size=125)),
)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    client=st.booleans(),
    sends=st.lists(SEND, max_size=8),
    close=st.one_of(
        st.none(), st.tuples(st.sampled_from([1000, 1001, 3000, 4999]), st.text(max_size=30))
    ),
    data=st.data(),
)
def test_wsproto_stream_in_random_chunks(client, sends, close, data) -> None:
    proto = FrameProtocol(client=client, extensions=[])
    wire = bytearray()
    expected: list = []
    fragmented = False

    def expect_data(payload: bytes) -> None:
        if not payload:
            return
        if expected and isinstance(expected[-1], Data):
            expected[-1] = Data(expected[-1].payload + payload)
        else:
            expected.append(Data(payload))

    for send in sends:
        if send[0] == "data":
            _, payload, fin = send
            if isinstance(payload, int):
                payload = payload_for(OP_BINARY, payload)
            wire += proto.send_data(payload, fin=fin)
            expect_data(payload)
            fragmented = not fin
        elif send[0] == "ping":
            wire += proto.ping(send[1])
            expected.append(Ping(send[1]))
        else:
            wire += proto.pong(send[1])
            expected.append(Pong(send[1]))
    if fragmented:
        wire += proto.send_data(b"end", fin=True)
        expect_data(b"end")
    if close is not None:
        code, reason = close
        if len(reason.encode()) <= 123:
            wire += proto.close(code, reason)
            expected.append(Close(code, reason))

    cuts = sorted(
        data.draw(st.lists(st.integers(0, len(wire)), max_size=40, unique=True), label="cuts")
    )
    edges = [0, *cuts, len(wire)]
    chunks = [bytes(wire[a:b]) for a, b in zip(edges, edges[1:])]
    assert read(FrameReader(masked=client), chunks) == canonical(expected)


# --- streaming --------------------------------------------------------------


@pytest.mark.parametrize("masked", [True, False], ids=["server-reader", "client-reader"])
def test_huge_frame_streams_without_buffering(masked: bool) -> None:
    piece_size = 4096
    total = 1 << 20
    key = b"\x11\x22\x33\x44" if masked else None
    header = frame_header(OP_BINARY, 1 << 62, key)
    plain = payload_for(OP_BINARY, total, seed=4)
    stream = frames._xor_mask(plain, key) if key else plain
    pieces = [memoryview(stream)[i : i + piece_size] for i in range(0, total, piece_size)]
    reader = FrameReader(masked=masked)

    tracemalloc.start()
    try:
        payloads: list = []
        assert reader.feed(header, payloads) == []
        assert payloads == []
        seen = 0
        for i, piece in enumerate(pieces):
            assert reader.feed(piece, payloads) == []
            # Each read gives its bytes back at once, and nothing more.
            [got] = payloads
            assert len(got) == piece_size
            assert got == plain[i * piece_size : (i + 1) * piece_size]
            seen += len(got)
            payloads.clear()
            del got
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == total
    assert peak < 64 << 10  # about 10 KB in practice; 1 MiB went through


def test_huge_frame_with_odd_pieces_unmasks_across_reads() -> None:
    key = b"\xa1\xb2\xc3\xd4"
    plain = payload_for(OP_BINARY, 50000, seed=5)
    stream = frame_header(OP_BINARY, 1 << 62, key) + frames._xor_mask(plain, key)
    rng = random.Random(6)
    chunks, pos = [], 0
    while pos < len(stream):
        step = rng.randint(1, 4099)
        chunks.append(stream[pos : pos + step])
        pos += step
    assert read(FrameReader(masked=True), chunks) == canonical([Data(plain)])


# --- protocol errors --------------------------------------------------------


def raw_frame(b0: int, payload: bytes = b"", *, masked: bool, length: int | None = None) -> bytes:
    """A frame with any first byte, masked or not; `length` may lie about the payload."""
    n = len(payload) if length is None else length
    key = b"\x01\x02\x03\x04" if masked else None
    head = bytearray(frame_header(0, n, key))
    head[0] = b0
    body = frames._xor_mask(payload, key) if key else payload
    return bytes(head) + body


def assert_protocol_error(masked: bool, wire: bytes, code: int = 1002) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        read(FrameReader(masked=masked), [wire])
    assert info.value.code == code
    # Also when the bytes trickle in.
    with pytest.raises(ProtocolError) as again:
        read(FrameReader(masked=masked), one_byte_at_a_time(wire))
    assert again.value.code == code
    return info.value


ROLES = pytest.mark.parametrize("masked", [True, False], ids=["server-reader", "client-reader"])


@ROLES
@pytest.mark.parametrize("rsv", [0x40, 0x20, 0x10, 0x70])
@pytest.mark.parametrize("opcode", [OP_BINARY, OP_PING])
def test_reserved_bits(masked: bool, rsv: int, opcode: int) -> None:
    assert_protocol_error(masked, raw_frame(0x80 | rsv | opcode, b"x", masked=masked))


@ROLES
@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_unknown_opcodes(masked: bool, opcode: int) -> None:
    assert_protocol_error(masked, raw_frame(0x80 | opcode, b"x", masked=masked))


def test_masked_frame_to_client_reader() -> None:
    assert_protocol_error(False, encode_frame(OP_BINARY, b"hi", mask=True))


def test_unmasked_frame_to_server_reader() -> None:
    assert_protocol_error(True, encode_frame(OP_BINARY, b"hi", mask=False))


@ROLES
@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_over_125_bytes(masked: bool, opcode: int) -> None:
    assert_protocol_error(masked, raw_frame(0x80 | opcode, b"\x03\xe8" + b"x" * 124, masked=masked))


@ROLES
@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame(masked: bool, opcode: int) -> None:
    assert_protocol_error(masked, raw_frame(opcode, b"", masked=masked))


@ROLES
@pytest.mark.parametrize("fin", [0x80, 0])
def test_continuation_without_message(masked: bool, fin: int) -> None:
    assert_protocol_error(masked, raw_frame(fin | OP_CONTINUATION, b"x", masked=masked))


@ROLES
def test_continuation_after_finished_message(masked: bool) -> None:
    wire = raw_frame(OP_BINARY, b"a", masked=masked) + raw_frame(
        0x80 | OP_CONTINUATION, b"b", masked=masked
    )
    wire += raw_frame(0x80 | OP_CONTINUATION, b"c", masked=masked)
    with pytest.raises(ProtocolError) as info:
        read(FrameReader(masked=masked), [wire])
    assert info.value.code == 1002


@ROLES
@pytest.mark.parametrize("opcode", [OP_BINARY, OP_TEXT])
def test_new_data_frame_inside_fragmented_message(masked: bool, opcode: int) -> None:
    wire = raw_frame(OP_BINARY, b"first", masked=masked) + raw_frame(
        0x80 | opcode, b"second", masked=masked
    )
    assert_protocol_error(masked, wire)


@ROLES
def test_64_bit_length_with_top_bit(masked: bool) -> None:
    wire = raw_frame(0x80 | OP_BINARY, masked=masked, length=1 << 63)
    assert wire[1] & 0x7F == 127
    assert_protocol_error(masked, wire)


@ROLES
def test_close_with_one_byte_payload(masked: bool) -> None:
    assert_protocol_error(masked, raw_frame(0x80 | OP_CLOSE, b"\x03", masked=masked))


@ROLES
@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_close_with_invalid_code(masked: bool, code: int) -> None:
    body = struct.pack("!H", code) + b"why"
    error = assert_protocol_error(masked, raw_frame(0x80 | OP_CLOSE, body, masked=masked))
    assert str(code) in str(error)


@ROLES
def test_close_reason_not_utf8(masked: bool) -> None:
    body = struct.pack("!H", 1000) + b"caf\xc3"
    assert_protocol_error(masked, raw_frame(0x80 | OP_CLOSE, body, masked=masked), code=1007)


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1011, 3000, 3999, 4000, 4999])
def test_valid_close_codes(code: int) -> None:
    body = close_payload(code, "fine")
    assert parse_close_payload(body) == Close(code, "fine")
    wire = encode_frame(OP_CLOSE, body, mask=True)
    assert read(FrameReader(masked=True), [wire]) == canonical([Close(code, "fine")])


def test_empty_close_payload_is_1005() -> None:
    assert parse_close_payload(b"") == Close(1005, "")


def test_close_code_validity_agrees_with_wsproto() -> None:
    def wsproto_accepts(code: int) -> bool:
        wire = encode_frame(OP_CLOSE, struct.pack("!H", code), mask=False)
        try:
            wsproto_frames(wire, client=True)
        except Exception:
            return False
        return True

    def we_accept(code: int) -> bool:
        try:
            parse_close_payload(struct.pack("!H", code))
        except ProtocolError as exc:
            assert exc.code == 1002
            return False
        return True

    differ = [code for code in range(0, 6000) if wsproto_accepts(code) != we_accept(code)]
    assert differ == []


def test_events_before_an_error_are_still_delivered() -> None:
    wire = encode_frame(OP_BINARY, b"good", mask=False) + raw_frame(0x83, b"bad", masked=False)
    got: list = []
    with pytest.raises(ProtocolError):
        FrameReader(masked=False).feed(wire, got)
    assert [bytes(piece) for piece in got] == [b"good"]


# --- masking ----------------------------------------------------------------

MASKERS = pytest.mark.parametrize(
    "mask_fn", [frames.apply_mask, frames._xor_mask], ids=["apply_mask", "_xor_mask"]
)


@MASKERS
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_masking_matches_reference(mask_fn, kind) -> None:
    rng = random.Random(7)
    for n in [*range(1001), 300000]:
        data = rng.randbytes(n)
        key = rng.randbytes(4)
        masked = mask_fn(kind(data), key)
        expected = bytes(XorMaskerSimple(key).process(data))
        assert bytes(masked) == expected
        assert bytes(mask_fn(masked, key)) == data
    assert reference_mask(data[:999], key) == expected[:999]


@MASKERS
def test_masking_a_slice_of_a_larger_buffer(mask_fn) -> None:
    data = random.Random(8).randbytes(1000)
    key = b"\x00\xff\x0f\xf0"
    view = memoryview(bytearray(data))[3:777]
    assert bytes(mask_fn(view, key)) == reference_mask(data[3:777], key)


def test_pure_python_fallback_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without websockets' C masking, frames still round-trip with wsproto."""
    monkeypatch.setattr(frames, "apply_mask", frames._xor_mask)
    payload = payload_for(OP_BINARY, 70001, seed=9)
    wire = encode_frame(OP_BINARY, payload, mask=True)
    assert wsproto_frames(wire, client=False) == [(Opcode.BINARY, payload)]
    theirs = bytes(FrameProtocol(client=True, extensions=[]).send_data(payload, fin=True))
    rng = random.Random(10)
    cuts = sorted(rng.sample(range(1, len(theirs)), 50))
    chunks = [theirs[a:b] for a, b in zip([0, *cuts], [*cuts, len(theirs)])]
    assert read(FrameReader(masked=True), chunks) == canonical([Data(payload)])


def test_fast_mask_is_active_when_websockets_is_installed() -> None:
    pytest.importorskip("websockets.speedups")
    assert frames.FAST_MASK
    from websockets.speedups import apply_mask

    assert frames.apply_mask is apply_mask


# --- close payloads ----------------------------------------------------------


@pytest.mark.parametrize("char", ["\u00e9", "\u20ac", "\U0001f600", "a\u00e9"])
def test_close_payload_cuts_long_reason_on_a_character_boundary(char: str) -> None:
    reason = char * 200
    body = close_payload(1001, reason)
    assert len(body) <= 125
    code, text = parse_close_payload(body)
    assert code == 1001
    assert reason.startswith(text)
    assert len(text.encode()) > 123 - len(char.encode())  # cut only as much as needed
    # wsproto agrees it is a valid Close frame.
    [(_, got)] = wsproto_frames(encode_frame(OP_CLOSE, body, mask=False), client=True)
    assert got == (1001, text)


def test_close_payload_short_reason_kept() -> None:
    assert close_payload(1000) == b"\x03\xe8"
    assert close_payload(1000, "bye") == b"\x03\xe8bye"
    assert len(close_payload(1000, "x" * 123)) == 125
    assert len(close_payload(1000, "x" * 124)) == 125
