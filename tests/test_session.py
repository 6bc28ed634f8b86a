"""The remote proxy's sessions, driven in memory (see tests/support/rp_harness.py): pipe
sets, the connection life cycle, backpressure both ways, id reuse (rules 8
and 9), protocol errors and the per-connection log lines."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost, TCPTimedOutError
from twisted.python.failure import Failure

from tests.support.logs import LogCapture
from tests.support.rp_harness import RP
from tm3.core.lifecycle import State
from tm3.core.wire import Data, Fin, Syn, encode, encode_data, encode_fin, encode_syn
from tm3.mux.inbound import QUEUE_CHUNK_OVERHEAD
from tm3.mux.outbound import OUT_CHUNK_OVERHEAD
from tm3.mux.pipes import EARLY_READ_LIMIT, MAX_EARLY_BYTES, PENDING_TIMEOUT
from tm3.rp.orphans import ORPHAN_ID_OVERHEAD, ORPHAN_OVERHEAD
from tm3.rp.service import Refused

KiB = 1024
MiB = 1024 * 1024
Q = 4096 + QUEUE_CHUNK_OVERHEAD  # what a queued 4 KiB chunk is charged
BIG = 65318  # payload of which 16 orphans fit in 1 MiB with room for a FIN
BIG_COST = 8 + BIG + ORPHAN_OVERHEAD
HOST, PORT = "93.184.216.34", 443


def open_conn(rp: RP, cid: int = 3, host: str = HOST, port: int = PORT, pipe: int = 0):  # type: ignore[no-untyped-def]
    rp.send(Syn(cid, 0, host, port), pipe=pipe)
    return rp.accept()


# -- the pending set ---------------------------------------------------------


def test_pipes_wait_until_the_set_is_complete_and_early_bytes_are_replayed() -> None:
    rp = RP(n=3)
    p0, _ = rp.add_pipe()
    p1, _ = rp.add_pipe()
    assert rp.mux.session is None
    assert rp.factory.pending == [p0, p1]
    # A fast LP: messages before the set is complete are kept, not acted on.
    p0.dataReceived(encode_syn(3, HOST, PORT) + encode_data(3, 1, b"he"))
    p1.dataReceived(encode_data(3, 2, b"llo")[:5])
    assert rp.reactor.tcpClients == []
    p2, _ = rp.add_pipe()
    session = rp.mux.session
    assert session is not None
    assert session.pipes.pipes == [p0, p1, p2]
    assert rp.factory.pending == []
    # The replayed SYN connected, the replayed DATA is queued for it.
    assert [(h, p) for h, p, *_ in rp.reactor.tcpClients] == [(HOST, PORT)]
    p1.dataReceived(encode_data(3, 2, b"llo")[5:])
    _, server = rp.accept()
    assert server.value() == b"hello"
    # The pending timer was cancelled with the set.
    rp.reactor.advance(PENDING_TIMEOUT * 2)
    assert rp.mux.session is session
    assert not any(t.disconnected for _, t in [(p0, p0.transport), (p1, p1.transport), (p2, p2.transport)])


def test_sets_from_two_addresses_are_two_sessions_side_by_side() -> None:
    rp = RP(n=2)
    a0, _ = rp.add_pipe("10.9.0.1")
    b0, _ = rp.add_pipe("10.9.0.2")
    assert rp.mux.session is None  # one pipe each: neither set is complete
    a1, _ = rp.add_pipe("10.9.0.1")
    first = rp.session
    assert first.pipes.pipes == [a0, a1]
    b1, _ = rp.add_pipe("10.9.0.2")
    second = rp.session
    assert second is not first and second.pipes.pipes == [b0, b1]
    assert not first.ended and rp.mux.sessions.by_key == {"10.9.0.1": first, "10.9.0.2": second}
    # A new complete set replaces only the session from its own address.
    rp.add_pipe("10.9.0.2")
    rp.add_pipe("10.9.0.2")
    assert second.ended and not first.ended
    assert len(rp.mux.sessions.by_key) == 2
    # Stopping the service ends them all.
    rp.mux.stopService()
    assert first.ended and rp.mux.sessions.by_key == {}


def test_a_pipe_from_another_address_never_completes_a_set(logs: LogCapture) -> None:
    rp = RP(n=3)
    rp.add_pipe("10.9.0.1")
    rp.add_pipe("10.9.0.1")
    intruder, _ = rp.add_pipe("10.66.0.1")
    assert rp.mux.session is None
    p2, _ = rp.add_pipe("10.9.0.1")
    assert intruder not in rp.session.pipes.pipes and p2 in rp.session.pipes.pipes
    assert rp.factory.pending == [intruder]


def test_allow_from_refuses_pipes_from_elsewhere_at_accept(logs: LogCapture) -> None:
    rp = RP(n=1)
    rp.factory.allow_from = (ipaddress.IPv4Network("10.9.0.0/24"),)
    assert isinstance(rp.factory.buildProtocol(IPv4Address("TCP", "10.66.0.1", 5000)), Refused)
    assert logs.matching("pipe from 10.66.0.1 refused: not in --allow-from")
    assert rp.up("10.9.0.7") is not None


def test_pending_pipes_are_bounded_in_all(logs: LogCapture) -> None:
    rp = RP(n=2)
    rp.factory.max_pending = 3
    for i in range(3):
        rp.add_pipe(f"10.66.0.{i + 1}")
    assert isinstance(rp.factory.buildProtocol(IPv4Address("TCP", "10.66.0.9", 5000)), Refused)
    assert logs.matching("pipe from 10.66.0.9 refused: 3 pipes already wait for their sets")
    # One leaves: room again.
    rp.factory.pending[0].connectionLost(Failure(ConnectionDone()))
    assert rp.factory.buildProtocol(IPv4Address("TCP", "10.66.0.9", 5000)) is not None


def test_a_pending_pipe_is_not_read_past_64_kib_until_its_set_is_complete() -> None:
    rp = RP(n=2)
    p0, t0 = rp.add_pipe()
    p0.dataReceived(encode_syn(3, HOST, PORT) + encode_data(3, 1, b"x" * (EARLY_READ_LIMIT - 30)))
    assert t0.producerState == "producing"
    p0.dataReceived(encode_data(3, 2, b"y" * 100))
    assert t0.producerState == "paused"  # the kernel holds the rest meanwhile
    rp.add_pipe()
    assert t0.producerState == "producing"
    _, server = rp.accept()
    assert server.value() == b"x" * (EARLY_READ_LIMIT - 30) + b"y" * 100


def test_a_pending_pipe_sending_too_much_is_closed(logs: LogCapture) -> None:
    rp = RP(n=2)
    p0, t0 = rp.add_pipe()
    p0.dataReceived(b"\0" * MAX_EARLY_BYTES)
    assert not t0.disconnected
    p0.dataReceived(b"\0")
    assert t0.disconnected
    assert logs.matching(f"sent {MAX_EARLY_BYTES + 1} bytes before its pipe set was complete")
    # It leaves the set at once: a TCP transport reports an abort only in a
    # later reactor turn, and a set completed meanwhile must not include it.
    assert rp.factory.pending == []
    assert rp.reactor.getDelayedCalls() == []
    session = rp.up()
    assert p0 not in session.pipes.pipes
    p0.connectionLost(Failure(ConnectionAborted()))
    assert not session.ended


def test_a_pipe_blocked_while_pending_starts_blocked() -> None:
    rp = RP(n=2)
    rp.pipes = [rp.add_pipe()]
    rp.pipes[0][1].producer.pauseProducing()  # its buffer filled while pending
    rp.pipes.append(rp.add_pipe())
    session = rp.session
    assert [p.blocked for p in session.pipes.pipes] == [True, False]
    t0 = rp.pipes[0][1]
    proto, _ = open_conn(rp)
    for i in range(3):
        proto.dataReceived(b"%d" % i)
    assert [[m.seq for m in p] for p in rp.sent_per_pipe()] == [[], [0, 1, 2]]
    t0.producer.resumeProducing()
    assert [p.blocked for p in session.pipes.pipes] == [False, False]


def test_a_pending_pipe_that_closes_leaves_the_set() -> None:
    rp = RP(n=3)
    p0, _ = rp.add_pipe()
    p1, _ = rp.add_pipe()
    p0.connectionLost(Failure(ConnectionDone()))
    assert rp.factory.pending == [p1]
    p2, _ = rp.add_pipe()
    assert rp.mux.session is None
    p3, _ = rp.add_pipe()
    assert rp.mux.session is not None
    assert rp.mux.session.pipes.pipes == [p1, p2, p3]


def test_an_incomplete_set_is_closed_after_30_seconds(logs: LogCapture) -> None:
    rp = RP(n=3)
    p0, t0 = rp.add_pipe()
    rp.reactor.advance(20)
    p1, t1 = rp.add_pipe()
    rp.reactor.advance(PENDING_TIMEOUT - 20 - 0.001)
    assert not t0.disconnected and not t1.disconnected
    assert rp.factory.pending == [p0, p1]
    rp.reactor.advance(0.001)
    assert t0.disconnected and t1.disconnected  # aborted
    assert rp.factory.pending == []
    (line,) = logs.matching("pipe set incomplete after 30 s (2 of 3)")
    assert line.endswith("closing those pipes: does the LP at 10.9.0.1 run --pipes 3, as this RP expects?"), line
    # The closed pipes report their loss; nothing breaks, and a new set forms.
    p0.connectionLost(Failure(ConnectionAborted()))
    p1.connectionLost(Failure(ConnectionAborted()))
    rp.up()
    assert rp.mux.session is not None


def test_timer_restarts_for_a_new_set_after_the_old_one_emptied() -> None:
    rp = RP(n=2)
    p0, t0 = rp.add_pipe()
    p0.connectionLost(Failure(ConnectionDone()))
    rp.reactor.advance(25)
    _, t1 = rp.add_pipe()
    rp.reactor.advance(25)
    assert not t1.disconnected
    rp.reactor.advance(5)
    assert t1.disconnected


def test_a_new_complete_set_replaces_the_session(logs: LogCapture) -> None:
    rp = RP(n=2)
    old = rp.up()
    old_pipes = list(rp.pipes)
    _, server = open_conn(rp)
    rp.send(Data(3, 1, b"x"))
    assert server.value() == b"x"
    new = rp.up()
    assert new is not old
    assert old.ended and not new.ended
    assert server.disconnected  # aborted: RST to the server
    assert all(t.disconnected for _, t in old_pipes)
    assert not any(t.disconnected for _, t in rp.pipes)
    assert rp.mux.stats.sessions == 2 and rp.mux.stats.sessions_ended == 1
    assert [e["how"] for e in logs.ends()] == ["session-lost"]
    # v1 pipes do not say how many they are: so soon, the likely cause is an
    # LP that opened more pipes than this RP's --pipes.
    assert logs.matching("s after it started: does the LP at 10.9.0.1 open more than --pipes 2 pipes?")
    # The old pipes' and server's closing later changes nothing.
    for p, _ in old_pipes:
        p.connectionLost(Failure(ConnectionAborted()))
    rp.close_server(0, ConnectionAborted())
    assert rp.mux.session is new and not new.ended
    assert old_pipes[0][1].value() == b""  # no FIN went out for the aborted server
    # The new session works.
    rp.send(Syn(3, 0, "10.0.0.7", 80))
    assert rp.reactor.tcpClients[-1][:2] == ("10.0.0.7", 80)


def test_a_closing_pipe_ends_the_session() -> None:
    rp = RP(n=3)
    rp.up()
    _, server = open_conn(rp)
    rp.pipes[2][0].connectionLost(Failure(ConnectionLost()))
    assert rp.mux.session is None
    assert server.disconnected
    assert all(t.disconnected for _, t in rp.pipes[:2])
    rp.up()
    assert rp.mux.session is not None


# -- SYN and connect -----------------------------------------------------------


def test_syn_connects_to_host_and_port_with_the_connect_timeout() -> None:
    rp = RP(n=1)
    rp.up()
    rp.send_raw(bytes.fromhex("03 00 00 00 00 00 ff ff 5d b8 d8 22 bb 01"))
    assert [(h, p, t) for h, p, _, t, _ in rp.reactor.tcpClients] == [("93.184.216.34", 443, 10.0)]
    rp2 = RP(n=1, connect_timeout=2.5)
    rp2.up()
    rp2.send(Syn(9, 0, "10.1.2.3", 8080))
    assert [(h, p, t) for h, p, _, t, _ in rp2.reactor.tcpClients] == [("10.1.2.3", 8080, 2.5)]


def test_data_before_connect_is_queued_and_written_in_order() -> None:
    rp = RP(n=2)
    rp.up()
    rp.send(Syn(3, 0, HOST, PORT), pipe=1)
    rp.send(Data(3, 2, b"cd"), pipe=0)
    rp.send(Data(3, 1, b"ab"), pipe=1)
    rp.send(Data(3, 3, b"ef"), pipe=0)
    assert rp.session.inbound.queued_total == 6 + 3 * QUEUE_CHUNK_OVERHEAD
    _, server = rp.accept()
    assert server.value() == b"abcdef"
    assert rp.session.inbound.queued_total == 0
    rp.send(Data(3, 4, b"g"))
    assert server.value() == b"abcdefg"


def test_data_overtaking_its_syn_is_held_and_taken_over() -> None:
    rp = RP(n=2)
    session = rp.up()
    rp.send(Data(3, 2, b"cd"), Data(3, 1, b"ab"), pipe=0)
    assert rp.reactor.tcpClients == []
    assert 3 in session.role.orphans.held
    rp.send(Syn(3, 0, HOST, PORT), pipe=1)
    assert session.role.orphans.held == {} and session.role.orphans.total == 0
    _, server = rp.accept()
    assert server.value() == b"abcd"
    rp.reactor.advance(60)  # the orphan timer was cancelled
    assert rp.mux.stats.tails_dropped == 0
    assert server.value() == b"abcd"


def test_zero_length_data_is_accepted() -> None:
    rp = RP(n=1)
    rp.up()
    _, server = open_conn(rp)
    rp.send(Data(3, 1, b""), Data(3, 2, b"z"))
    assert server.value() == b"z"
    assert rp.session.conns[3].rx.next_seq == 3


# -- server -> LP --------------------------------------------------------------


def test_server_data_is_cut_at_max_payload_with_consecutive_seqs() -> None:
    rp = RP(n=1, max_payload=5)
    rp.up()
    proto, _ = open_conn(rp)
    proto.dataReceived(b"abcdefghijkl")
    proto.dataReceived(b"mn")
    assert rp.pipes[0][1].value() == b""  # written at the end of the turn
    rp.flush()
    assert rp.pipes[0][1].value() == (
        encode_data(3, 0, b"abcde") + encode_data(3, 1, b"fghij") + encode_data(3, 2, b"kl") + encode_data(3, 3, b"mn")
    )


def test_server_data_default_payload_is_4096() -> None:
    rp = RP(n=1)
    rp.up()
    proto, _ = open_conn(rp)
    data = bytes(range(256)) * 40  # 10240 bytes
    proto.dataReceived(data)
    assert rp.sent() == [Data(3, 0, data[:4096]), Data(3, 1, data[4096:8192]), Data(3, 2, data[8192:])]


def test_tx_seq_wraps_at_2_32() -> None:
    rp = RP(n=1)
    session = rp.up()
    proto, _ = open_conn(rp)
    session.conns[3].tx_seq = 2**32 - 1
    proto.dataReceived(b"a")
    proto.dataReceived(b"b")
    proto.readConnectionLost()
    rp.flush()
    assert rp.pipes[0][1].value() == encode_data(3, 2**32 - 1, b"a") + encode_data(3, 0, b"b") + encode_fin(3, 1, 0x88)


def test_server_half_close_sends_fin_after_its_data_and_keeps_writing(logs: LogCapture) -> None:
    rp = RP(n=1)
    session = rp.up()
    proto, server = open_conn(rp)
    rp.send(Data(3, 1, b"req"))
    proto.dataReceived(b"resp")
    proto.readConnectionLost()
    assert rp.sent() == [Data(3, 0, b"resp"), Fin(3, 1, 0x88)]
    # Half-close: the LP's data still reaches the server.
    rp.send(Data(3, 2, b"more"))
    assert server.value() == b"reqmore"
    assert not server.write_closed
    rp.send(Fin(3, 3, 0x88))
    assert server.write_closed
    assert server.disconnecting  # both halves shut down: the socket is closed
    assert session.conns == {}
    proto.connectionLost(Failure(ConnectionDone()))
    assert rp.sent() == []
    assert session.live == set() and session.sockets == set()
    (end,) = logs.ends()
    assert (end["conn_id"], end["host"], end["port"], end["how"], end["up"], end["down"]) == (
        3,
        HOST,
        PORT,
        "fin",
        7,
        4,
    )


def test_server_reset_sends_fin_0x99_after_its_data(logs: LogCapture) -> None:
    rp = RP(n=1)
    session = rp.up()
    proto, server = open_conn(rp)
    proto.dataReceived(b"partial")
    proto.connectionLost(Failure(ConnectionLost()))
    assert rp.sent() == [Data(3, 0, b"partial"), Fin(3, 1, 0x99)]
    assert session.conns == {} and session.live == set() and session.sockets == set()
    assert [e["how"] for e in logs.ends()] == ["rst"]
    # What the LP still had in flight is the tail of a finished connection.
    rp.send(Data(3, 1, b"late"), Fin(3, 2, 0x88))
    rp.reactor.advance(10)
    assert rp.mux.stats.tails_dropped == 2
    assert rp.sent() == []


def test_server_full_close_then_lp_data_is_dropped_then_lp_fin_ends_it(logs: LogCapture) -> None:
    rp = RP(n=1)
    session = rp.up()
    proto, server = open_conn(rp)
    proto.readConnectionLost()
    proto.connectionLost(Failure(ConnectionDone()))
    assert rp.sent() == [Fin(3, 0, 0x88)]
    assert 3 in session.conns  # still waiting for the LP's FIN
    rp.send(Data(3, 1, b"nobody"))
    assert server.value() == b""
    assert rp.mux.stats.tail_bytes_dropped == 6
    rp.send(Fin(3, 2, 0x88))
    assert session.conns == {}
    assert rp.sent() == []  # one FIN per side
    assert [e["how"] for e in logs.ends()] == ["fin"]


# -- LP FIN --------------------------------------------------------------------


def test_lp_fin_half_closes_the_server_after_queued_data() -> None:
    rp = RP(n=2)
    session = rp.up()
    proto, server = open_conn(rp)
    server.producer.pauseProducing()  # the server is slow
    rp.send(Data(3, 1, b"one"), pipe=0)
    rp.send(Fin(3, 3, 0x88), pipe=1)
    rp.send(Data(3, 2, b"two"), pipe=0)
    assert server.value() == b"" and not server.write_closed
    server.producer.resumeProducing()
    assert server.value() == b"onetwo"
    assert server.write_closed and not server.disconnecting
    # The server still talks; the RP relays it, then its FIN ends the connection.
    proto.dataReceived(b"answer")
    proto.readConnectionLost()
    assert rp.sent() == [Data(3, 0, b"answer"), Fin(3, 1, 0x88)]
    assert session.conns == {}
    assert server.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    assert session.live == set() and session.sockets == set()
    assert rp.sent() == []


def test_lp_fin_while_connecting_half_closes_once_connected() -> None:
    rp = RP(n=1)
    rp.up()
    rp.send(Syn(3, 0, HOST, PORT), Data(3, 1, b"GET"), Fin(3, 2, 0x88))
    _, server = rp.accept()
    assert server.value() == b"GET"
    assert server.write_closed


def test_lp_fin_with_any_reason_but_0x99_is_orderly() -> None:
    rp = RP(n=1)
    rp.up()
    _, server = open_conn(rp)
    rp.send(Data(3, 1, b"x"), Fin(3, 2, 0x00))
    assert server.write_closed and not server.disconnected


def test_lp_rst_aborts_the_server_drops_queued_data_and_sends_no_fin(logs: LogCapture) -> None:
    rp = RP(n=1)
    session = rp.up()
    proto, server = open_conn(rp)
    server.producer.pauseProducing()
    rp.send(Data(3, 1, b"queued"), Fin(3, 2, 0x99))
    assert server.disconnected  # abortConnection
    assert session.inbound.queued_total == 0
    assert session.conns == {}
    proto.connectionLost(Failure(ConnectionAborted()))
    assert server.value() == b""
    assert rp.sent() == []
    assert [(e["how"], e["up"]) for e in logs.ends()] == [("rst", 0)]


def test_lp_rst_while_connecting_stops_the_connect_and_sends_no_fin(logs: LogCapture) -> None:
    rp = RP(n=1)
    session = rp.up()
    rp.send(Syn(3, 0, HOST, PORT), Data(3, 1, b"x"), Fin(3, 2, 0x99))
    assert rp.reactor.connectors[0].stopped
    assert session.conns == {} and session.live == set() and session.sockets == set()
    assert rp.sent() == []
    assert [e["how"] for e in logs.ends()] == ["rst"]
    # The connect was stopped by us: not a connect failure.
    assert rp.mux.stats.connect_failures == 0
    assert logs.matching("failed") == []


# -- connect failure ---------------------------------------------------------------


def test_connect_failure_sends_fin_0x99_seq_0(logs: LogCapture) -> None:
    rp = RP(n=1)
    session = rp.up()
    rp.send(Syn(3, 0, HOST, PORT), Data(3, 1, b"hello"))
    rp.refuse()
    assert rp.sent() == [Fin(3, 0, 0x99)]
    assert rp.pipes[0][1].value() == bytes.fromhex("03 00 00 00 00 00 fe ff 99")
    assert (
        session.conns == {} and session.live == set() and session.sockets == set() and session.inbound.queued_total == 0
    )
    assert rp.mux.stats.connect_failures == 1
    (end,) = logs.ends()
    # Nothing reached a server: "up" counts bytes written, not bytes received.
    assert (end["conn_id"], end["how"], end["up"], end["down"]) == (3, "connect-failed", 0, 0)
    assert rp.mux.stats.bytes_from_pipes == 0
    assert rp.mux.stats.tail_bytes_dropped == 5
    assert logs.matching(f"conn 3: connect to {HOST}:{PORT} failed")
    # DATA in flight when the RP reported the failure: dropped, counted.
    rp.send(Data(3, 2, b"late"), Fin(3, 3, 0x88))
    rp.reactor.advance(10)
    assert rp.mux.stats.tails_dropped == 2
    assert rp.sent() == []


def test_connect_timeout_is_a_connect_failure() -> None:
    rp = RP(n=1)
    rp.up()
    rp.send(Syn(3, 0, HOST, PORT))
    rp.refuse(reason=TCPTimedOutError())
    assert rp.sent() == [Fin(3, 0, 0x99)]


def test_connect_failure_after_lp_fin_still_sends_rst() -> None:
    rp = RP(n=1)
    session = rp.up()
    rp.send(Syn(3, 0, HOST, PORT), Fin(3, 1, 0x88))
    rp.refuse()
    assert rp.sent() == [Fin(3, 0, 0x99)]
    assert session.conns == {}


# -- pipe selection and download backpressure -----------------------------------


def test_each_turn_s_batch_goes_to_the_next_pipe_that_can_send() -> None:
    """Rotation: what waits at the end of a turn goes out as one batch, on
    the next pipe in turn that can send; a blocked pipe is passed over."""
    rp = RP(n=3, pipe_scheduler="rotation")
    rp.up()
    proto, _ = open_conn(rp)
    seqs = []
    for i in range(3):
        proto.dataReceived(b"%d" % i)
        proto.dataReceived(b"%d" % i)
        seqs.append([[m.seq for m in p] for p in rp.sent_per_pipe()])
    assert seqs == [[[0, 1], [], []], [[], [2, 3], []], [[], [], [4, 5]]]
    rp.pipes[1][1].producer.pauseProducing()
    for _ in range(2):
        proto.dataReceived(b"x")
        seqs.append([[m.seq for m in p] for p in rp.sent_per_pipe()])
    assert seqs[3:] == [[[6], [], []], [[], [], [7]]]
    assert [t.write_sequences for _, t in rp.pipes] == [2, 1, 2]  # one write per batch


def test_a_small_batch_goes_to_the_pipe_with_the_earliest_expected_delivery() -> None:
    """The delivery-time scheduler ranks the open pipes by what their
    TCP_INFO says (here stood in for: the harness's pipes have no socket)."""
    rp = RP(n=3)
    session = rp.up()
    proto, _ = open_conn(rp)
    estimates = [0.050, 0.020, 0.200]  # #2 is repairing a loss; #1 has the shortest RTT
    for pipe, t in zip(session.pipes.pipes, estimates, strict=True):
        pipe.expected_delivery = lambda t=t: t  # type: ignore[method-assign]
    for i in range(3):
        proto.dataReceived(b"%d" % i)
        assert [len(p) for p in rp.sent_per_pipe()] == [0, 1, 0]
    rp.pipes[1][1].producer.pauseProducing()
    proto.dataReceived(b"x")
    assert [len(p) for p in rp.sent_per_pipe()] == [1, 0, 0]


def test_nothing_is_bound_to_a_pipe_that_cannot_send() -> None:
    """Late binding: while every pipe is blocked, messages wait unframed (no
    sequence number yet); the first pipe that reopens takes a batch at once."""
    rp = RP(n=2)
    session = rp.up()
    proto, _ = open_conn(rp)
    for _, t in rp.pipes:
        t.producer.pauseProducing()
    proto.dataReceived(b"abc")
    assert rp.sent() == [] and session.conns[3].tx_seq == 0
    assert session.outbound.queued == 3 + OUT_CHUNK_OVERHEAD
    rp.pipes[1][1].producer.resumeProducing()
    assert rp.pipes[1][1].new_messages() == [Data(3, 0, b"abc")]  # in the reopening, not a turn later
    assert session.outbound.queued == 0


def test_a_socket_that_queues_past_send_queue_is_paused_alone() -> None:
    rp = RP(n=2, send_queue=64 * 1024)
    rp.up()
    a, ta = open_conn(rp, cid=1)
    b, tb = open_conn(rp, cid=2)
    for _, t in rp.pipes:
        t.producer.pauseProducing()
    a.dataReceived(b"a" * 65537)
    b.dataReceived(b"b" * 100)
    assert (ta.producerState, tb.producerState) == ("paused", "producing")
    assert rp.mux.stats.download_pauses == 1
    # A connection that opens now is read as usual: the session is under its limit.
    rp.send(Syn(4, 0, HOST, PORT))
    _, td = rp.accept()
    assert td.producerState == "producing"
    rp.pipes[1][1].producer.resumeProducing()
    rp.flush()
    assert [t.producerState for t in (ta, tb, td)] == ["producing"] * 3
    sent = rp.sent()
    assert b"".join(m.payload for m in sent if type(m) is Data and m.conn_id == 1) == b"a" * 65537


def test_past_total_send_queue_a_socket_is_paused_when_it_sends_and_a_broad_burst_pauses_all() -> None:
    """The session's limit is lazy: a socket is paused when it brings a read
    while the session is over it; past 1 MiB of such reads, all sockets stop
    at once. All read again once half the queue has gone."""
    from tm3.mux.outbound import OVERDRAFT_LIMIT

    rp = RP(n=1, total_send_queue=256 * 1024, send_queue=1024 * 1024)
    session = rp.up()
    conns = [open_conn(rp, cid=i) for i in range(1, 41)]
    rp.pipes[0][1].producer.pauseProducing()
    chunk = b"x" * 65536
    first_over = -(-256 * 1024 // (len(chunk) + OUT_CHUNK_OVERHEAD))  # the read that crosses the limit
    for proto, _ in conns[: first_over - 1]:
        proto.dataReceived(chunk)
    assert [t.producerState for _, t in conns] == ["producing"] * len(conns)
    conns[first_over - 1][0].dataReceived(chunk)
    assert session.outbound.over and conns[first_over - 1][1].producerState == "paused"
    assert conns[first_over][1].producerState == "producing"  # quiet sockets are left alone
    burst = OVERDRAFT_LIMIT // len(chunk) + 1
    for proto, _ in conns[first_over : first_over + burst]:
        proto.dataReceived(chunk)
    assert [t.producerState for _, t in conns] == ["paused"] * len(conns)
    assert session.outbound.paused_all
    rp.pipes[0][1].producer.resumeProducing()
    rp.flush()
    assert [t.producerState for _, t in conns] == ["producing"] * len(conns)
    assert not session.outbound.over and not session.outbound.paused_all and session.outbound.queued == 0


def test_pause_and_resume_are_idempotent() -> None:
    rp = RP(n=2)
    rp.up()
    for _ in range(2):
        rp.pipes[0][1].producer.pauseProducing()
    assert [p.blocked for p in rp.session.pipes.pipes] == [True, False]
    for _ in range(2):
        rp.pipes[0][1].producer.resumeProducing()
    assert rp.session.pipes.can_take and not rp.session.pipes.pipes[0].blocked


def test_a_batch_is_at_most_pipe_lowat_and_the_rest_follows() -> None:
    rp = RP(n=1, pipe_lowat=16 * 1024)
    rp.up()
    proto, _ = open_conn(rp)
    for _ in range(10):
        proto.dataReceived(b"y" * 4096)
    rp.flush()
    pipe = rp.pipes[0][1]
    # 4104-byte messages, a batch stops once it reaches 16 KiB: 4 + 4 + 2.
    assert pipe.write_sequences == 3
    assert len(pipe.value()) == 10 * (4096 + 8)


# -- upload backpressure --------------------------------------------------------------


def pipe_states(rp: RP) -> list[str]:
    return [t.producerState for _, t in rp.pipes]


def test_a_server_that_takes_nothing_while_the_pipes_are_paused_is_reset_after_the_stall_timeout(
    logs: LogCapture,
) -> None:
    rp = RP(n=2, conn_queue_limit=16 * Q, total_queue_limit=1 * MiB, stall_timeout=5.0)
    session = rp.up()
    _, slow = open_conn(rp, cid=3)
    _, fine = open_conn(rp, cid=4)
    rp.sent()
    slow.producer.pauseProducing()
    for seq in range(1, 18):
        rp.send(Data(3, seq, bytes(4096)), pipe=seq % 2)
    assert pipe_states(rp) == ["paused", "paused"]
    # A connection with a queue that moves is not touched.
    fine.producer.pauseProducing()
    rp.send(Data(4, 1, b"x" * 100))
    rp.reactor.advance(4.0)
    fine.producer.resumeProducing()
    assert fine.value() == b"x" * 100
    rp.reactor.advance(0.999)
    assert not slow.disconnected and pipe_states(rp) == ["paused", "paused"]
    rp.reactor.advance(0.001)
    # Conn 3 took nothing for 5 s while it held every pipe: reset, the LP told,
    # its queue dropped, the pipes read again.
    assert slow.disconnected and slow.protocol.aborted  # RST to the server
    assert rp.sent() == [Fin(3, 0, 0x99)]
    assert pipe_states(rp) == ["producing", "producing"]
    assert session.inbound.queued_total == 0
    assert rp.mux.stats.stalled_resets == 1 and rp.mux.stats.ended_by == {"stalled": 1}
    assert logs.matching(f"conn 3 to 93.184.216.34:443: its socket took none of its {17 * Q} queued bytes in 5 s")
    assert not fine.disconnected and 4 in session.conns
    # The LP's tail for conn 3 is dropped; the session carries on.
    rp.send(Data(3, 18, b"late"), Fin(3, 19, 0x99))
    rp.send(Data(4, 2, b"more"))
    assert fine.value() == b"x" * 100 + b"more"
    assert rp.reactor.getDelayedCalls() == []  # no stall check left behind


def test_the_stall_check_stops_when_the_pipes_resume() -> None:
    rp = RP(n=1, conn_queue_limit=16 * Q, stall_timeout=5.0)
    rp.up()
    _, server = open_conn(rp)
    server.producer.pauseProducing()
    for seq in range(1, 18):
        rp.send(Data(3, seq, bytes(4096)))
    assert pipe_states(rp) == ["paused"]
    server.producer.resumeProducing()
    assert pipe_states(rp) == ["producing"]
    assert [c for c in rp.reactor.getDelayedCalls() if c.active()] == []
    rp.reactor.advance(10)
    assert not server.disconnected


def test_past_the_conn_queue_all_pipes_pause_until_half_drained(logs: LogCapture) -> None:
    rp = RP(n=2, conn_queue_limit=16 * Q, total_queue_limit=1 * MiB)
    session = rp.up()
    _, server = open_conn(rp)
    server.producer.pauseProducing()
    chunks = [bytes([i]) * 4096 for i in range(1, 18)]
    for seq, chunk in enumerate(chunks[:16], start=1):
        rp.send(Data(3, seq, chunk), pipe=seq % 2)
    assert session.inbound.queued_total == 16 * Q  # at the ceiling, not past it
    assert pipe_states(rp) == ["producing", "producing"]
    rp.send(Data(3, 17, chunks[16]), pipe=1)
    assert pipe_states(rp) == ["paused", "paused"]
    assert rp.mux.stats.upload_pauses == 1
    assert logs.matching("socket queues full")
    # The server takes 8 chunks: 9 are left, more than half the ceiling.
    server.pause_after = 8 * 4096
    server.producer.resumeProducing()
    assert session.inbound.queued_total == 9 * Q
    assert pipe_states(rp) == ["paused", "paused"]
    # One more: exactly half is left, and the pipes resume.
    server.pause_after = 4096
    server.producer.resumeProducing()
    assert session.inbound.queued_total == 8 * Q
    assert pipe_states(rp) == ["producing", "producing"]
    server.producer.resumeProducing()
    assert server.value() == b"".join(chunks)
    assert session.inbound.queued_total == 0
    assert rp.mux.stats.bytes_from_pipes == 17 * 4096


def test_past_the_total_queue_all_pipes_pause() -> None:
    rp = RP(n=1, conn_queue_limit=1 * MiB, total_queue_limit=16 * Q)
    session = rp.up()
    _, s1 = open_conn(rp, cid=1)
    _, s2 = open_conn(rp, cid=2)
    s1.producer.pauseProducing()
    s2.producer.pauseProducing()
    for seq in range(1, 9):
        rp.send(Data(1, seq, b"a" * 4096), Data(2, seq, b"b" * 4096))
    assert session.inbound.queued_total == 16 * Q
    assert pipe_states(rp) == ["producing"]
    rp.send(Data(1, 9, b"a" * 4096))
    assert pipe_states(rp) == ["paused"]
    s1.producer.resumeProducing()  # conn 2's 8 chunks are left: half the ceiling
    assert session.inbound.queued_total == 8 * Q
    assert pipe_states(rp) == ["producing"]


def test_total_queue_resume_needs_half() -> None:
    rp = RP(n=1, conn_queue_limit=1 * MiB, total_queue_limit=16 * Q)
    session = rp.up()
    _, s1 = open_conn(rp, cid=1)
    _, s2 = open_conn(rp, cid=2)
    s1.producer.pauseProducing()
    s2.producer.pauseProducing()
    for seq in range(1, 10):
        rp.send(Data(1, seq, b"a" * 4096), Data(2, seq, b"b" * 4096))
    assert session.inbound.queued_total == 18 * Q
    assert pipe_states(rp) == ["paused"]
    s1.pause_after = 4 * 4096
    s1.producer.resumeProducing()
    assert session.inbound.queued_total == 14 * Q
    assert pipe_states(rp) == ["paused"]
    s2.pause_after = 6 * 4096
    s2.producer.resumeProducing()
    assert session.inbound.queued_total == 8 * Q
    assert pipe_states(rp) == ["producing"]


def test_closing_a_connection_with_a_full_queue_resumes_the_pipes() -> None:
    rp = RP(n=1, conn_queue_limit=16 * Q)
    session = rp.up()
    proto, server = open_conn(rp)
    server.producer.pauseProducing()
    for seq in range(1, 18):
        rp.send(Data(3, seq, b"q" * 4096))
    assert pipe_states(rp) == ["paused"]
    proto.connectionLost(Failure(ConnectionLost()))
    assert session.inbound.queued_total == 0
    assert pipe_states(rp) == ["producing"]
    assert rp.sent() == [Fin(3, 0, 0x99)]


def test_a_session_that_ends_releases_what_it_held_at_once() -> None:
    rp = RP(n=2)
    session = rp.up()
    open_conn(rp)
    for seq in range(2, 40):
        rp.send(Data(3, seq, bytes(4096)), pipe=1)  # seq 1 never comes
    rp.send(Data(9, 1, b"orphan"))
    held = session.inbound.held_budget
    assert held.held > 38 * 4096 and session.role.orphans.total > 0  # type: ignore[attr-defined]
    rp.pipes[0][0].connectionLost(Failure(ConnectionLost()))
    assert session.ended
    assert held.held == 0 and session.role.orphans.total == 0  # type: ignore[attr-defined]
    assert all(len(conn.rx) == 0 for conn in session.live) and not session.conns


def test_bytes_held_for_a_gap_never_pause_the_pipes() -> None:
    rp = RP(n=2, conn_queue_limit=64 * KiB, total_queue_limit=64 * KiB)
    session = rp.up()
    _, server = open_conn(rp)
    chunks = {seq: bytes([seq]) * 4096 for seq in range(1, 41)}
    for seq in range(2, 41):
        rp.send(Data(3, seq, chunks[seq]), pipe=seq % 2)
    assert session.inbound.held_budget.held > 128 * KiB
    assert session.inbound.queued_total == 0
    assert pipe_states(rp) == ["producing", "producing"]
    rp.send(Data(3, 1, chunks[1]))
    assert server.value() == b"".join(chunks[s] for s in range(1, 41))
    assert pipe_states(rp) == ["producing", "producing"]
    assert rp.mux.stats.upload_pauses == 0
    assert session.inbound.held_budget.held == 0


# -- id reuse: rule 8 ----------------------------------------------------------------


def test_rule8_parked_syn_routing_and_the_old_fin_starts_the_new_one(logs: LogCapture) -> None:
    rp = RP(n=2)
    session = rp.up()
    a_proto, a = open_conn(rp, cid=7, host="10.0.0.1", port=1)
    rp.send(Data(7, 1, b"old1"))
    # A fast pipe brings the SYN of the id's next connection.
    rp.send(Syn(7, 0, "10.0.0.2", 2), pipe=1)
    assert len(rp.reactor.tcpClients) == 1
    new = session.role.parked.get(7)
    assert new is not None and new.life.state is State.PARKED
    # seq 1 is behind the old one's next expected (2): the new connection's.
    rp.send(Data(7, 1, b"new1"), pipe=1)
    # seq 2 is the old one's.
    rp.send(Data(7, 2, b"old2"), pipe=0)
    assert a.value() == b"old1old2"
    # The server closed its side already; the LP's FIN ends the old connection.
    a_proto.readConnectionLost()
    assert rp.sent() == [Fin(7, 0, 0x88)]
    rp.send(Fin(7, 3, 0x88), pipe=0)
    assert a.write_closed
    assert [(h, p) for h, p, *_ in rp.reactor.tcpClients] == [("10.0.0.1", 1), ("10.0.0.2", 2)]
    assert session.conns[7] is new and 7 not in session.role.parked
    b_proto, b = rp.accept()
    assert b.value() == b"new1"
    rp.send(Data(7, 2, b"new2"))
    assert b.value() == b"new1new2"
    # The new connection numbers its own messages from 0.
    b_proto.dataReceived(b"hi")
    assert rp.sent() == [Data(7, 0, b"hi")]
    rp.reactor.advance(5)  # the reuse timer was cancelled
    assert not b.disconnected
    assert rp.mux.stats.live_id_reuses == 0
    assert [e["how"] for e in logs.ends()] == ["fin"]


def test_rule8_what_the_old_one_held_past_its_fin_moves_to_the_new_one() -> None:
    rp = RP(n=2)
    session = rp.up()
    a_proto, a = open_conn(rp, cid=7)
    rp.send(Data(7, 1, b"old1"))
    a_proto.readConnectionLost()  # server done: RP sent its FIN
    rp.send(Syn(7, 0, "10.0.0.2", 2), pipe=1)
    # seq 4 is at or past the old one's next (2): held by the old one.
    rp.send(Data(7, 4, b"new4"), pipe=1)
    assert len(session.conns[7].rx) == 1
    rp.send(Data(7, 2, b"old2"), pipe=0)
    rp.send(Fin(7, 3, 0x88), pipe=0)  # the old FIN: seq 4 is past it
    assert a.value() == b"old1old2"
    assert len(rp.reactor.tcpClients) == 2
    new = session.conns[7]
    assert new.host == "10.0.0.2"
    rp.send(Data(7, 1, b"new1"), Data(7, 2, b"new2"), Data(7, 3, b"new3"), pipe=1)
    _, b = rp.accept()
    assert b.value() == b"new1new2new3new4"


def test_rule8_old_fin_before_the_server_closes_sends_later_messages_to_the_new_one() -> None:
    rp = RP(n=2)
    session = rp.up()
    a_proto, a = open_conn(rp, cid=7)
    rp.send(Data(7, 1, b"old1"), Fin(7, 2, 0x88))
    assert a.write_closed
    # The next connection's messages overtake its SYN; they are not the old one's.
    rp.send(Data(7, 1, b"new1"), pipe=1)
    rp.send(Syn(7, 0, "10.0.0.2", 2), pipe=1)
    assert session.role.parked.get(7) is not None
    a_proto.dataReceived(b"bye")
    a_proto.readConnectionLost()
    assert rp.sent() == [Data(7, 0, b"bye"), Fin(7, 1, 0x88)]
    _, b = rp.accept()
    assert b.value() == b"new1"


def test_rule8_two_seconds_without_the_old_fin_resets_the_old_server(logs: LogCapture) -> None:
    rp = RP(n=2)
    session = rp.up()
    a_proto, a = open_conn(rp, cid=7)
    a.producer.pauseProducing()
    rp.send(Data(7, 1, b"stuck"))
    rp.send(Syn(7, 0, "10.0.0.2", 2), Data(7, 1, b"new1"), pipe=1)
    rp.send(Data(7, 5, b"held"), pipe=0)  # held by the old one (gap 2..4)
    rp.reactor.advance(1.999)
    assert not a.disconnected
    assert len(rp.reactor.tcpClients) == 1
    rp.reactor.advance(0.001)
    assert a.disconnected  # RST to the old server
    assert session.inbound.queued_total == 4 + QUEUE_CHUNK_OVERHEAD  # "stuck" dropped; "new1" waits
    assert rp.mux.stats.live_id_reuses == 1
    assert logs.matching("id 7 was reused while its connection")
    assert len(rp.reactor.tcpClients) == 2
    a_proto.connectionLost(Failure(ConnectionAborted()))
    # No FIN for the old connection: the LP has already reused the id.
    assert rp.sent() == []
    assert [e["how"] for e in logs.ends()] == ["id-reused"]
    rp.send(Data(7, 2, b"2"), Data(7, 3, b"3"), Data(7, 4, b"4"), pipe=1)
    _, b = rp.accept()
    assert b.value() == b"new1234held"


def test_rule8_two_seconds_while_the_old_one_is_still_connecting() -> None:
    rp = RP(n=2)
    session = rp.up()
    rp.send(Syn(7, 0, HOST, PORT))  # never answers
    rp.send(Syn(7, 0, "10.0.0.2", 2), pipe=1)
    rp.reactor.advance(2)
    assert rp.reactor.connectors[0].stopped
    # The old connection must not report a connect failure: a FIN 0x99 seq 0
    # for id 7 would be taken by the LP as the new connection's failure.
    assert rp.sent() == []
    assert rp.mux.stats.connect_failures == 0
    assert rp.mux.stats.live_id_reuses == 1
    assert len(rp.reactor.tcpClients) == 2
    assert session.conns[7].host == "10.0.0.2"
    _, b = rp.accept()
    assert b.value() == b""
    assert rp.sent() == []


def test_rule8_a_third_syn_while_one_is_parked_is_a_protocol_error(logs: LogCapture) -> None:
    rp = RP(n=1)
    rp.up()
    open_conn(rp, cid=7)
    rp.send(Syn(7, 0, "10.0.0.2", 2))
    rp.send(Syn(7, 0, "10.0.0.3", 3))
    assert rp.mux.session is None
    assert logs.matching("duplicate SYN for connection 7")


# -- orphans: rule 9 -----------------------------------------------------------------


def test_rule9_orphans_are_dropped_after_10_seconds_and_counted() -> None:
    rp = RP(n=1)
    session = rp.up()
    rp.send(Data(9, 1, b"abc"), Data(9, 2, b"de"), Fin(9, 3, 0x88))
    rp.reactor.advance(9.999)
    assert session.role.orphans.held[9].size == ORPHAN_ID_OVERHEAD + 11 + 10 + 9 + 3 * ORPHAN_OVERHEAD
    assert rp.mux.stats.tails_dropped == 0
    rp.reactor.advance(0.001)
    assert session.role.orphans.held == {} and session.role.orphans.total == 0
    assert rp.mux.stats.tails_dropped == 3
    assert rp.mux.stats.tail_bytes_dropped == 5
    assert not session.ended
    # A SYN now starts a fresh connection that has lost those messages.
    rp.send(Syn(9, 0, HOST, PORT))
    _, server = rp.accept()
    assert server.value() == b""


def test_rule9_per_id_limit_1_mib() -> None:
    rp = RP(n=1)
    session = rp.up()
    payload = b"p" * BIG  # 16 fit in 1 MiB, with what each costs besides its bytes
    for seq in range(1, 18):
        rp.send(Data(9, seq, payload))
    assert len(session.role.orphans.held[9].messages) == 16
    assert session.role.orphans.held[9].size == ORPHAN_ID_OVERHEAD + 16 * BIG_COST <= MiB
    assert rp.mux.stats.tails_dropped == 1
    # A small one still fits.
    rp.send(Fin(9, 18, 0x88))
    assert len(session.role.orphans.held[9].messages) == 17
    rp.send(Syn(9, 0, HOST, PORT))
    _, server = rp.accept()
    assert server.value() == payload * 16


def test_rule9_total_limit_16_mib() -> None:
    rp = RP(n=1)
    session = rp.up()
    payload = b"t" * BIG
    per_id = ORPHAN_ID_OVERHEAD + 16 * BIG_COST
    for cid in range(16):
        for seq in range(1, 17):
            rp.send(Data(cid, seq, payload))
    assert session.role.orphans.total == 16 * per_id <= 16 * MiB
    assert rp.mux.stats.tails_dropped == 0
    rp.send(Data(16, 1, payload))
    assert rp.mux.stats.tails_dropped == 1
    assert session.role.orphans.total == 16 * per_id
    rp.send(Fin(16, 2, 0x88))  # a FIN and its id's record still fit
    small = ORPHAN_ID_OVERHEAD + 9 + ORPHAN_OVERHEAD
    assert session.role.orphans.total == 16 * per_id + small
    # Taking some over frees room.
    rp.send(Syn(0, 0, HOST, PORT))
    assert session.role.orphans.total == 15 * per_id + small
    rp.send(Data(16, 3, payload))
    assert rp.mux.stats.tails_dropped == 1


# -- protocol errors -----------------------------------------------------------------


def assert_session_ended_by_error(rp: RP, logs: LogCapture, pipe: int, offset: int, raw: bytes, servers: list) -> None:  # type: ignore[type-arg]
    assert rp.mux.session is None
    assert rp.mux.stats.protocol_errors == 1
    pipe_name = rp.pipes[pipe][0].name
    assert pipe_name == f"pipe 10.9.0.1:{5001 + pipe} (#{pipe})"
    lines = logs.matching("; ending the session")
    assert len(lines) == 1, lines
    assert f"on {pipe_name} at offset {offset}:" in lines[0]
    assert f"(bytes: {raw.hex(' ')})" in lines[0]
    assert all(t.disconnected for _, t in rp.pipes)
    assert all(t.disconnected for t in servers)
    assert rp.reactor.getDelayedCalls() == []  # no timer outlives the session
    # The daemon keeps running: a new set makes a new session.
    rp.up()
    rp.send(Syn(1, 0, "10.0.0.9", 9))
    assert rp.reactor.tcpClients[-1][:2] == ("10.0.0.9", 9)


@pytest.mark.parametrize("length", [0, 7])
def test_protocol_error_length_below_8(logs: LogCapture, length: int) -> None:
    rp = RP(n=2)
    rp.up()
    _, server = open_conn(rp, pipe=1)  # 14 bytes on pipe 1
    bad = bytes.fromhex("03 00 01 00 00 00") + bytes([length, 0])
    rp.send_raw(encode_data(3, 1, b"ok") + bad + b"junk", pipe=1)
    assert server.value() == b"ok"  # messages before the error were acted on
    assert_session_ended_by_error(rp, logs, 1, 14 + 10, bad, [server])


def test_protocol_error_syn_seq_not_0(logs: LogCapture) -> None:
    rp = RP(n=2)
    rp.up()
    _, server = open_conn(rp, pipe=0)
    bad = encode(Syn(4, 5, HOST, PORT))
    rp.send_raw(bad, pipe=0)
    assert_session_ended_by_error(rp, logs, 0, 14, bad, [server])
    assert len(rp.reactor.tcpClients) == 2  # only the first and the post-error one


def test_protocol_error_duplicate_delivered(logs: LogCapture) -> None:
    rp = RP(n=2)
    rp.up()
    _, server = open_conn(rp, pipe=0)
    rp.send(Data(3, 1, b"ab"), pipe=1)
    rp.send(Data(3, 1, b"ab"), pipe=1)
    assert_session_ended_by_error(rp, logs, 1, 10, encode_data(3, 1, b"ab"), [server])


def test_protocol_error_duplicate_held(logs: LogCapture) -> None:
    rp = RP(n=2)
    rp.up()
    _, server = open_conn(rp, pipe=0)
    rp.send(Data(3, 5, b"x"), pipe=0)
    rp.send(Data(3, 5, b"x"), pipe=1)
    assert_session_ended_by_error(rp, logs, 1, 0, encode_data(3, 5, b"x"), [server])


def test_protocol_error_beyond_window_by_seq(logs: LogCapture) -> None:
    rp = RP(n=1, window_bytes=64 * KiB)
    rp.up()
    _, server = open_conn(rp)
    # max_ahead = 64 KiB / 8 = 8192 messages past the next expected (1).
    rp.send(Data(3, 1 + 8192, b""))
    bad = encode_data(3, 1 + 8193, b"")
    rp.send_raw(bad)
    assert_session_ended_by_error(rp, logs, 0, 14 + 8, bad, [server])


def test_protocol_error_beyond_window_by_bytes(logs: LogCapture) -> None:
    rp = RP(n=1, window_bytes=64 * KiB)
    rp.up()
    _, server = open_conn(rp)
    for seq in range(2, 17):  # 15 x (4104 + 64) = 62520 bytes held
        rp.send(Data(3, seq, b"w" * 4096))
    assert rp.mux.session is not None
    bad = encode_data(3, 17, b"w" * 4096)
    rp.send_raw(bad)
    assert_session_ended_by_error(rp, logs, 0, 14 + 15 * 4104, bad[:16], [server])


def test_protocol_error_beyond_total_window(logs: LogCapture) -> None:
    rp = RP(n=1, window_bytes=64 * KiB, total_window_bytes=64 * KiB)
    rp.up()
    _, s1 = open_conn(rp, cid=1)
    _, s2 = open_conn(rp, cid=2)
    for seq in range(2, 10):
        rp.send(Data(1, seq, b"w" * 4096))
    for seq in range(2, 9):
        rp.send(Data(2, seq, b"w" * 4096))
    assert rp.mux.session is not None
    bad = encode_data(2, 9, b"w" * 4096)
    rp.send_raw(bad)
    assert_session_ended_by_error(rp, logs, 0, 28 + 15 * 4104, bad[:16], [s1, s2])


def test_protocol_error_in_early_bytes_ends_the_new_session(logs: LogCapture) -> None:
    rp = RP(n=2)
    p0, t0 = rp.add_pipe()
    p0.dataReceived(bytes(8))  # length 0
    p1, t1 = rp.add_pipe()
    assert rp.mux.session is None
    assert t0.disconnected and t1.disconnected
    assert logs.matching("at offset 0: invalid length 0")
    rp.up()
    assert rp.mux.session is not None


# -- end log lines, session end ---------------------------------------------------------


def test_end_log_line_names_id_destination_bytes_duration_and_how(logs: LogCapture) -> None:
    rp = RP(n=1)
    rp.up()
    proto, _ = open_conn(rp, cid=12, host="10.2.3.4", port=8443)
    rp.send(Data(12, 1, b"12345"), Data(12, 2, b"678"))
    proto.dataReceived(b"abcdefghij")
    proto.readConnectionLost()
    rp.send(Fin(12, 3, 0x88))
    (event,) = logs.ends()
    assert event["conn_id"] == 12
    assert (event["host"], event["port"]) == ("10.2.3.4", 8443)
    assert (event["up"], event["down"]) == (8, 10)
    assert event["how"] == "fin"
    assert isinstance(event["seconds"], float) and event["seconds"] >= 0
    (text,) = logs.matching("conn 12 to")
    assert text.startswith("conn 12 to 10.2.3.4:8443 ended: fin; up 8 B, down 10 B, ")
    assert text.endswith(" s")


def test_session_loss_logs_every_connection_and_forgets_everything(logs: LogCapture) -> None:
    rp = RP(n=1)
    session = rp.up()
    _, s1 = open_conn(rp, cid=1)
    rp.send(Syn(2, 0, HOST, PORT))  # still connecting
    rp.send(Data(5, 1, b"orphan"))
    rp.pipes[0][0].connectionLost(Failure(ConnectionLost()))
    assert sorted((e["conn_id"], e["how"]) for e in logs.ends()) == [(1, "session-lost"), (2, "session-lost")]
    assert s1.disconnected
    assert rp.reactor.connectors[1].stopped
    assert (
        session.conns == {} and session.live == set() and session.sockets == set() and session.role.orphans.held == {}
    )
    assert rp.mux.stats.connect_failures == 0
    rp.reactor.advance(60)
    assert rp.mux.stats.tails_dropped == 0  # the orphan timer went with the session
    assert logs.matching("session 1 lost after")


def test_session_loss_cancels_every_timer() -> None:
    rp = RP(n=2)
    session = rp.up()
    open_conn(rp, cid=7)
    rp.send(Syn(7, 0, "10.0.0.2", 2))  # parked: a 2 s reuse timer
    rp.send(Data(8, 1, b"o"))  # an orphan: a 10 s timer
    rp.add_pipe()  # a pending pipe of the next set: a 30 s timer
    rp.send_raw(bytes(8))  # protocol error
    assert session.ended and rp.mux.stats.protocol_errors == 1
    assert len(rp.reactor.getDelayedCalls()) == 1  # only the pending set's
    rp.reactor.advance(60)
    assert rp.mux.stats.live_id_reuses == 0 and rp.mux.stats.tails_dropped == 0


def test_a_repeated_eof_from_the_server_sends_one_fin() -> None:
    # A TCP transport resumed after its peer's EOF reads the EOF again.
    rp = RP(n=1)
    rp.up()
    proto, _ = open_conn(rp)
    proto.readConnectionLost()
    proto.readConnectionLost()
    assert rp.sent() == [Fin(3, 0, 0x88)]


def test_stopping_the_service_with_no_drain_ends_the_session() -> None:
    rp = RP(n=1, drain_timeout=0)
    session = rp.up()
    _, server = open_conn(rp)
    rp.mux.stopService()
    assert session.ended and server.disconnected
    assert rp.mux.session is None


def test_stopping_refuses_new_syns_and_lets_open_connections_finish() -> None:
    rp = RP(n=1, drain_timeout=10)
    session = rp.up()
    proto, server = open_conn(rp, cid=3)
    stopped = rp.mux.stopService()
    rp.send(Syn(4, 0, HOST, PORT))
    assert Fin(4, 0, 0x99) in rp.sent() and len(rp.reactor.tcpClients) == 1  # refused, not connected
    assert rp.mux.stats.ended_by == {"draining": 1}
    proto.dataReceived(b"last bytes")
    proto.readConnectionLost()
    rp.send(Fin(3, 1, 0x88))
    assert not session.ended  # (the poll notices in a tenth of a second)
    rp.reactor.advance(0.1)
    assert session.ended and stopped.called
    assert rp.sent() == [Data(3, 0, b"last bytes"), Fin(3, 1, 0x88)]


# -- scale ------------------------------------------------------------------------------


def test_ten_thousand_connections_in_one_session() -> None:
    n_conns = 10_000
    rp = RP(n=4)
    session = rp.up()
    for cid in range(n_conns):
        rp.send_raw(
            encode_syn(cid, f"10.{cid >> 8}.{cid & 255}.1", 80)
            + encode_data(cid, 1, b"q%d" % cid)
            + encode_fin(cid, 2, 0x88),
            pipe=cid % 4,
        )
    assert len(rp.reactor.tcpClients) == n_conns
    assert len(session.conns) == n_conns
    for i in range(n_conns):
        proto, server = rp.accept(i)
        assert server.value() == b"q%d" % i and server.write_closed
        proto.dataReceived(b"r%d" % i)
        proto.readConnectionLost()
        proto.connectionLost(Failure(ConnectionDone()))
    assert session.conns == {} and session.live == set() and session.sockets == set()
    assert session.inbound.queued_total == 0 and session.inbound.held_budget.held == 0
    assert rp.mux.stats.connections_closed == n_conns
    out = rp.sent()
    assert len(out) == 2 * n_conns
    assert out[:2] == [Data(0, 0, b"r0"), Fin(0, 1, 0x88)]
    assert out[-2:] == [Data(n_conns - 1, 0, b"r%d" % (n_conns - 1)), Fin(n_conns - 1, 1, 0x88)]
    assert not session.ended


def test_protocol_error_in_held_messages_from_a_server_callback(logs: LogCapture) -> None:
    # When the old connection of a reused id ends from the server side, what
    # it held moves to the new one; a message the new one cannot take must
    # end the session, not escape from the socket's connectionLost.
    rp = RP(n=2, window_bytes=64 * KiB)  # 8192 messages ahead at most
    session = rp.up()
    old_proto, old = open_conn(rp, cid=7)
    rp.send_raw(b"".join(encode_data(7, seq, b"") for seq in range(1, 9001)))
    rp.send(Syn(7, 0, "10.0.0.2", 2), pipe=1)
    rp.send(Data(7, 9005, b"x"), pipe=1)  # past the old one's next (9001): held by it
    old_proto.connectionLost(Failure(ConnectionLost()))  # must not raise
    assert session.ended and rp.mux.session is None
    assert rp.mux.stats.protocol_errors == 1
    (line,) = logs.matching("; ending the session")
    assert "protocol error on a message held for id 7: seq 9005 is 9004 ahead" in line
    assert "(bytes: 07 00 2d 23 00 00 09 00 78)" in line
    assert rp.reactor.getDelayedCalls() == []


def test_protocol_error_in_held_messages_leaves_no_timers(logs: LogCapture) -> None:
    rp = RP(n=2, window_bytes=64 * KiB)
    session = rp.up()
    open_conn(rp, cid=7)
    rp.send_raw(b"".join(encode_data(7, seq, b"") for seq in range(1, 9001)))
    rp.send(Syn(7, 0, "10.0.0.2", 2), pipe=1)
    rp.send(Data(7, 9002, b"a"), Data(7, 9005, b"x"), pipe=1)  # held by the old one
    rp.send(Fin(7, 9001, 0x99), pipe=0)  # the old one ends; 9005 is too far for the new one
    assert session.ended
    assert rp.mux.stats.protocol_errors == 1
    assert len(logs.matching("; ending the session")) == 1
    assert rp.reactor.getDelayedCalls() == []
    assert session.role.orphans.held == {}


# -- property: any spreading over pipes, fragmentation and interleaving ---------------


@st.composite
def lp_traffic(draw: st.DrawFn):  # type: ignore[no-untyped-def]
    n_pipes = draw(st.integers(1, 4))
    conns = draw(st.lists(st.lists(st.binary(min_size=0, max_size=20), max_size=6), min_size=1, max_size=4))
    reasons = draw(st.lists(st.sampled_from([0x88, 0x88, 0x00]), min_size=len(conns), max_size=len(conns)))
    # Per-connection message lists, in seq order.
    per_conn = []
    for cid, payloads in enumerate(conns):
        msgs = [Syn(cid, 0, f"10.0.0.{cid + 1}", 1000 + cid)]
        msgs += [Data(cid, i + 1, p) for i, p in enumerate(payloads)]
        msgs.append(Fin(cid, len(payloads) + 1, reasons[cid]))
        per_conn.append(msgs)
    # The LP's send order: any interleaving that keeps each connection's order.
    cursors = [0] * len(per_conn)
    order = []
    while any(c < len(m) for c, m in zip(cursors, per_conn)):
        live = [i for i, m in enumerate(per_conn) if cursors[i] < len(m)]
        i = draw(st.sampled_from(live))
        order.append(per_conn[i][cursors[i]])
        cursors[i] += 1
    streams = [b"" for _ in range(n_pipes)]
    for m in order:
        p = draw(st.integers(0, n_pipes - 1))
        streams[p] += encode(m)
    # Cut each pipe's stream into reads, then interleave the reads.
    reads = []
    for p, stream in enumerate(streams):
        cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=6))))
        bounds = [0, *[c for c in cuts if c < len(stream)], len(stream)]
        reads.append([(p, stream[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a])
    schedule = []
    pos = [0] * n_pipes
    while any(pos[p] < len(reads[p]) for p in range(n_pipes)):
        live = [p for p in range(n_pipes) if pos[p] < len(reads[p])]
        p = draw(st.sampled_from(live))
        accept_now = draw(st.booleans())
        schedule.append((reads[p][pos[p]], accept_now))
        pos[p] += 1
    return n_pipes, conns, schedule


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lp_traffic())
def test_any_spreading_and_fragmentation_delivers_exact_bytes(case) -> None:  # type: ignore[no-untyped-def]
    n_pipes, conns, schedule = case
    rp = RP(n=n_pipes)
    session = rp.up()
    accepted = 0

    def accept_all() -> None:
        nonlocal accepted
        while accepted < len(rp.reactor.tcpClients):
            rp.accept(accepted)
            accepted += 1

    for (pipe, chunk), accept_now in schedule:
        rp.send_raw(chunk, pipe=pipe)
        if accept_now:
            accept_all()
    accept_all()
    assert not session.ended
    assert rp.mux.stats.protocol_errors == 0
    assert sorted((h, p) for h, p, *_ in rp.reactor.tcpClients) == sorted(
        (f"10.0.0.{cid + 1}", 1000 + cid) for cid in range(len(conns))
    )
    for _, server in rp.servers.values():
        cid = int(server.getPeer().host.rsplit(".", 1)[1]) - 1
        assert server.value() == b"".join(conns[cid])
        assert server.write_closed
    assert (
        session.role.orphans.held == {} and session.inbound.queued_total == 0 and session.inbound.held_budget.held == 0
    )
    assert rp.sent() == []


def test_tail_after_our_rst_is_dropped_on_arrival_not_held_for_a_reused_id() -> None:
    """The RP ended the connection (connect failed) before the LP's FIN: the
    LP's in-flight tail must not be held where a reused id's SYN would take
    it over (it would reach the new server, then collide by seq)."""
    rp = RP(n=1)
    session = rp.up()
    rp.send(Syn(4, 0, HOST, PORT))
    rp.refuse()
    assert rp.sent() == [Fin(4, 0, 0x99)]
    rp.send(Data(4, 1, b"old tail"), Fin(4, 2, 0x88))  # still in flight when we reset
    assert 4 not in session.role.orphans.held
    assert rp.mux.stats.tails_dropped == 2
    # The LP reuses the id (10 s after it got our FIN): a clean new connection.
    rp.reactor.advance(10)
    rp.send(Syn(4, 0, HOST, PORT), Data(4, 1, b"new"))
    _, server = rp.accept()
    assert server.value() == b"new"
    assert not session.ended


def test_early_data_of_a_new_connection_after_the_tombstone_expires_is_held() -> None:
    rp = RP(n=1)
    session = rp.up()
    rp.send(Syn(4, 0, HOST, PORT))
    rp.refuse()
    rp.reactor.advance(10)
    rp.send(Data(4, 1, b"early"))  # overtook its SYN: held, not dropped
    assert session.role.orphans.held[4].messages == [Data(4, 1, b"early")]
    rp.send(Syn(4, 0, HOST, PORT))
    _, server = rp.accept()
    assert server.value() == b"early"


def test_tail_after_an_orderly_end_is_not_tombstoned() -> None:
    """When the LP's FIN did arrive, messages numbered past it belong to the
    next connection: they are held for its SYN, not dropped."""
    rp = RP(n=1)
    session = rp.up()
    rp.send(Syn(6, 0, HOST, PORT))
    proto, _ = rp.accept()
    rp.send(Fin(6, 1, 0x88))
    proto.readConnectionLost()
    assert session.conns == {}
    assert session.role.tombstones == {}
    rp.send(Data(6, 1, b"next"))
    assert session.role.orphans.held[6].messages == [Data(6, 1, b"next")]
