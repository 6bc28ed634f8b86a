"""The local proxy, driven in memory (see tests/support/lp_harness.py): dialing the pipes,
the SYN of forward and SOCKS clients, connection ids (rule 7), every close
path of the life cycle including flush-then-reset, reordering, backpressure
both ways, session loss and redial, and protocol errors from the RP."""

from __future__ import annotations

import functools
import socket
import struct

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from tests.support.logs import LogCapture
from tests.support.lp_harness import LP, RP_HOST, RP_PORT, TARGET
from tm3.core.ids import IdAllocator
from tm3.core.lifecycle import State
from tm3.core.wire import Data, Fin, Message, Syn, encode_data, encode_syn
from tm3.lp.clients import RESET_FLUSH_LIMIT, RESET_FLUSH_POLL
from tm3.lp.resolver import Resolver
from tm3.lp.socks import reply
from tm3.mux.connection import OutControl
from tm3.mux.inbound import QUEUE_CHUNK_OVERHEAD
from tm3.mux.pipes import PENDING_TIMEOUT

KiB = 1024
MiB = 1024 * 1024
Q = 4096 + QUEUE_CHUNK_OVERHEAD  # what a queued 4 KiB chunk is charged
HOST, PORT = TARGET
GREETING = b"\x05\x01\x00"


@pytest.fixture
def few_ids(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Sessions get an id allocator of ``count`` ids (call with the count)."""

    def use(count: int) -> None:
        monkeypatch.setattr("tm3.lp.role.IdAllocator", functools.partial(IdAllocator, count=count))

    return use


def socks_request(host: str, port: int) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port)


def pipe_states(lp: LP) -> list[str]:
    return [t.producerState for _, t in lp.pipes]


# -- dialing the pipes -----------------------------------------------------------


def test_clients_are_accepted_only_once_every_pipe_is_up() -> None:
    lp = LP(n=3)
    assert [(h, p, timeout) for h, p, _, timeout, _ in lp.reactor.tcpClients] == [(RP_HOST, RP_PORT, 10.0)] * 3
    assert not lp.accepting
    first = [lp.connect_pipe(), lp.connect_pipe()]
    assert lp.proxy.session is None and not lp.accepting
    lp.pipes = [*first, lp.connect_pipe()]
    session = lp.session
    assert session.pipes.pipes == [p for p, _ in lp.pipes]
    assert [p.name for p, _ in lp.pipes] == [f"pipe {RP_HOST}:{RP_PORT} (#{i})" for i in range(3)]
    assert lp.accepting
    assert lp.received() == []  # the LP says nothing on its own
    assert lp.proxy.when_session().result is session


def test_a_failed_pipe_connect_drops_the_attempt_and_redials_with_backoff(logs: LogCapture) -> None:
    lp = LP(n=2)
    _, t0 = lp.connect_pipe()
    lp.fail_pipe()
    assert t0.disconnected  # half a set is of no use
    assert logs.matching(f"cannot open 2 pipes to the RP at {RP_HOST}:{RP_PORT}: Connection was refused")
    assert logs.matching("retrying in 0.5 s")
    lp.reactor.advance(0.499)
    assert lp.dials() == []
    lp.reactor.advance(0.001)
    assert len(lp.dials()) == 2
    lp.fail_pipe()
    lp.fail_pipe()  # the same attempt: counted once
    assert lp.proxy.dialer.failures == 2
    lp.reactor.advance(0.999)
    assert lp.dials() == []
    lp.reactor.advance(0.001)
    lp.up()
    assert lp.accepting


def test_a_pipe_lost_before_the_set_is_complete_restarts_the_dial() -> None:
    lp = LP(n=3)
    p0, _ = lp.connect_pipe()
    _, t1 = lp.connect_pipe()
    p0.connectionLost()
    assert t1.disconnected and lp.proxy.session is None
    _, t2 = lp.connect_pipe()  # the third connect of the dead attempt completes late
    assert t2.disconnected
    assert lp.proxy.session is None and not lp.accepting
    assert lp.dials() == []
    lp.reactor.advance(0.5)
    lp.up()
    assert lp.accepting


def test_a_session_ended_by_bytes_sent_before_the_set_was_complete_redials(logs: LogCapture) -> None:
    """Bytes that come before the LP's set is complete are replayed when its
    session starts; a protocol error among them ends the session as it
    starts. The LP must still redial (it used to wait forever: the session
    never came up, so it was never reported down either)."""
    lp = LP(n=2)
    for delay in (0.5, 1.0):
        _, t0 = lp.connect_pipe()
        t0.protocol.dataReceived(bytes(8))  # length 0
        _, t1 = lp.connect_pipe()
        assert lp.proxy.session is None and not lp.accepting
        assert t0.disconnected and t1.disconnected
        assert logs.matching(f"reconnecting in {delay:.1f} s")  # not useful: the backoff grows
        lp.reactor.advance(delay)
        assert len(lp.dials()) == 2
    assert len(logs.matching("at offset 0: invalid length 0")) == 2
    assert lp.stats.protocol_errors == 2
    lp.up()
    assert lp.accepting


def test_a_client_arriving_with_no_session_is_reset(logs: LogCapture) -> None:
    lp = LP(n=1)
    client, transport = lp.accept()
    assert transport.disconnected and transport.value() == b""
    assert logs.matching(f"-> {HOST}:{PORT}: no pipe session to the RP; resetting")
    LP.closed(client)
    socks = LP(n=1, mode="socks")
    client, transport = socks.accept()
    client.dataReceived(GREETING + socks_request(HOST, PORT))
    assert transport.value() == b"\x05\x00" + reply(0x03)  # network unreachable
    assert transport.disconnecting and not transport.disconnected


def test_stopping_the_service_ends_the_session_and_does_not_redial() -> None:
    lp = LP(n=1, drain_timeout=0)
    session = lp.up()
    _, transport = lp.accept()
    lp.proxy.stopService()
    assert session.ended and transport.disconnected
    pipe = lp.pipes[0][1]
    assert pipe.disconnecting and not pipe.disconnected  # a FIN, not a reset: the RP sees a clean close
    lp.reactor.advance(60)
    assert lp.dials() == [] and lp.reactor.getDelayedCalls() == []


def test_stopping_drains_the_open_connections_then_ends_the_session() -> None:
    """SIGTERM: no new client is taken; the open one may finish for up to
    --drain-timeout; then the session ends."""
    lp = LP(n=1, drain_timeout=10)
    session = lp.up()
    client, transport = lp.accept()
    lp.received()
    stopped = lp.proxy.stopService()
    assert not session.ended and session.draining and not transport.disconnected
    assert not lp.listener.running  # no new clients
    lp.send(Data(0, 0, b"the rest"), Fin(0, 1, 0x88))
    client.readConnectionLost()  # the client is done too: the connection is over
    assert transport.value() == b"the rest" and session.conns == {}
    lp.reactor.advance(0.1)
    assert session.ended and stopped.called


def test_a_drain_that_times_out_resets_what_is_still_open(logs: LogCapture) -> None:
    lp = LP(n=1, drain_timeout=10)
    session = lp.up()
    _, transport = lp.accept()
    stopped = lp.proxy.stopService()
    lp.reactor.advance(9.9)
    assert not session.ended
    lp.reactor.advance(0.2)
    assert session.ended and transport.disconnected and stopped.called
    assert logs.matching("drain timeout after 10 s: resetting 1 connection still open")


# -- SYN and data from the client -------------------------------------------------


def test_forward_client_gets_a_syn_seq_0_then_its_data_as_data_seq_1_on() -> None:
    lp = LP(n=1)
    lp.up()
    client, transport = lp.accept()
    pipe = lp.pipes[0][1]
    lp.reactor.advance(0)
    # 93.184.216.34 in network order, port 443 little-endian.
    assert pipe.value() == bytes.fromhex("00 00 00 00 00 00 ff ff 5d b8 d8 22 bb 01")
    client.dataReceived(b"GET / HTTP/1.0\r\n")
    client.dataReceived(b"\r\n")
    assert lp.received() == [Syn(0, 0, HOST, PORT), Data(0, 1, b"GET / HTTP/1.0\r\n"), Data(0, 2, b"\r\n")]
    assert transport.producer is client.gate  # the client's write side is watched
    assert lp.session.conns[0].life.state is State.OPEN


def test_client_data_is_cut_at_max_payload_and_goes_in_one_batch() -> None:
    lp = LP(n=2, max_payload=5)
    lp.up()
    client, _ = lp.accept()
    client.dataReceived(b"abcdefghijkl")
    per_pipe = lp.received(by_pipe=True)
    assert per_pipe == [
        [Syn(0, 0, HOST, PORT), Data(0, 1, b"abcde"), Data(0, 2, b"fghij"), Data(0, 3, b"kl")],
        [],
    ]
    assert [t.write_sequences for _, t in lp.pipes] == [1, 0]  # one write: the turn's batch


def test_socks_client_gets_the_syn_after_its_connect_request_then_the_success_reply() -> None:
    lp = LP(n=1, mode="socks")
    lp.up()
    client, transport = lp.accept()
    client.dataReceived(GREETING)
    assert transport.value() == b"\x05\x00"
    assert lp.received() == []
    client.dataReceived(socks_request("198.51.100.7", 80))
    assert transport.value() == b"\x05\x00" + reply(0x00)
    lp.reactor.advance(0)
    assert lp.pipes[0][1].value() == bytes.fromhex("00 00 00 00 00 00 ff ff c6 33 64 07 50 00")
    assert transport.producerState == "producing"
    client.dataReceived(b"ping")
    assert lp.received() == [Syn(0, 0, "198.51.100.7", 80), Data(0, 1, b"ping")]
    lp.send(Data(0, 0, b"pong"))
    assert transport.value() == b"\x05\x00" + reply(0x00) + b"pong"


def test_socks_optimistic_data_sent_before_the_reply_is_carried() -> None:
    lp = LP(n=1, mode="socks")
    lp.up()
    client, transport = lp.accept()
    client.dataReceived(GREETING + socks_request(HOST, PORT) + b"early bytes")
    assert transport.value() == b"\x05\x00" + reply(0x00)
    client.dataReceived(b"+later")
    assert lp.received() == [Syn(0, 0, HOST, PORT), Data(0, 1, b"early bytes"), Data(0, 2, b"+later")]


def test_socks_eof_with_the_request_is_passed_on_after_the_data() -> None:
    lp = LP(n=1, mode="socks")
    lp.up()
    client, _ = lp.accept()
    client.dataReceived(GREETING + socks_request(HOST, PORT) + b"all of it")
    client.readConnectionLost()
    assert lp.received() == [Syn(0, 0, HOST, PORT), Data(0, 1, b"all of it"), Fin(0, 2, 0x88)]


def test_socks_domain_is_resolved_before_the_syn_and_ipv6_is_refused() -> None:
    lp = LP(n=1, mode="socks")
    lp.up()
    lookups: list[tuple[str, Deferred[str]]] = []

    class Lookup:
        def start(self) -> None: ...

        def stop(self) -> None: ...

        def lookup(self, name: str) -> Deferred[str]:
            d: Deferred[str] = Deferred()
            lookups.append((name, d))
            return d

    lp.proxy.resolver = Resolver(lp.reactor, Lookup())
    client, transport = lp.accept()
    name = b"example.test"
    client.dataReceived(GREETING + b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack("!H", 8080))
    client.dataReceived(b"while resolving")
    assert [n for n, _ in lookups] == ["example.test"]
    assert lp.received() == [] and transport.value() == b"\x05\x00"
    lookups[0][1].callback("192.0.2.10")
    assert transport.value() == b"\x05\x00" + reply(0x00)
    assert lp.received() == [Syn(0, 0, "192.0.2.10", 8080), Data(0, 1, b"while resolving")]
    v6, t6 = lp.accept()
    v6.dataReceived(GREETING + b"\x05\x01\x00\x04" + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + b"\x00\x50")
    assert t6.value() == b"\x05\x00" + reply(0x08)  # address type not supported
    assert lp.received() == []


# -- connection ids (rule 7) -------------------------------------------------------


def test_ids_go_out_in_order_and_a_freed_id_goes_to_the_back() -> None:
    lp = LP(n=1)
    lp.up()
    clients = [lp.accept() for _ in range(3)]
    LP.reset(clients[0][0])
    lp.reactor.advance(60)
    lp.accept()
    sent = lp.received()
    assert [m.conn_id for m in sent if type(m) is Syn] == [0, 1, 2, 3]
    assert Fin(0, 1, 0x99) in sent
    assert lp.role.ids.in_use == 3


def test_an_id_is_reused_only_10_s_after_its_connection_is_over(few_ids, logs: LogCapture) -> None:  # type: ignore[no-untyped-def]
    few_ids(3)
    lp = LP(n=1)
    lp.up()
    (a, _), _, (c, _) = [lp.accept() for _ in range(3)]
    LP.reset(c)  # id 2 freed at t=0, once its 0x99 is on a pipe (at the end of the turn)
    lp.reactor.advance(0)
    lp.reactor.advance(1)
    LP.reset(a)  # id 0 freed at t=1
    lp.reactor.advance(0)
    lp.reactor.advance(8.999)
    lp.received()
    _, refused = lp.accept()
    assert refused.disconnected and refused.value() == b""
    assert lp.received() == []  # nothing is sent for a client that got no id
    assert logs.matching("no connection id free for 10 s yet")
    lp.reactor.advance(0.001)  # t=10: id 2, the least recently freed, is free again
    lp.accept()
    _, early = lp.accept()  # id 0 has one second to go
    assert early.disconnected
    lp.reactor.advance(1)
    lp.accept()
    (sent,) = lp.received(by_pipe=True)
    assert [m.conn_id for m in sent if type(m) is Syn] == [2, 0]


def test_the_quarantine_starts_when_the_connection_is_over_not_when_the_client_leaves(few_ids) -> None:  # type: ignore[no-untyped-def]
    few_ids(1)
    lp = LP(n=1)
    lp.up()
    client, _ = lp.accept()
    client.readConnectionLost()  # our FIN at t=0
    lp.reactor.advance(5)
    lp.send(Fin(0, 0, 0x88))  # the RP's at t=5: over
    LP.closed(client)
    lp.reactor.advance(9.999)
    assert lp.accept()[1].disconnected
    lp.reactor.advance(0.001)
    assert not lp.accept()[1].disconnected


def test_ids_exhausted_resets_a_forward_client_and_refuses_a_socks_one(few_ids) -> None:  # type: ignore[no-untyped-def]
    few_ids(1)
    lp = LP(n=1)
    lp.up()
    lp.accept()
    client, transport = lp.accept()
    assert transport.disconnected and client.conn is None
    LP.closed(client)
    socks = LP(n=1, mode="socks")
    socks.up()
    socks.accept()[0].dataReceived(GREETING + socks_request(HOST, PORT))
    _, transport = socks.accept()
    transport.protocol.dataReceived(GREETING + socks_request(HOST, PORT))
    assert transport.value() == b"\x05\x00" + reply(0x01)  # general failure
    assert [m.conn_id for m in lp.received() + socks.received()] == [0, 0]


# -- close paths --------------------------------------------------------------------


def test_client_eof_sends_fin_0x88_and_the_rp_data_still_flows(logs: LogCapture) -> None:
    lp = LP(n=1)
    session = lp.up()
    client, transport = lp.accept()
    client.dataReceived(b"request")
    client.readConnectionLost()
    assert lp.received() == [Syn(0, 0, HOST, PORT), Data(0, 1, b"request"), Fin(0, 2, 0x88)]
    assert lp.pipes[0][1].value().endswith(bytes.fromhex("00 00 02 00 00 00 fe ff 88"))
    lp.send(Data(0, 0, b"answer"), Data(0, 1, b" goes on"))
    assert transport.value() == b"answer goes on"
    assert 0 in session.conns and not transport.write_closed
    lp.send(Fin(0, 2, 0x88))
    assert transport.write_closed and transport.disconnecting  # both halves shut: closed
    assert session.conns == {} and session.live == set()
    LP.closed(client)
    assert session.sockets == set()
    assert lp.received() == []  # one FIN per side
    (end,) = logs.ends()
    # The LP's "up" is what the client sent, "down" what it received.
    assert (end["conn_id"], end["host"], end["port"], end["how"]) == (0, HOST, PORT, "fin")
    assert (end["up"], end["down"]) == (7, 14)


def test_rp_fin_half_closes_the_client_after_every_earlier_byte() -> None:
    lp = LP(n=2)
    session = lp.up()
    client, transport = lp.accept()
    transport.producer.pauseProducing()  # the client is not reading
    lp.send(Data(0, 0, b"one"), pipe=0)
    lp.send(Fin(0, 2, 0x88), pipe=1)
    lp.send(Data(0, 1, b"two"), pipe=0)
    assert transport.value() == b"" and not transport.write_closed
    transport.producer.resumeProducing()
    assert transport.value() == b"onetwo"
    assert transport.write_closed and not transport.disconnecting
    assert transport.producer is None  # unregistered, or the shutdown would never finish
    # Half-close: the client still talks, and its EOF ends the connection.
    client.dataReceived(b"more")
    client.readConnectionLost()
    assert lp.received() == [Syn(0, 0, HOST, PORT), Data(0, 1, b"more"), Fin(0, 2, 0x88)]
    assert transport.disconnecting
    assert session.conns == {}
    assert lp.role.ids.in_use == 0


def test_client_reset_sends_fin_0x99_at_once_and_the_rest_is_dropped_and_counted(logs: LogCapture) -> None:
    lp = LP(n=1)
    session = lp.up()
    client, transport = lp.accept()
    transport.producer.pauseProducing()
    lp.send(Data(0, 0, b"queued"))
    client.dataReceived(b"partial")
    LP.reset(client)
    assert lp.received() == [Syn(0, 0, HOST, PORT), Data(0, 1, b"partial"), Fin(0, 2, 0x99)]
    assert session.conns == {} and session.live == set() and session.sockets == set()
    assert session.inbound.queued_total == 0
    assert lp.role.ids.in_use == 0
    assert [e["how"] for e in logs.ends()] == ["rst"]
    # What the RP had in flight: the tail of a connection that is over here.
    lp.send(Data(0, 1, b"late"), Fin(0, 2, 0x88))
    assert lp.stats.tails_dropped == 2
    assert lp.stats.tail_bytes_dropped == 6 + 4  # the dropped queue and the late DATA
    assert lp.received() == [] and transport.value() == b""
    assert not session.ended


def test_client_reset_after_its_eof_sends_no_second_fin() -> None:
    lp = LP(n=1)
    session = lp.up()
    client, _ = lp.accept()
    client.readConnectionLost()
    LP.reset(client)  # a reset after our 0x88 cannot be reported (one FIN per side)
    assert lp.received() == [Syn(0, 0, HOST, PORT), Fin(0, 1, 0x88)]
    assert session.conns[0].life.state is State.CLOSED_LOCAL_DONE
    lp.send(Data(0, 0, b"nobody reads"), Fin(0, 1, 0x88))
    assert session.conns == {} and lp.received() == []
    assert lp.stats.tail_bytes_dropped == 12


def test_client_gone_in_good_order_before_any_eof_sends_fin_0x88() -> None:
    lp = LP(n=1)
    session = lp.up()
    client, transport = lp.accept()
    # Twisted reports a hang-up seen while not reading this way, with no EOF first.
    transport.connected = False
    client.connectionLost(Failure(ConnectionDone()))
    assert lp.received() == [Syn(0, 0, HOST, PORT), Fin(0, 1, 0x88)]
    assert session.conns[0].life.state is State.CLOSED_LOCAL_DONE
    lp.send(Fin(0, 0, 0x99))
    assert session.conns == {}


def test_rp_rst_writes_every_earlier_byte_then_resets_the_client(logs: LogCapture) -> None:
    lp = LP(n=2)
    session = lp.up()
    client, transport = lp.accept()
    assert lp.received() == [Syn(0, 0, HOST, PORT)]  # the RP can reset only what it has a SYN for
    lp.send(Fin(0, 2, 0x99), pipe=1)  # overtakes the data before it
    assert not transport.disconnected
    lp.send(Data(0, 1, b"-tail"), Data(0, 0, b"head"), pipe=0)
    assert transport.value() == b"head-tail"
    assert transport.disconnected  # nothing left unsent: reset at once
    assert lp.received() == []  # a side that gets a 0x99 sends no FIN
    assert session.conns == {} and session.sockets == set()
    client.dataReceived(b"too late")  # read before the reset took effect: ignored
    LP.closed(client)
    assert lp.received() == []
    assert [e["how"] for e in logs.ends()] == ["rst"]


def test_rp_rst_waits_until_the_client_has_every_byte() -> None:
    lp = LP(n=1)
    session = lp.up()
    client, transport = lp.accept()
    lp.received()  # the SYN
    transport.producer.pauseProducing()
    lp.send(Data(0, 0, b"queued "))
    transport.holding = True  # from now on the client takes nothing
    lp.send(Data(0, 1, b"bytes"), Fin(0, 2, 0x99))
    assert transport.value() == b"queued bytes"  # the queue is written at once, before the reset
    assert session.conns == {} and session.inbound.queued_total == 0
    assert transport.producer is None and transport.producerState == "paused"  # no more reading
    for _ in range(50):
        lp.reactor.advance(RESET_FLUSH_POLL)
    assert not transport.disconnected
    transport.client_reads()
    assert not transport.disconnected
    lp.reactor.advance(RESET_FLUSH_POLL)
    assert transport.disconnected
    assert lp.reactor.getDelayedCalls() == []
    LP.closed(client)
    assert lp.received() == []


def test_rp_rst_resets_a_client_that_never_reads_after_10_s() -> None:
    lp = LP(n=1)
    lp.up()
    _, transport = lp.accept()
    transport.holding = True
    lp.send(Data(0, 0, b"x" * 100), Fin(0, 1, 0x99))
    while not transport.disconnected:
        lp.reactor.advance(RESET_FLUSH_POLL)
    assert RESET_FLUSH_LIMIT <= lp.reactor.seconds() < RESET_FLUSH_LIMIT + 2 * RESET_FLUSH_POLL


def test_rp_rst_flush_is_measured_with_tiocoutq() -> None:
    """Twisted's buffer may be empty while the kernel still holds the bytes:
    the LP asks the socket (TIOCOUTQ) how much its peer has not taken."""
    lp = LP(n=1)
    lp.up()
    _, transport = lp.accept()
    ours, theirs = socket.socketpair()
    try:
        transport.handle = ours
        ours.sendall(b"y" * 100)  # in the kernel, not read by the peer yet
        lp.send(Fin(0, 0, 0x99))
        lp.reactor.advance(RESET_FLUSH_POLL * 3)
        assert not transport.disconnected
        assert theirs.recv(1000) == b"y" * 100
        lp.reactor.advance(RESET_FLUSH_POLL)
        assert transport.disconnected
    finally:
        ours.close()
        theirs.close()


def test_a_client_gone_while_its_reset_waits_for_the_flush_cancels_the_wait() -> None:
    lp = LP(n=1)
    lp.up()
    client, transport = lp.accept()
    transport.holding = True
    lp.send(Data(0, 0, b"unread"), Fin(0, 1, 0x99))
    lp.received()
    assert len(lp.reactor.getDelayedCalls()) == 1
    LP.reset(client)
    assert lp.reactor.getDelayedCalls() == []
    assert lp.received() == []


def test_rp_rst_after_our_fin_flushes_then_resets() -> None:
    lp = LP(n=1)
    session = lp.up()
    client, transport = lp.accept()
    client.readConnectionLost()
    assert lp.received() == [Syn(0, 0, HOST, PORT), Fin(0, 1, 0x88)]
    lp.send(Data(0, 0, b"bye"), Fin(0, 1, 0x99))
    assert transport.value() == b"bye" and transport.disconnected
    assert session.conns == {}


def test_messages_after_both_fins_are_dropped_and_counted() -> None:
    lp = LP(n=1)
    session = lp.up()
    client, transport = lp.accept()
    lp.send(Fin(0, 0, 0x88))
    client.readConnectionLost()
    assert session.conns == {}
    lp.send(Data(0, 1, b"stray"), Fin(0, 2, 0x99))
    assert lp.stats.tails_dropped == 2 and lp.stats.tail_bytes_dropped == 5
    assert transport.value() == b"" and not transport.disconnected  # closed in good order, not reset


# -- reordering -------------------------------------------------------------------------


def test_rp_messages_out_of_order_over_several_pipes_reach_the_client_in_order() -> None:
    lp = LP(n=3)
    session = lp.up()
    client, transport = lp.accept()
    chunks = [b"%02d," % i for i in range(12)]
    order = [5, 11, 0, 3, 12, 1, 7, 2, 9, 4, 10, 6, 8]  # 12 is the FIN
    delivered = b""
    for k, seq in enumerate(order):
        msg: Message = Fin(0, 12, 0x88) if seq == 12 else Data(0, seq, chunks[seq])
        lp.send(msg, pipe=k % 3)
        in_order = 0
        while in_order in order[: k + 1]:
            in_order += 1
        delivered = b"".join(chunks[: min(in_order, 12)])
        assert transport.value() == delivered
        assert transport.write_closed == (in_order == 13)
    assert delivered == b"".join(chunks)
    assert session.conns[0].life.state is State.OPEN_PEER_DONE
    assert session.inbound.held_budget.held == 0


def test_connections_are_reordered_independently() -> None:
    lp = LP(n=2)
    lp.up()
    (_, ta), (_, tb) = lp.accept(), lp.accept()
    lp.send(Data(1, 1, b"B1"), Data(0, 1, b"A1"), pipe=1)
    assert (ta.value(), tb.value()) == (b"", b"")
    lp.send(Data(1, 0, b"B0"), pipe=0)
    assert (ta.value(), tb.value()) == (b"", b"B0B1")
    lp.send(Data(0, 0, b"A0"), pipe=0)
    assert (ta.value(), tb.value()) == (b"A0A1", b"B0B1")


def test_rp_seq_wraps_at_2_32_and_so_does_ours() -> None:
    lp = LP(n=1)
    session = lp.up()
    client, transport = lp.accept()
    conn = session.conns[0]
    lp.reactor.advance(0)  # the SYN takes its sequence number when it goes out
    conn.rx.next_seq = 2**32 - 1
    conn.tx_seq = 2**32 - 1
    lp.send(Data(0, 0, b"b"), Data(0, 2**32 - 1, b"a"))
    assert transport.value() == b"ab"
    client.dataReceived(b"x")
    client.dataReceived(b"y")
    client.readConnectionLost()
    (sent,) = lp.received(by_pipe=True)
    assert sent == [Syn(0, 0, HOST, PORT), Data(0, 2**32 - 1, b"x"), Data(0, 0, b"y"), Fin(0, 1, 0x88)]


# -- backpressure ---------------------------------------------------------------------------


def test_a_client_that_queues_past_send_queue_is_paused_alone_until_half_has_gone() -> None:
    """Late binding: bytes wait in user space while no pipe can send; a
    client whose queue passes --send-queue stops being read, the others go
    on, and it reads again once the pipes have taken half."""
    lp = LP(n=2, send_queue=64 * 1024)
    session = lp.up()
    (a, ta), (b, tb) = [lp.accept() for _ in range(2)]
    lp.received()
    for _, t in lp.pipes:
        t.producer.pauseProducing()  # neither pipe can send
    a.dataReceived(b"a" * 65536)
    assert ta.producerState == "producing"  # at the limit, not past it
    a.dataReceived(b"a")
    assert (ta.producerState, tb.producerState) == ("paused", "producing")
    assert lp.stats.download_pauses == 1
    b.dataReceived(b"b")
    assert tb.producerState == "producing"
    assert lp.received() == []  # nothing is bound to a pipe that cannot send
    lp.pipes[0][1].producer.resumeProducing()  # the gate reopens: one batch
    assert ta.producerState == "paused" and session.conns[0].out_bytes > 32 * 1024
    lp.reactor.advance(0)  # this test's pipe never closes its gate: more batches
    assert [t.producerState for t in (ta, tb)] == ["producing"] * 2
    sent = [m for pipe in lp.received(by_pipe=True) for m in pipe]  # in the order written
    assert b"".join(m.payload for m in sent if type(m) is Data and m.conn_id == 0) == b"a" * 65537
    assert [m for m in sent if type(m) is Data and m.conn_id == 1] == [Data(1, 1, b"b")]
    # The least-served connection went first: b's byte before most of a's.
    order = [m.conn_id for m in sent if type(m) is Data]
    assert order.index(1) < order.count(0) // 2
    assert session.outbound.queued == 0


def test_a_client_that_does_not_read_stops_every_pipe_past_its_ceiling(logs: LogCapture) -> None:
    lp = LP(n=2, conn_queue_limit=16 * Q, total_queue_limit=1 * MiB)
    session = lp.up()
    _, transport = lp.accept()
    _, other = lp.accept()
    transport.producer.pauseProducing()
    chunks = [bytes([i]) * 4096 for i in range(1, 18)]
    for seq, chunk in enumerate(chunks[:16]):
        lp.send(Data(0, seq, chunk), pipe=seq % 2)
    assert session.inbound.queued_total == 16 * Q  # at the ceiling, not past it
    assert transport.value() == b""
    lp.send(Data(1, 0, b"others still flow"))
    assert other.value() == b"others still flow"
    assert pipe_states(lp) == ["producing", "producing"]
    lp.send(Data(0, 16, chunks[16]), pipe=0)
    assert pipe_states(lp) == ["paused", "paused"]
    assert lp.stats.upload_pauses == 1
    assert logs.matching(f"socket queues full (conn 0 has {17 * Q} B queued")
    # The client takes 8 chunks: 9 are left, more than half the ceiling.
    transport.pause_after = 8 * 4096
    transport.producer.resumeProducing()
    assert session.inbound.queued_total == 9 * Q
    assert pipe_states(lp) == ["paused", "paused"]
    transport.pause_after = 4096
    transport.producer.resumeProducing()
    assert session.inbound.queued_total == 8 * Q
    assert pipe_states(lp) == ["producing", "producing"]
    transport.producer.resumeProducing()
    assert transport.value() == b"".join(chunks)
    assert lp.stats.bytes_from_pipes == 17 * 4096 + len(b"others still flow")


def test_a_connection_over_with_a_full_queue_no_longer_holds_the_pipes() -> None:
    """Once a connection is over no byte can join its queue, so the
    per-connection ceiling no longer applies to it (the total still counts
    it). The pipes used to stay paused with no connection over its ceiling,
    until some other queue moved, and then resumed whatever was left."""
    lp = LP(n=1, conn_queue_limit=64 * KiB, total_queue_limit=1 * MiB)
    session = lp.up()
    client, transport = lp.accept()
    _, other = lp.accept()
    client.readConnectionLost()  # our FIN
    transport.producer.pauseProducing()
    lp.send(*[Data(0, seq, b"%x" % seq * 4096) for seq in range(17)], Fin(0, 17, 0x88))
    assert client.conn.life.over and client.conn in session.sockets
    assert pipe_states(lp) == ["producing"]
    lp.send(Data(1, 0, b"the others flow"))
    assert other.value() == b"the others flow"
    transport.producer.resumeProducing()
    assert transport.value() == b"".join(b"%x" % seq * 4096 for seq in range(17))
    assert transport.write_closed and session.inbound.queued_total == 0


@pytest.mark.parametrize("how", ["client reset", "rp rst"])
def test_a_full_queue_that_goes_away_resumes_the_pipes(how: str) -> None:
    lp = LP(n=1, conn_queue_limit=64 * KiB)
    session = lp.up()
    client, transport = lp.accept()
    transport.producer.pauseProducing()
    for seq in range(17):
        lp.send(Data(0, seq, b"q" * 4096))
    assert pipe_states(lp) == ["paused"]
    if how == "client reset":
        LP.reset(client)
        assert transport.value() == b""
        assert lp.received()[-1] == Fin(0, 1, 0x99)
    else:
        # The RP's 0x99 is still read from a paused pipe's buffer in
        # practice; here it comes as the rest of the same read.
        lp.send(Fin(0, 17, 0x99))
        assert transport.value() == b"q" * 4096 * 17 and transport.disconnected
    assert session.inbound.queued_total == 0
    assert pipe_states(lp) == ["producing"]


def test_a_paused_pipe_that_closes_is_noticed_by_the_kernel_check() -> None:
    """While the pipes are not read, the reactor cannot see them close: the
    LP asks the kernel every second (PAUSED_CHECK_INTERVAL)."""
    lp = LP(n=1, conn_queue_limit=4 * KiB)
    session = lp.up()
    _, transport = lp.accept()
    transport.producer.pauseProducing()
    lp.send(Data(0, 0, b"z" * 5000))
    assert pipe_states(lp) == ["paused"]
    pipe = lp.pipes[0][0]
    pipe.peer_gone = lambda: True  # type: ignore[method-assign]
    lp.reactor.advance(1)
    assert session.ended and transport.disconnected


# -- session loss ---------------------------------------------------------------------------


def test_a_closing_pipe_ends_the_session_resets_every_client_and_redials(logs: LogCapture) -> None:
    lp = LP(n=2)
    session = lp.up()
    (a, ta), (b, tb), (c, tc) = [lp.accept() for _ in range(3)]
    a.dataReceived(b"x")
    b.readConnectionLost()  # half-closed
    # Over (both FINs), but the client still has to take the RP's last bytes.
    c.readConnectionLost()
    tc.producer.pauseProducing()
    lp.send(Data(2, 0, b"queued"), Fin(2, 1, 0x88))
    assert c.conn.life.over and c.conn in session.sockets
    old_pipes = list(lp.pipes)
    lp.lose_pipe(1)
    assert session.ended and lp.proxy.session is None
    assert ta.disconnected and tb.disconnected and tc.disconnected
    assert old_pipes[0][1].disconnected  # the other pipe is aborted too
    assert not lp.accepting
    ends = sorted((e["conn_id"], e["how"]) for e in logs.ends())
    assert ends == [(0, "session-lost"), (1, "session-lost"), (2, "fin")]  # 2 was over already
    assert logs.matching(f"pipes to the RP lost (pipe {RP_HOST}:{RP_PORT} (#1) closed: ")
    assert logs.matching("; reconnecting in 0.5 s")
    # What the reactor reports later changes nothing.
    for client in (a, b, c):
        LP.closed(client)
    old_pipes[0][0].connectionLost()
    assert lp.reactor.getDelayedCalls()[0].getTime() == 0.5
    lp.reactor.advance(0.499)
    assert lp.dials() == []
    lp.reactor.advance(0.001)
    assert lp.dials() == [(RP_HOST, RP_PORT)] * 2
    new = lp.up()
    assert new is not session and lp.accepting
    lp.accept()
    assert lp.received() == [Syn(0, 0, HOST, PORT)]  # a new session numbers from id 0


def test_a_session_that_dies_at_once_backs_off_and_says_why(logs: LogCapture) -> None:
    lp = LP(n=4)
    for delay in (0.5, 1.0, 2.0):
        lp.up()
        lp.lose_pipe(0)
        (line,) = logs.matching(f"reconnecting in {delay:.1f} s")
        assert "does the RP expect --pipes 4?" in line
        lp.reactor.advance(delay)
    # A session that carried a connection resets the backoff.
    lp.up()
    lp.accept()
    lp.lose_pipe(0)
    assert logs.matching("reconnecting in")[-1].endswith("; reconnecting in 0.5 s")
    assert "expect --pipes" not in logs.matching("reconnecting in")[-1]


def test_a_set_the_rp_closed_as_incomplete_gets_a_hint(logs: LogCapture) -> None:
    """An RP that expects more v1 pipes than ours never acts on them and
    closes them after its pending timeout: the line says so."""
    lp = LP(n=2)
    lp.up()
    lp.reactor.advance(PENDING_TIMEOUT)
    lp.lose_pipe(0)
    (line,) = logs.matching("reconnecting in")
    assert "never received a byte: an RP closes a set it has not completed after 30 s" in line
    assert "does it expect --pipes 2?" in line
    # The same loss much later, once the set had carried bytes, has no hint.
    lp.reactor.advance(lp.proxy.dialer.retry.getTime() - lp.reactor.seconds())
    lp.up()
    lp.reactor.advance(120)
    lp.lose_pipe(0)
    assert "expect --pipes" not in logs.matching("reconnecting in")[-1]


def test_a_session_that_lasted_resets_the_backoff(logs: LogCapture) -> None:
    lp = LP(n=1)
    for _ in range(3):
        lp.up()
        lp.lose_pipe(0)
        lp.reactor.advance(lp.proxy.dialer.retry.getTime() - lp.reactor.seconds())
    lp.up()
    lp.reactor.advance(10)
    lp.lose_pipe(0)
    assert logs.matching("reconnecting in")[-1].endswith("reconnecting in 0.5 s")


# -- protocol errors from the RP --------------------------------------------------------------


def assert_ended_by_error(lp: LP, logs: LogCapture, pipe: int, offset: int, raw: bytes, reason: str, clients) -> None:  # type: ignore[no-untyped-def]
    assert lp.proxy.session is None
    assert lp.stats.protocol_errors == 1
    name = f"pipe {RP_HOST}:{RP_PORT} (#{pipe})"
    (line,) = logs.matching("; ending the session")
    assert line.startswith(f"session 1: protocol error on {name} at offset {offset}: {reason}")
    assert line.endswith(f"(bytes: {raw.hex(' ')}); ending the session")
    assert all(t.disconnected for _, t in lp.pipes)
    assert all(t.disconnected for t in clients)
    assert not lp.accepting
    lp.reactor.advance(0.5)
    assert len(lp.dials()) == lp.n  # the LP redials


def test_protocol_error_a_syn_from_the_rp(logs: LogCapture) -> None:
    lp = LP(n=2)
    lp.up()
    _, transport = lp.accept()
    bad = encode_syn(7, "10.0.0.1", 80)
    lp.send_raw(encode_data(0, 0, b"ok") + bad + encode_data(0, 1, b"never"), pipe=1)
    assert transport.value() == b"ok"  # what came before the error was acted on
    assert_ended_by_error(lp, logs, 1, 10, bad, "the RP sent a SYN (for connection 7)", [transport])


@pytest.mark.parametrize("length", [0, 7])
def test_protocol_error_length_below_8(logs: LogCapture, length: int) -> None:
    lp = LP(n=2)
    lp.up()
    _, transport = lp.accept()
    bad = bytes.fromhex("00 00 01 00 00 00") + bytes([length, 0])
    lp.send_raw(encode_data(0, 0, b"ok") + bad + b"junk", pipe=0)
    assert transport.value() == b"ok"
    assert_ended_by_error(lp, logs, 0, 10, bad, f"invalid length {length}", [transport])


def test_protocol_error_a_duplicate_seq(logs: LogCapture) -> None:
    lp = LP(n=2)
    lp.up()
    _, transport = lp.accept()
    lp.send(Data(0, 0, b"ab"), pipe=0)
    lp.send(Data(0, 0, b"ab"), pipe=1)
    assert_ended_by_error(lp, logs, 1, 0, encode_data(0, 0, b"ab"), "seq 0 was already delivered", [transport])


def test_protocol_error_beyond_the_reorder_window(logs: LogCapture) -> None:
    lp = LP(n=1, window_bytes=64 * KiB)  # 8192 messages ahead at most
    lp.up()
    _, transport = lp.accept()
    lp.send(Data(0, 8192, b""))
    assert lp.proxy.session is not None
    bad = encode_data(0, 8193, b"")
    lp.send_raw(bad)
    assert_ended_by_error(lp, logs, 0, 8, bad, "seq 8193 is 8193 ahead of the next expected 0", [transport])


# -- property: any interleaving of client and RP events ----------------------------------------

CLIENT_EVENTS = ["data", "data", "eof", "reset", "closed", "stall", "read"]


@st.composite
def lp_story(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    mode = draw(st.sampled_from(["forward", "socks"]))
    n_pipes = draw(st.sampled_from([1, 1, 2, 3]))  # few pipes: blocking them all is likely
    n_conns = draw(st.integers(1, 3))
    rp_pipes: list[list[Message]] = [[] for _ in range(n_pipes)]
    for cid in range(n_conns):
        payloads = draw(st.lists(st.binary(min_size=0, max_size=6), max_size=4))
        msgs: list[Message] = [Data(cid, seq, p) for seq, p in enumerate(payloads)]
        end = draw(st.sampled_from([None, 0x88, 0x88, 0x99]))
        if end is not None:
            msgs.append(Fin(cid, len(payloads), end))
        for m in msgs:  # each message on any pipe; a pipe keeps its own order
            rp_pipes[draw(st.integers(0, n_pipes - 1))].append(m)
    client_bytes = st.binary(min_size=1, max_size=5)  # a read is never empty
    steps = draw(
        st.lists(
            st.one_of(
                st.tuples(st.sampled_from(["rp", "rp", "rp", "block", "unblock"]), st.integers(0, n_pipes - 1)),
                st.tuples(st.sampled_from(CLIENT_EVENTS), st.integers(0, n_conns - 1), client_bytes),
            ),
            max_size=60,
        )
    )
    queue_limit = draw(st.sampled_from([4 * MiB, 6]))  # 6 bytes: a stalled client soon stops the pipes
    lose_a_pipe = draw(st.booleans())
    return mode, n_pipes, n_conns, rp_pipes, steps, queue_limit, lose_a_pipe


def in_order_prefix(msgs: list[Message]) -> list[Message]:
    by_seq = {m.seq: m for m in msgs}
    out = []
    while len(out) in by_seq:
        out.append(by_seq[len(out)])
        if type(out[-1]) is Fin:
            break
    return out


# A client paused by blocked pipes whose socket closes (EOF, then the RP's
# FIN) while paused: the resume that follows must not trip over it.
PAUSED_CLIENT_CLOSES = (
    "forward", 1, 1, [[Fin(0, 0, 0x88)]],
    [("data", 0, b"x"), ("eof", 0, b""), ("block", 0), ("rp", 0), ("unblock", 0)],
    4 * MiB, False,
)  # fmt: skip
# The RP's 0x99 while the client is stalled and the pipes blocked: flushed, then reset.
RST_TO_A_STALLED_CLIENT = (
    "socks", 2, 2, [[Data(0, 0, b"ab")], [Fin(0, 1, 0x99), Data(1, 0, b"c")]],
    [("stall", 0, b""), ("data", 1, b"q"), ("block", 0), ("block", 1), ("rp", 0), ("rp", 1), ("rp", 1), ("unblock", 1)],
    4 * MiB, True,
)  # fmt: skip
# A stalled client past its ceiling whose connection then ends: the pipes
# must not stay paused with no queue holding them.
OVER_PAST_THE_CEILING = (
    "forward", 2, 1, [[Data(0, 0, b"0123456789")], [Fin(0, 1, 0x88)]],
    [("stall", 0, b""), ("rp", 1), ("rp", 0), ("eof", 0, b"")],
    6, False,
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lp_story())
@example(PAUSED_CLIENT_CLOSES)
@example(RST_TO_A_STALLED_CLIENT)
@example(OVER_PAST_THE_CEILING)
def test_any_interleaving_keeps_the_life_cycle(story) -> None:  # type: ignore[no-untyped-def]
    mode, n_pipes, n_conns, rp_pipes, steps, queue_limit, lose_a_pipe = story
    with pytest.MonkeyPatch.context() as patch:  # 65536 ids cost more than the rest of a run
        patch.setattr("tm3.lp.role.IdAllocator", functools.partial(IdAllocator, count=8))
        lp = LP(n=n_pipes, mode=mode, conn_queue_limit=queue_limit)
        session = lp.up()
    clients = [lp.accept() for _ in range(n_conns)]
    handshake = b""
    if mode == "socks":
        for client, _ in clients:
            client.dataReceived(GREETING + socks_request(HOST, PORT))
        handshake = b"\x05\x00" + reply(0x00)
        assert all(t.value() == handshake for _, t in clients)
    conns = [client.conn for client, _ in clients]
    rp_sent: list[list[Message]] = [[] for _ in range(n_conns)]  # what reached the LP
    lp_sent: list[list[Message]] = [[] for _ in range(n_conns)]
    for m in lp.received():  # the SYNs: the RP answers only connections it has
        lp_sent[m.conn_id].append(m)
    client_sent = [b""] * n_conns
    eof = [False] * n_conns
    lost = [False] * n_conns
    reset = [False] * n_conns  # by the client itself
    cursor = [0] * n_pipes

    def sent_fin(cid: int) -> int | None:
        fins = [m.reason for m in lp_sent[cid] if type(m) is Fin]
        return fins[0] if fins else None

    def fin_of(cid: int) -> int | None:
        """The FIN sent, or queued for when a pipe can take it (late binding)."""
        out = conns[cid].out
        if out and type(out[-1]) is OutControl and not out[-1].syn:
            return out[-1].reason
        return sent_fin(cid)

    def collect() -> None:
        for m in lp.received():
            lp_sent[m.conn_id].append(m)
        # The pipes are not read only while some queue justifies it.
        inbound = session.inbound
        if session.pipes.reading_paused:
            assert inbound.over_ceiling or inbound.queued_total > inbound.settings.total_queue_limit // 2
        for conn in inbound.over_ceiling:
            assert conn.queued > queue_limit // 2 and not conn.life.over

    for step in steps:
        kind = step[0]
        if kind == "rp":
            pipe = step[1]
            if cursor[pipe] == len(rp_pipes[pipe]) or lp.pipes[pipe][1].producerState == "paused":
                continue  # nothing left, or the LP is not reading this pipe
            msg = rp_pipes[pipe][cursor[pipe]]
            cursor[pipe] += 1
            rp_sent[msg.conn_id].append(msg)
            lp.send(msg, pipe=pipe)
            collect()
            continue
        if kind in ("block", "unblock"):  # the pipe's own write buffer fills or drains
            gate = lp.pipes[step[1]][1].producer
            gate.pauseProducing() if kind == "block" else gate.resumeProducing()
            continue
        _, cid, payload = step
        client, transport = clients[cid]
        conn = conns[cid]
        if lost[cid]:
            continue
        was_over, had_fin = conn.life.over, fin_of(cid)
        reading = not transport.disconnecting and transport.producerState == "producing"
        if kind == "data" and reading and not eof[cid]:
            client.dataReceived(payload)
            client_sent[cid] += payload
        elif kind == "eof" and reading and not eof[cid]:
            eof[cid] = True
            client.readConnectionLost()
            collect()
            if not was_over and had_fin is None:
                assert fin_of(cid) == 0x88
        elif kind == "reset" and not transport.disconnecting:
            lost[cid] = reset[cid] = True
            LP.reset(client)
            collect()
            if not was_over and had_fin is None:
                assert fin_of(cid) == 0x99
            assert conn.life.over or fin_of(cid) == 0x88
        elif kind == "closed" and transport.disconnecting:
            lost[cid] = True
            LP.closed(client)
        elif kind == "stall" and transport.producer is not None and not transport.disconnecting:
            transport.producer.pauseProducing()
        elif kind == "read" and transport.producer is not None and not transport.disconnecting:
            transport.producer.resumeProducing()
        collect()

    for _, transport in lp.pipes:
        transport.producer.resumeProducing()
    for _, transport in clients:  # every client reads what it was sent
        if transport.producer is not None and not transport.disconnecting:
            transport.producer.resumeProducing()
    collect()
    assert session.outbound.paused == set()
    for (_, transport), gone in zip(clients, lost, strict=True):
        assert gone or transport.disconnecting or transport.producerState == "producing"
    assert not session.ended and lp.stats.protocol_errors == 0
    for cid, ((_, transport), conn) in enumerate(zip(clients, conns, strict=True)):
        sent = lp_sent[cid]
        # One SYN, DATA numbered on from it, at most one FIN, and that last.
        assert [m.seq for m in sent] == list(range(len(sent)))
        assert sent[0] == Syn(cid, 0, HOST, PORT)
        assert [type(m) for m in sent].count(Fin) <= 1
        assert all(type(m) is not Fin for m in sent[:-1])
        # Over exactly when the life cycle says so.
        ours = sent_fin(cid)
        prefix = in_order_prefix(rp_sent[cid])
        theirs = prefix[-1].reason if prefix and type(prefix[-1]) is Fin else None
        carried = b"".join(m.payload for m in sent if type(m) is Data)
        if theirs == 0x99:  # what still waited for a pipe when the RP reset it is dropped
            assert client_sent[cid].startswith(carried)
        else:
            assert carried == client_sent[cid]
        over = ours == 0x99 or theirs == 0x99 or (ours == 0x88 and theirs == 0x88)
        assert conn.life.over == over, (conn, ours, theirs)
        assert (session.conns.get(cid) is conn) == (not over)
        assert (conn in session.live) == (not over)
        # The client got the RP's bytes in order, and nothing after it was gone.
        expected = handshake + b"".join(m.payload for m in prefix if type(m) is Data)
        if reset[cid]:
            assert expected.startswith(transport.value())
        else:
            assert transport.value() == expected
            if theirs == 0x99:
                assert transport.disconnected
            elif theirs == 0x88:
                assert transport.write_closed
    assert lp.role.ids.in_use == len(session.live)
    assert session.inbound.queued_total == 0 and session.inbound.over_ceiling == set()
    assert pipe_states(lp) == ["producing"] * n_pipes  # every queue drained: the pipes are read again
    if lose_a_pipe:  # the session ends: every client still there is reset, nothing more is sent
        lp.lose_pipe(0)
        assert session.ended and session.live == set() and session.sockets == set()
        assert all(gone or transport.disconnected for (_, transport), gone in zip(clients, lost, strict=True))
        assert all(t.disconnected for _, t in lp.pipes[1:])  # the lost one is gone already
        assert [t.new_messages() for _, t in lp.pipes] == [[]] * n_pipes
