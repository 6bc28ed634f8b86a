"""Limits on what a connection may hold (tm3/mux/timeouts.py, --max-connections): the half-close linger,
and the idle timeout, on both proxies, in memory with a clock."""

from __future__ import annotations

from tests.support.logs import LogCapture
from tests.support.lp_harness import LP
from tests.support.rp_harness import RP
from tm3.core.lifecycle import State
from tm3.core.wire import Data, Fin, Syn

HOST, PORT = "10.0.0.2", 80


def test_an_lp_whose_rp_never_sends_its_fin_gives_the_connection_up(logs: LogCapture) -> None:
    """The client half-closes; our FIN goes; the RP (a public one seen doing
    this) never sends its own. After --half-close-timeout the connection is
    over, the client's socket reset, and its id freed."""
    lp = LP(n=1, half_close_timeout=120.0)
    session = lp.up()
    client, transport = lp.accept()
    conn = session.conns[0]
    client.readConnectionLost()
    assert [type(m) for m in lp.received()] == [Syn, Fin]
    assert conn.life.state is State.OPEN_LOCAL_DONE
    lp.reactor.advance(119)
    assert not conn.life.over and not transport.disconnecting
    lp.reactor.advance(1)
    assert conn.life.over and conn.life.how == "half-close-timeout"
    assert transport.disconnecting  # reset
    assert session.conns == {} and session.live == set()
    assert lp.stats.ended_by == {"half-close-timeout": 1}
    assert logs.matching("no FIN from the peer 120 s after ours")


def test_the_peer_s_fin_in_time_cancels_the_linger() -> None:
    lp = LP(n=1, half_close_timeout=120.0)
    session = lp.up()
    client, transport = lp.accept()
    client.readConnectionLost()
    lp.received()
    lp.reactor.advance(60)
    lp.send(Data(0, 0, b"bye"), Fin(0, 1, 0x88))
    assert session.conns == {} and lp.stats.ended_by == {"fin": 1}
    lp.reactor.advance(120)
    assert lp.stats.ended_by == {"fin": 1}
    assert lp.reactor.getDelayedCalls() == [] or all(not c.active() for c in lp.reactor.getDelayedCalls())


def test_a_zero_half_close_timeout_waits_for_the_peer_for_ever() -> None:
    lp = LP(n=1, half_close_timeout=0.0)
    session = lp.up()
    client, _ = lp.accept()
    client.readConnectionLost()
    lp.reactor.advance(86400)
    assert session.conns[0].life.state is State.OPEN_LOCAL_DONE


def test_the_rp_gives_up_a_connection_whose_socket_closed_and_the_lp_never_finishes() -> None:
    """The server closed (our FIN went), the LP never sends its FIN: after the
    linger the RP forgets the connection, so it holds no state for it."""
    rp = RP(n=1, half_close_timeout=30.0)
    session = rp.up()
    rp.send(Syn(3, 0, HOST, PORT))
    server, transport = rp.accept()
    server.readConnectionLost()
    transport.loseConnection()
    rp.close_server(0)
    assert session.conns[3].life.state is State.CLOSED_LOCAL_DONE
    rp.reactor.advance(30)
    assert 3 not in session.conns and rp.mux.stats.ended_by == {"half-close-timeout": 1}


def test_an_idle_connection_is_reset_and_a_busy_one_is_not(logs: LogCapture) -> None:
    rp = RP(n=1, idle_timeout=30.0)
    session = rp.up()
    rp.send(Syn(3, 0, HOST, PORT), Syn(4, 0, HOST, PORT))
    idle_server, idle = rp.accept(0)
    busy_server, busy = rp.accept(1)
    rp.sent()
    for seq in range(1, 8):
        rp.reactor.advance(10)
        rp.send(Data(4, seq, b"tick"))  # the LP keeps this one moving
    # 70 s on: the idle one was reset once it had moved nothing for 30 s.
    assert idle.disconnecting and not busy.disconnecting
    assert session.conns.get(4) is not None and 3 not in session.conns
    assert Fin(3, 0, 0x99) in rp.sent()
    assert rp.mux.stats.ended_by == {"idle-timeout": 1}
    assert logs.matching("idle for 30 s; resetting it")


def test_idle_timeout_is_off_by_default() -> None:
    rp = RP(n=1)
    session = rp.up()
    rp.send(Syn(3, 0, HOST, PORT))
    rp.accept()
    rp.reactor.advance(86400)
    assert 3 in session.conns


def test_a_peer_still_sending_after_our_fin_is_not_given_up() -> None:
    """A client that half-closes after its request and then downloads for
    longer than the timeout: only the peer's silence counts."""
    lp = LP(n=1, half_close_timeout=120.0)
    session = lp.up()
    client, transport = lp.accept()
    client.readConnectionLost()
    lp.received()
    for seq in range(5):
        lp.reactor.advance(100)
        lp.send(Data(0, seq, b"more"))
    assert session.conns[0].life.state is State.OPEN_LOCAL_DONE and not transport.disconnecting
    for _ in range(25):  # then silence, for 250 s
        lp.reactor.advance(10)
    assert 0 not in session.conns and lp.stats.ended_by == {"half-close-timeout": 1}


# -- --max-connections (the same module's neighbour: limits on what waits) ----------


def test_the_rp_refuses_syns_past_max_connections_with_a_reset(logs: LogCapture) -> None:
    rp = RP(n=1, max_connections=2)
    session = rp.up()
    rp.send(Syn(3, 0, HOST, PORT), Syn(4, 0, HOST, PORT), Syn(5, 0, HOST, PORT))
    assert len(rp.reactor.tcpClients) == 2  # the third is not connected
    assert Fin(5, 0, 0x99) in rp.sent()
    assert rp.mux.stats.connections_refused == 1 and rp.mux.stats.ended_by == {"max-connections": 1}
    assert logs.matching("--max-connections 2: refusing new ones")
    _, t = rp.accept(0)
    rp.send(Fin(3, 1, 0x99))  # one ends: room for the next
    rp.send(Syn(6, 0, HOST, PORT))
    assert len(rp.reactor.tcpClients) == 3 and 6 in session.conns


def test_the_lp_refuses_clients_past_max_connections() -> None:
    lp = LP(n=1, max_connections=2)
    lp.up()
    lp.accept()
    lp.accept()
    _, refused = lp.accept()
    assert refused.disconnected and refused.value() == b""
    assert [m.conn_id for m in lp.received()] == [0, 1]
    assert lp.stats.connections_refused == 1
