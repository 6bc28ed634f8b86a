"""How the RP greets accepted pipes (tm3/rp/admission.py, tm3/rp/service.py),
without sockets: v1 by the first bytes or by silence, v2 by the handshake;
what is refused; how v2 pipes group by session id."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import directlyProvides

from tm3.core import wire
from tm3.core.handshake import MAGIC, ClientHandshake, HandshakeError, new_session_id
from tm3.mux.pipes import PipeProtocol
from tm3.mux.settings import V1, Terms
from tm3.rp.service import PipeFactory, Refused

KEY = b"s" * 32
WAIT = 1.0


class Harness:
    def __init__(self, n: int = 2, key: bytes | None = KEY, allow_v1: bool = True) -> None:
        self.reactor = MemoryReactorClock()
        self.sets: list[tuple[list[PipeProtocol], str, Terms]] = []
        self.live: set[str] = set()
        self.factory = PipeFactory(
            n,
            self.reactor,
            lambda pipes, key, terms: self.sets.append((pipes, key, terms)),
            key=key,
            allow_v1=allow_v1,
            is_live=lambda key: key in self.live,
            hello_wait=WAIT,
            handshake_timeout=5.0,
        )
        self._port = 40000

    def accept(self, host: str = "10.0.0.1") -> tuple[PipeProtocol, StringTransport]:
        self._port += 1
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, self._port))
        pipe = self.factory.buildProtocol(transport.getPeer())
        assert isinstance(pipe, PipeProtocol)
        pipe.makeConnection(transport)
        return pipe, transport

    def v2_pipe(
        self, sid: bytes, n: int, index: int, key: bytes = KEY, host: str = "10.0.0.1", after: bytes = b""
    ) -> tuple[PipeProtocol, StringTransport]:
        pipe, transport = self.accept(host)
        client = ClientHandshake(key, sid, n, index, 65536)
        pipe.dataReceived(client.hello_bytes())
        challenge = transport.value()
        transport.clear()
        try:
            proof = client.feed(challenge)
        except HandshakeError:
            proof = bytes(32)  # a peer without the RP's key can only guess
        pipe.dataReceived(proof + after)
        return pipe, transport


def closed(t: StringTransport) -> bool:
    return bool(t.disconnecting)


def test_a_v1_pipe_is_known_by_its_first_message_and_its_silent_sibling_with_it() -> None:
    h = Harness(key=None)
    (p1, _), (p2, _) = h.accept(), h.accept()
    syn = wire.encode_syn(1, "192.0.2.1", 80)
    p1.dataReceived(syn[:3])  # not the magic: v1 at once, no wait
    assert len(h.sets) == 1 and h.sets[0][1:] == ("10.0.0.1", V1)
    assert h.sets[0][0] == [p1, p2] and all(not c.active() for c in h.reactor.getDelayedCalls())
    assert p1.early == [syn[:3]]  # kept for the session


def test_silent_pipes_are_v1_after_the_hello_wait() -> None:
    h = Harness(key=None)
    h.accept()
    h.accept()
    h.reactor.advance(WAIT - 0.01)
    assert not h.sets
    h.reactor.advance(0.02)
    assert len(h.sets) == 1 and h.sets[0][2] is V1


def test_a_v2_set_forms_by_session_id_in_index_order_whatever_the_address() -> None:
    h = Harness(n=2)
    sid = new_session_id()
    first = wire.encode_syn(1, "192.0.2.1", 80)
    p1, _ = h.v2_pipe(sid, 3, 2, host="10.0.0.1", after=first)
    p0, _ = h.v2_pipe(sid, 3, 0, host="10.0.0.2")
    assert not h.sets  # n is the LP's: 3, not the RP's --pipes
    p2, _ = h.v2_pipe(sid, 3, 1, host="10.0.0.3")
    (pipes, key, terms) = h.sets[0]
    assert pipes == [p0, p2, p1] and key == "v2 " + sid.hex() and terms == Terms(2, 65536)
    assert p1.early == [first]  # what followed the proof waits for the session


def test_v2_refusals() -> None:
    h = Harness(n=2)
    sid = new_session_id()
    _, wrong_key = h.v2_pipe(sid, 2, 0, key=b"w" * 32)
    assert closed(wrong_key)
    silent, t = h.accept()
    silent.dataReceived(MAGIC)  # and then nothing
    h.reactor.advance(4.9)
    assert not closed(t)
    h.reactor.advance(0.2)  # --handshake-timeout
    assert closed(t)
    _, ok = h.v2_pipe(sid, 2, 0)
    _, dup = h.v2_pipe(sid, 2, 0)
    _, other_n = h.v2_pipe(sid, 3, 1)
    assert not closed(ok) and closed(dup) and closed(other_n)
    h.live.add("v2 " + sid.hex())
    _, late = h.v2_pipe(sid, 2, 1)
    assert closed(late) and not h.sets


def test_an_rp_without_a_key_refuses_v2_and_one_with_a_key_refuses_v1() -> None:
    no_key = Harness(key=None)
    pipe, t = no_key.accept()
    pipe.dataReceived(MAGIC)
    assert closed(t) and not no_key.sets and not no_key.factory.admission.greeting
    strict = Harness(allow_v1=False)
    (p, t1), (_, t2) = strict.accept(), strict.accept()
    p.dataReceived(wire.encode_syn(1, "192.0.2.1", 80))
    assert closed(t1) and not closed(t2)  # v1 bytes: refused at once
    strict.reactor.advance(WAIT)
    assert not closed(t2)  # silence is not v1 where v1 is not served: it may be a late hello
    strict.reactor.advance(5.0)
    assert closed(t2) and not strict.sets


def test_greeting_pipes_count_against_max_pending_and_leave_no_timer() -> None:
    h = Harness()
    h.factory.max_pending = 3
    accepted = [h.accept() for _ in range(3)]
    assert isinstance(h.factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 1)), Refused)
    for pipe, _ in accepted:
        pipe.connectionLost(Failure(ConnectionDone()))
    assert not h.factory.admission.greeting
    assert all(not c.active() for c in h.reactor.getDelayedCalls())


def test_one_address_cannot_take_every_pending_slot() -> None:
    h = Harness()
    h.factory.max_per_address = 3
    mine = [h.accept("10.0.0.9") for _ in range(3)]
    assert isinstance(h.factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 1)), Refused)
    h.accept("10.0.0.8")  # another address still gets in
    # Waiting in a set counts as much as being greeted.
    mine[0][0].dataReceived(wire.encode_syn(1, "192.0.2.1", 80))  # v1: joins its address's set
    assert isinstance(h.factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 1)), Refused)
    mine[1][0].connectionLost(Failure(ConnectionDone()))
    assert isinstance(h.factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 1)), PipeProtocol)


def test_a_v2_set_larger_than_one_address_may_hold_is_refused(logs: Any) -> None:
    h = Harness()
    h.factory.max_per_address = 3
    _, t = h.v2_pipe(new_session_id(), 4, 0)
    assert closed(t) and not h.sets
    assert logs.matching("its set has 4 pipes, more than --max-pending-per-address 3 lets wait")


@given(st.binary(min_size=1, max_size=40), st.integers(1, 8))
def test_any_first_bytes_are_classified_once_however_they_are_cut(first: bytes, cut: int) -> None:
    """Bytes that are not the magic make a v1 pipe (with the bytes kept in
    order); the magic starts a handshake (a challenge goes out)."""
    h = Harness(n=1)
    pipe, t = h.accept()
    for i in range(0, len(first), cut):
        pipe.dataReceived(first[i : i + cut])
    if first[:8] == MAGIC[: len(first[:8])] and len(first) >= 8:
        assert not h.sets and (len(first) < 48 or t.value() or closed(t))
    elif first[: len(MAGIC)] == MAGIC[: len(first)]:
        assert not h.sets and not closed(t)  # still a prefix of the magic: wait
    else:
        assert h.sets[0][2] is V1 and b"".join(pipe.early) == first


def test_where_v2_is_served_one_pipes_bytes_never_decide_anothers_version() -> None:
    """A peer without the key at the LP's address (a shared NAT) sends v1
    bytes: the LP's pipe whose hello is still on its way is not taken for v1."""
    h = Harness(n=1, allow_v1=True)
    lp_pipe, lp_t = h.accept()
    intruder, _ = h.accept()
    intruder.dataReceived(wire.encode_syn(1, "192.0.2.1", 80))
    assert h.sets and h.sets[0][0] == [intruder]
    client = ClientHandshake(KEY, new_session_id(), 1, 0, 65536)
    lp_pipe.dataReceived(client.hello_bytes())
    lp_pipe.dataReceived(client.feed(lp_t.value()))
    assert len(h.sets) == 2 and h.sets[1][2].v2 and h.sets[1][0] == [lp_pipe]


def test_on_a_tls_listener_the_hello_wait_starts_after_the_tls_handshake() -> None:
    h = Harness(n=1, key=None)
    pipe, t = h.accept()
    directlyProvides(t, ISSLTransport)
    h.factory.admission.pipe_gone(pipe, Failure(ConnectionDone()))  # greet it again, as a TLS pipe
    h.factory.admission.pipe_made(pipe)
    h.reactor.advance(WAIT * 2)
    assert not h.sets  # still in its TLS handshake: the handshake timeout applies
    pipe.handshakeCompleted()
    h.reactor.advance(WAIT)
    assert len(h.sets) == 1 and h.sets[0][2] is V1
