"""The v2 handshake (tm3/core/handshake.py), without sockets: both sides
must prove the key over fresh nonces, and nothing can be changed, replayed
or reflected."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tm3.core.handshake import (
    CHALLENGE_SIZE,
    HELLO_SIZE,
    MAGIC,
    PROOF_SIZE,
    ClientHandshake,
    HandshakeError,
    Hello,
    ServerHandshake,
    load_key,
    looks_like_hello,
)
from tm3.core.wire import Decoder, ProtocolError, encode_credit

KEY = b"k" * 32
SID = bytes(range(16))


def pair(
    client_key: bytes = KEY, server_key: bytes = KEY, n: int = 4, index: int = 1
) -> tuple[ClientHandshake, ServerHandshake]:
    return ClientHandshake(client_key, SID, n, index, 256 * 1024), ServerHandshake(server_key, 128 * 1024)


def test_both_sides_prove_the_key_and_agree_on_the_terms() -> None:
    client, server = pair()
    hello = client.hello_bytes()
    assert len(hello) == HELLO_SIZE == 48 and hello[:8] == MAGIC
    challenge = server.feed(hello)
    assert len(challenge) == CHALLENGE_SIZE == 60 and not server.done
    proof = client.feed(challenge)
    assert len(proof) == PROOF_SIZE and client.peer_window == 128 * 1024
    assert server.feed(proof + b"first messages") == b""
    assert server.hello == Hello(server.hello.nonce, SID, 4, 1, 256 * 1024)
    assert server.rest == b"first messages"


@given(st.lists(st.integers(1, 20), min_size=1, max_size=30))
def test_any_segmentation_works(cuts: list[int]) -> None:
    """TCP may cut the handshake anywhere; the pipe messages after it survive."""
    client, server = pair()
    stream = client.hello_bytes()
    replies = b""
    pos = 0
    for cut in cuts * 20:
        if pos >= len(stream):
            break
        replies += server.feed(stream[pos : pos + cut])
        pos += cut
    replies += server.feed(stream[pos:])
    proof = client.feed(replies)
    rest = bytes(range(20))
    data, i = proof + rest, 0
    while not server.done:
        server.feed(data[i : i + cuts[0]])
        i += cuts[0]
    # What came with the proof, then what the pipe reads next.
    assert server.rest + data[i:] == rest


def test_an_lp_with_the_wrong_key_is_refused() -> None:
    client, server = pair(client_key=b"x" * 32)
    with pytest.raises(HandshakeError, match="RP does not have our key"):
        client.feed(server.feed(client.hello_bytes()))
    # Forging the LP's proof without the key does not work either.
    _, server = pair()
    server.feed(ClientHandshake(b"x" * 32, SID, 4, 1, 1).hello_bytes())
    with pytest.raises(HandshakeError, match="LP does not have this RP's key"):
        server.feed(b"\x00" * PROOF_SIZE)


def test_an_rp_with_the_wrong_key_is_refused() -> None:
    client, server = pair(server_key=b"y" * 32)
    with pytest.raises(HandshakeError, match="the RP does not have our key"):
        client.feed(server.feed(client.hello_bytes()))


def test_a_recorded_proof_is_worth_nothing_against_a_fresh_challenge() -> None:
    client, server = pair()
    hello = client.hello_bytes()
    proof = client.feed(server.feed(hello))
    replay = ServerHandshake(KEY, 128 * 1024)  # a fresh nonce
    replay.feed(hello)
    with pytest.raises(HandshakeError):
        replay.feed(proof)


def test_the_rp_proof_cannot_serve_as_the_lp_proof() -> None:
    """Reflection: an attacker sends the RP's own proof back."""
    client, server = pair()
    challenge = server.feed(client.hello_bytes())
    rp_proof = challenge[-32:]
    with pytest.raises(HandshakeError):
        server.feed(rp_proof)


@pytest.mark.parametrize("offset", [8, 24, 40, 42, 44])
def test_a_changed_hello_field_breaks_the_proof(offset: int) -> None:
    """The session id, count, index and window are all covered by both proofs."""
    client, server = pair()
    hello = bytearray(client.hello_bytes())
    hello[offset] ^= 0x01
    challenge = server.feed(bytes(hello))
    with pytest.raises(HandshakeError, match="RP does not have our key"):
        client.feed(challenge)


@pytest.mark.parametrize(
    ("n", "index", "window", "why"),
    [(0, 0, 1, "1..1024"), (1025, 0, 1, "1..1024"), (4, 4, 1, "pipe 4 of 4"), (4, 0, 0, "window of 0")],
)
def test_a_malformed_hello_is_refused(n: int, index: int, window: int, why: str) -> None:
    server = ServerHandshake(KEY, 1)
    with pytest.raises(HandshakeError, match=why):
        server.feed(Hello(b"n" * 16, SID, n, index, window).encode())


def test_the_hello_is_invalid_as_v1_and_classified_by_its_first_bytes() -> None:
    """A v1 RP (or decoder) can never take the hello for a message: its
    length field is 0."""
    with pytest.raises(ProtocolError, match="invalid length 0"):
        list(Decoder().feed(MAGIC))
    assert looks_like_hello(b"") is None and looks_like_hello(b"TM3") is None
    assert looks_like_hello(MAGIC) is True and looks_like_hello(MAGIC + b"x") is True
    assert looks_like_hello(b"\x03\x00\x00\x00") is False and looks_like_hello(b"TM4") is False


def test_key_files() -> None:
    assert load_key(b"  0123456789abcdef0123456789abcdef\n") == b"0123456789abcdef0123456789abcdef"
    with pytest.raises(ValueError, match="has 5 bytes; use at least 32"):
        load_key(b"short\n", "'k.txt'")


def test_the_protocol_documents_example_is_what_the_code_sends() -> None:
    """docs/protocol.md, "The handshake": the example bytes, regenerated."""
    doc = (Path(__file__).parents[1] / "docs" / "protocol.md").read_text()
    block = doc.split("```text\nHELLO", 1)[1].split("```", 1)[0]
    shown: dict[str, bytes] = {}
    name = "HELLO"
    for line in ("HELLO" + block).splitlines():
        words = line.split()
        if words and not all(len(w) == 2 for w in words):
            name = words.pop(0)
        shown[name] = shown.get(name, b"") + bytes.fromhex("".join(words))
    key = b"0123456789abcdef0123456789abcdef"
    client = ClientHandshake(key, bytes(range(0x10, 0x20)), 4, 2, 256 * 1024, nonce=bytes(range(0xA0, 0xB0)))
    server = ServerHandshake(key, 256 * 1024, nonce=bytes(range(0xC0, 0xD0)))
    challenge = server.feed(client.hello_bytes())
    proof = client.feed(challenge)
    server.feed(proof)
    assert server.done
    assert shown == {"HELLO": client.hello_bytes(), "CHALLENGE": challenge, "PROOF": proof}
    assert "`03 00  00 00 02 00  01 00`" in doc and encode_credit(3, 128 * 1024).hex(" ") == "03 00 00 00 02 00 01 00"
