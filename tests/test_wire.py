"""The pipe message codec (PROTOCOL.md, "Messages"): exact bytes, framing by
the length field whatever the segmentation, and the decoder's offsets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tm3.core import wire
from tm3.core.wire import (
    Data,
    Decoder,
    Fin,
    ProtocolError,
    Syn,
    data_header,
    encode,
    encode_data,
    encode_fin,
    encode_syn,
    wire_size,
)

SYN_EXAMPLE = bytes.fromhex("03 00 00 00 00 00 ff ff 5d b8 d8 22 bb 01")
DATA_EXAMPLE = bytes.fromhex("03 00 01 00 00 00 0a 00 68 69")


def decode_all(data: bytes) -> list[wire.Message]:
    return list(Decoder().feed(data))


# -- the examples in PROTOCOL.md -------------------------------------------


def test_syn_example_encodes_exactly() -> None:
    assert encode_syn(3, "93.184.216.34", 443) == SYN_EXAMPLE
    assert encode(Syn(3, 0, "93.184.216.34", 443)) == SYN_EXAMPLE


def test_syn_example_decodes() -> None:
    assert decode_all(SYN_EXAMPLE) == [Syn(3, 0, "93.184.216.34", 443)]


def test_data_example_encodes_exactly() -> None:
    assert encode_data(3, 1, b"hi") == DATA_EXAMPLE
    assert encode(Data(3, 1, b"hi")) == DATA_EXAMPLE
    assert data_header(3, 1, 2) + b"hi" == DATA_EXAMPLE


def test_data_example_decodes() -> None:
    assert decode_all(DATA_EXAMPLE) == [Data(3, 1, b"hi")]


def test_syn_body_mixed_byte_order() -> None:
    # Address in network order, port little-endian, header little-endian.
    raw = encode_syn(0x0102, "1.2.3.4", 0x5060, seq=0)
    assert raw == bytes.fromhex("02 01 00 00 00 00 ff ff 01 02 03 04 60 50")
    assert len(raw) == wire.SYN_SIZE == 14


def test_fin_encoding() -> None:
    assert encode_fin(3, 7, wire.REASON_FIN) == bytes.fromhex("03 00 07 00 00 00 fe ff 88")
    assert encode_fin(0xABCD, 0x01020304, wire.REASON_RST) == bytes.fromhex("cd ab 04 03 02 01 fe ff 99")
    assert encode(Fin(3, 7, 0x88)) == bytes.fromhex("03 00 07 00 00 00 fe ff 88")
    assert len(encode_fin(1, 1, 0x88)) == wire.FIN_SIZE == 9


def test_fin_decodes_any_reason_byte() -> None:
    raw = encode_fin(9, 2, 0x88) + encode_fin(9, 3, 0x99) + encode_fin(9, 4, 0x00)
    assert decode_all(raw) == [Fin(9, 2, 0x88), Fin(9, 3, 0x99), Fin(9, 4, 0)]


def test_header_fields_little_endian_extremes() -> None:
    raw = encode_data(0xFFFF, 0xFFFFFFFF, b"x")
    assert raw == bytes.fromhex("ff ff ff ff ff ff 09 00 78")
    assert decode_all(raw) == [Data(0xFFFF, 0xFFFFFFFF, b"x")]


# -- lengths ---------------------------------------------------------------


@pytest.mark.parametrize("length", range(8))
def test_length_below_eight_is_protocol_error(length: int) -> None:
    bad = struct.pack("<HIH", 5, 1, length)
    with pytest.raises(ProtocolError) as info:
        decode_all(bad + b"\x00" * 20)
    e = info.value
    assert e.offset == 0
    assert e.data == bad
    assert f"invalid length {length}" in str(e)
    assert "at offset 0" in str(e)
    assert bad.hex(" ") in str(e)


def test_bad_length_offset_counts_earlier_messages_and_reads() -> None:
    d = Decoder()
    first = encode_data(1, 0, b"abc") + encode_fin(1, 1, 0x88)  # 11 + 9 bytes
    assert list(d.feed(first)) == [Data(1, 0, b"abc"), Fin(1, 1, 0x88)]
    ok = encode_syn(2, "10.0.0.1", 80)  # 14 bytes at offset 20
    bad = struct.pack("<HIH", 2, 1, 3)  # at offset 34
    got = []
    with pytest.raises(ProtocolError) as info:
        for m in d.feed(ok + bad[:5]):
            got.append(m)
        for m in d.feed(bad[5:]):
            got.append(m)
    assert got == [Syn(2, 0, "10.0.0.1", 80)]
    assert info.value.offset == 34
    assert info.value.data == bad


def test_zero_length_data() -> None:
    raw = encode_data(4, 2, b"")
    assert raw == bytes.fromhex("04 00 02 00 00 00 08 00")
    assert decode_all(raw) == [Data(4, 2, b"")]
    assert wire_size(Data(4, 2, b"")) == 8


def test_max_payload() -> None:
    assert wire.MAX_PAYLOAD == 65525
    payload = bytes(range(256)) * 255 + bytes(range(245))
    assert len(payload) == 65525
    raw = encode_data(1, 1, payload)
    assert raw[6:8] == b"\xfd\xff"  # 0xFFFD: the largest DATA length
    assert len(raw) == 0xFFFD
    assert decode_all(raw) == [Data(1, 1, payload)]
    with pytest.raises(ValueError):
        encode_data(1, 1, payload + b"x")
    with pytest.raises(ValueError):
        data_header(1, 1, 65526)


def test_wire_size() -> None:
    assert wire_size(Syn(1, 0, "1.2.3.4", 5)) == 14
    assert wire_size(Fin(1, 0, 0x88)) == 9
    assert wire_size(Data(1, 0, b"12345")) == 13


def test_syn_rejects_non_ipv4() -> None:
    # inet_aton would read "010.0.0.1" as 8.0.0.1 and ignore " junk".
    for host in ("::1", "example.com", "127.1", "1.2.3", "010.0.0.1", "0x7f.0.0.1", "1.2.3.4 junk", "1.2.3.256"):
        with pytest.raises(ValueError):
            encode_syn(1, host, 80)
    with pytest.raises(ValueError):
        encode_syn(1, "1.2.3.4", 65536)


def test_partial_message_is_kept() -> None:
    d = Decoder()
    raw = SYN_EXAMPLE + DATA_EXAMPLE
    assert list(d.feed(raw[:13])) == []
    assert d.buffered == 13
    assert list(d.feed(raw[13:17])) == [Syn(3, 0, "93.184.216.34", 443)]
    assert d.buffered == 3
    assert list(d.feed(raw[17:])) == [Data(3, 1, b"hi")]
    assert d.buffered == 0


def test_header_split_one_byte_at_a_time() -> None:
    d = Decoder()
    got = []
    for b in DATA_EXAMPLE + encode_fin(3, 2, 0x99):
        got.extend(d.feed(bytes([b])))
    assert got == [Data(3, 1, b"hi"), Fin(3, 2, 0x99)]


# -- property tests ----------------------------------------------------------

ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

messages = st.one_of(
    st.builds(Syn, u16, u32, ipv4, u16),
    st.builds(Data, u16, u32, st.binary(max_size=300)),
    st.builds(Fin, u16, u32, st.integers(0, 255)),
)


@st.composite
def messages_and_cuts(draw: st.DrawFn) -> tuple[list[wire.Message], bytes, list[int]]:
    msgs = draw(st.lists(messages, max_size=30))
    stream = b"".join(encode(m) for m in msgs)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    return msgs, stream, cuts


@given(messages)
def test_round_trip(msg: wire.Message) -> None:
    raw = encode(msg)
    assert len(raw) == wire_size(msg)
    assert decode_all(raw) == [msg]


@settings(max_examples=300)
@given(messages_and_cuts())
def test_any_fragmentation_decodes_the_same(case: tuple[list[wire.Message], bytes, list[int]]) -> None:
    msgs, stream, cuts = case
    d = Decoder()
    got: list[wire.Message] = []
    offsets: list[int] = []
    bounds = [0, *cuts, len(stream)]
    for a, b in zip(bounds, bounds[1:]):
        for m in d.feed(stream[a:b]):
            got.append(m)
            offsets.append(d.offset)
    assert got == msgs
    assert d.buffered == 0
    # The offset of each message is where it starts in the stream.
    expected, pos = [], 0
    for m in msgs:
        expected.append(pos)
        pos += wire_size(m)
    assert offsets == expected


@settings(max_examples=200)
@given(st.lists(messages, max_size=10), st.integers(0, 7), st.integers(1, 50))
def test_bad_length_offset_after_any_messages(msgs: list[wire.Message], length: int, chunk: int) -> None:
    good = b"".join(encode(m) for m in msgs)
    bad = struct.pack("<HIH", 1, 2, length)
    stream = good + bad + b"\xff" * 8
    d = Decoder()
    got: list[wire.Message] = []
    with pytest.raises(ProtocolError) as info:
        for i in range(0, len(stream), chunk):
            got.extend(d.feed(stream[i : i + chunk]))
    assert got == msgs
    assert info.value.offset == len(good)
    assert info.value.data == bad
