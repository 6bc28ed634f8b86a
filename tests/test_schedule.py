"""The scheduling decisions (tm3/core/schedule.py), without sockets: which
connection sends next, and how a pipe's TCP_INFO ranks it."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tm3.core.schedule import (
    CA_LOSS,
    CA_OPEN,
    CA_RECOVERY,
    CONTROL_FIRST,
    TCP_INFO_SIZE,
    LeastServedFirst,
    TcpInfo,
    expected_delivery,
)


def test_least_served_goes_first_and_ties_go_by_arrival() -> None:
    q: LeastServedFirst[str] = LeastServedFirst(share=100)
    q.push("bulk", 10_000_000)
    q.push("new", 0)
    q.push("page", 3_000)
    q.push("other-new", 0)
    assert [q.pop() for _ in range(4)] == ["new", "other-new", "page", "bulk"]
    assert q.pop() is None and len(q) == 0


def test_a_syn_or_fin_goes_before_any_data() -> None:
    q: LeastServedFirst[str] = LeastServedFirst()
    q.push("fresh", 0)
    q.push("closing", CONTROL_FIRST)
    assert q.pop() == "closing"


def test_one_pick_in_share_serves_the_longest_waiting() -> None:
    """Small connections keep arriving; the bulk connection that waited
    longest still gets one pick in ``share``."""
    q: LeastServedFirst[str] = LeastServedFirst(share=4)
    q.push("bulk", 1 << 30)
    picks = []
    for i in range(12):
        q.push(f"small{i}", 0)
        key = q.pop()
        picks.append(key)
        if key == "bulk":
            q.push("bulk", 1 << 30)
    assert picks.count("bulk") == 3
    assert picks[3] == picks[7] == picks[11] == "bulk"


def test_discard_takes_a_connection_out() -> None:
    q: LeastServedFirst[str] = LeastServedFirst(share=2)
    q.push("a", 0)
    q.push("b", 5)
    q.discard("a")
    assert "a" not in q and "b" in q
    assert q.pop() == "b" and q.pop() is None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("push pop discard".split()), st.integers(0, 9), st.integers(0, 5))))
def test_every_waiting_connection_is_popped_exactly_once(ops: list[tuple[str, int, int]]) -> None:
    """Against a model: pop returns a waiting key (never a stale entry),
    the least served except on every share-th pick, and nothing is lost."""
    share = 3
    q: LeastServedFirst[int] = LeastServedFirst(share=share)
    waiting: dict[int, int] = {}
    for op, key, served in ops:
        if op == "push" and key not in waiting:
            q.push(key, served)
            waiting[key] = served
        elif op == "discard":
            q.discard(key)
            waiting.pop(key, None)
        elif op == "pop":
            got = q.pop()
            if not waiting:
                assert got is None
                continue
            assert got in waiting
            least = min(waiting.values())
            if waiting[got] != least:
                assert q._turn == 0, "only the share pick may skip the least served"
            del waiting[got]
        assert len(q) == len(waiting)
    while waiting:
        got = q.pop()
        assert got in waiting
        del waiting[got]
    assert q.pop() is None


def _info(**fields: float) -> TcpInfo:
    base = dict(
        ca_state=CA_OPEN, rto=0.2, mss=1448, unacked=0, lost=0, retrans=0, rtt=0.04, cwnd=10, notsent=0, min_rtt=0.04
    )
    base.update(fields)
    return TcpInfo(**base)  # type: ignore[arg-type]


def test_an_idle_pipe_delivers_in_half_an_rtt() -> None:
    assert expected_delivery(_info(), 1000) == pytest.approx(0.02)


def test_a_full_window_waits_for_acks() -> None:
    # 10 segments in flight of a 10-segment window, and 10 more to send: one RTT more.
    assert expected_delivery(_info(unacked=10), 10 * 1448) == pytest.approx(0.02 + 0.04)


def test_a_pipe_repairing_a_loss_is_ranked_behind_a_healthy_one() -> None:
    healthy = expected_delivery(_info(unacked=8), 1000)
    recovering = expected_delivery(_info(ca_state=CA_RECOVERY, lost=1, unacked=4, cwnd=5), 1000)
    timed_out = expected_delivery(_info(ca_state=CA_LOSS, rto=0.3, cwnd=1, unacked=1), 1000)
    assert healthy < recovering < timed_out
    assert timed_out >= 0.3


def test_a_shorter_rtt_wins_when_both_are_idle() -> None:
    assert expected_delivery(_info(rtt=0.01), 1000) < expected_delivery(_info(rtt=0.05), 1000)


def test_tcp_info_is_read_from_a_real_socket() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    try:
        client.sendall(b"x" * 100_000)
        got = 0
        while got < 100_000:
            got += len(server.recv(65536))
        info = TcpInfo.parse(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE))
        assert info is not None
        assert info.ca_state == CA_OPEN and info.lost == 0
        assert 0 < info.rtt < 1.0 and 0 < info.min_rtt <= info.rtt + 1e-3
        assert info.cwnd >= 10 and 500 <= info.mss <= 65536
        assert info.notsent == 0
        # Unsent bytes show: the peer stops reading until both buffers fill.
        client.setblocking(False)
        try:
            while True:
                client.send(b"y" * 65536)
        except BlockingIOError:
            pass
        info = TcpInfo.parse(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE))
        assert info is not None and info.notsent > 0
    finally:
        for s in (client, server, listener):
            s.close()


def test_a_short_tcp_info_is_none() -> None:
    assert TcpInfo.parse(b"\0" * (TCP_INFO_SIZE - 1)) is None
    raw = bytearray(TCP_INFO_SIZE)
    struct.pack_into("=I", raw, 8 + 15 * 4, 25_000)  # tcpi_rtt, microseconds
    info = TcpInfo.parse(bytes(raw))
    assert info is not None and info.rtt == 0.025 and info.mss == 1448  # an unknown mss is taken as 1448
