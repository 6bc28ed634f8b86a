"""Per-connection windows (tm3/core/credit.py), without sockets: what is
granted, when, how windows grow, and what bounds them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tm3.core.credit import MIN_RTT, ReceiveWindow, WindowBudget, WindowExceeded
from tm3.core.lifecycle import Event, Lifecycle, LifecycleError, State
from tm3.core.wire import Credit, Data, Decoder, ProtocolError, encode_credit, encode_data

KiB = 1024


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def window(initial: int = 64 * KiB, maximum: int = 1024 * KiB, budget: int = 10**9, rtt: float = 0.04):
    clock = Clock()
    return ReceiveWindow(initial, maximum, WindowBudget(budget), clock, lambda: rtt), clock


def test_credit_is_granted_when_half_the_window_is_taken() -> None:
    w, _ = window()
    assert w.consume(32 * KiB - 1) == 0
    assert w.consume(1) == 32 * KiB  # back to a full window ahead
    assert w.granted == 96 * KiB


def test_the_sender_may_not_pass_what_was_granted() -> None:
    w, _ = window()
    w.receive(64 * KiB)
    with pytest.raises(WindowExceeded, match="1 bytes past the 65536 granted"):
        w.receive(1)


def test_a_fast_consumer_doubles_the_window_up_to_the_maximum() -> None:
    """Grants less than two round trips apart: the window is the limit."""
    w, clock = window(rtt=0.04)
    sizes = []
    for _ in range(12):
        clock.now += 0.01
        w.receive(w.granted - w.received)
        w.consume(w.granted - w.consumed)
        sizes.append(w.window)
    assert sizes[0] == 64 * KiB and sizes[1] == 128 * KiB and sizes[-1] == 1024 * KiB
    assert max(sizes) == 1024 * KiB


def test_a_slow_consumer_never_grows_its_window() -> None:
    """A socket read at 128 KiB/s: grants a quarter of a second apart."""
    w, clock = window(rtt=0.04)
    for _ in range(40):
        clock.now += 0.25
        w.receive(32 * KiB)
        w.consume(32 * KiB)
    assert w.window == 64 * KiB


def test_loopback_round_trips_are_taken_as_min_rtt() -> None:
    w, clock = window(rtt=0.00002)
    for _ in range(3):
        clock.now += MIN_RTT  # under 2 * MIN_RTT apart: grows
        w.consume(w.granted - w.consumed)
    assert w.window > 64 * KiB


def test_the_session_budget_bounds_growth_and_comes_back() -> None:
    budget = WindowBudget(96 * KiB)
    clock = Clock()
    a = ReceiveWindow(64 * KiB, 1024 * KiB, budget, clock, lambda: 0.04)
    b = ReceiveWindow(64 * KiB, 1024 * KiB, budget, clock, lambda: 0.04)
    for w in (a, b) * 4:
        clock.now += 0.001
        w.consume(w.granted - w.consumed)
    assert a.window + b.window == 128 * KiB + 96 * KiB and budget.used == 96 * KiB
    a.release()
    b.release()
    assert budget.used == 0


@given(st.lists(st.tuples(st.integers(0, 200_000), st.floats(0, 0.5)), max_size=60))
def test_granted_always_covers_consumed_and_never_runs_more_than_the_window_ahead(
    steps: list[tuple[int, float]],
) -> None:
    w, clock = window(initial=16 * KiB, maximum=256 * KiB, rtt=0.02)
    for n, dt in steps:
        clock.now += dt
        n = min(n, w.granted - w.received)
        w.receive(n)
        w.consume(n)
        assert w.consumed <= w.granted <= w.consumed + w.window
        assert w.granted - w.consumed >= w.window // 2  # the sender is never starved by us
        assert 16 * KiB <= w.window <= 256 * KiB


def test_credit_messages_are_v2_only() -> None:
    raw = encode_credit(7, 65536)
    assert raw == bytes.fromhex("0700 00000100 0100")
    assert list(Decoder(v2=True).feed(raw + encode_data(7, 1, b"x"))) == [Credit(7, 65536), Data(7, 1, b"x")]
    with pytest.raises(ProtocolError, match="invalid length 1"):
        list(Decoder().feed(raw))


def test_v2_lets_a_reset_follow_a_half_close() -> None:
    """v1: one FIN per side. v2: our 0x88, then the socket resets: 0x99
    follows; and the peer's 0x99 after its 0x88 resets our socket."""
    v1 = Lifecycle(State.CONNECTING)
    v1.step(Event.CONNECTED)
    v1.step(Event.SOCKET_EOF)
    v1.step(Event.SOCKET_RESET)
    assert v1.state is State.CLOSED_LOCAL_DONE  # the reset cannot be told
    v2 = Lifecycle(State.CONNECTING, v2=True)
    v2.step(Event.CONNECTED)
    v2.step(Event.SOCKET_EOF)
    actions = v2.step(Event.SOCKET_RESET)
    assert v2.over and v2.how == "rst" and [a.name for a in actions] == ["SEND_RST", "DROP_QUEUE"]
    peer = Lifecycle(State.CONNECTING, v2=True)
    peer.step(Event.CONNECTED)
    peer.step(Event.PEER_FIN)
    assert peer.may_reset_after_fin
    assert [a.name for a in peer.step(Event.PEER_RST)] == ["PEER_RESET"] and peer.over
    v1peer = Lifecycle(State.CONNECTING)
    v1peer.step(Event.CONNECTED)
    v1peer.step(Event.PEER_FIN)
    assert not v1peer.may_reset_after_fin
    with pytest.raises(LifecycleError):
        v1peer.step(Event.PEER_RST)
