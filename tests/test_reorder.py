"""The per-connection reorder buffer: in-order release, duplicates, the
reorder window (per connection and shared), serial-number wrap-around."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tm3.core.reorder import (
    HELD_OVERHEAD,
    BeyondWindow,
    DuplicateSeq,
    HeldBudget,
    ReorderBuffer,
    seq_distance,
)

TOP = 2**32


def test_in_order_is_released_at_once() -> None:
    rb: ReorderBuffer[str] = ReorderBuffer()
    assert rb.push(0, "a", 10) == ["a"]
    assert rb.push(1, "b", 10) == ["b"]
    assert rb.next_seq == 2
    assert len(rb) == 0
    assert rb.held_bytes == 0


def test_out_of_order_is_held_until_the_gap_fills() -> None:
    budget = HeldBudget(10_000)
    rb: ReorderBuffer[str] = ReorderBuffer(budget=budget)
    assert rb.push(2, "c", 10) == []
    assert rb.push(3, "d", 20) == []
    assert rb.push(5, "f", 30) == []
    assert len(rb) == 3
    assert rb.held_bytes == 60 + 3 * HELD_OVERHEAD
    assert budget.held == rb.held_bytes
    assert rb.push(0, "a", 1) == ["a"]
    assert rb.push(1, "b", 1) == ["b", "c", "d"]
    assert rb.next_seq == 4
    assert rb.held_bytes == 30 + HELD_OVERHEAD
    assert budget.held == 30 + HELD_OVERHEAD
    assert rb.push(4, "e", 1) == ["e", "f"]
    assert rb.next_seq == 6
    assert rb.held_bytes == 0
    assert budget.held == 0


def test_duplicate_of_delivered_seq() -> None:
    rb: ReorderBuffer[str] = ReorderBuffer()
    rb.push(0, "a", 1)
    rb.push(1, "b", 1)
    with pytest.raises(DuplicateSeq, match="already delivered"):
        rb.push(1, "b again", 1)
    with pytest.raises(DuplicateSeq, match="already delivered"):
        rb.push(0, "a again", 1)
    # Far behind (anything in the lower half-circle) is also "delivered".
    with pytest.raises(DuplicateSeq):
        rb.push((2 - 2**31) % TOP, "x", 1)
    assert rb.next_seq == 2


def test_duplicate_of_held_seq() -> None:
    budget = HeldBudget()
    rb: ReorderBuffer[str] = ReorderBuffer(budget=budget)
    rb.push(3, "d", 5)
    held = rb.held_bytes
    with pytest.raises(DuplicateSeq, match="already held"):
        rb.push(3, "d again", 5)
    assert rb.held_bytes == held == budget.held
    assert rb.push(0, "a", 1) == ["a"]
    assert rb.push(1, "b", 1) == ["b"]
    assert rb.push(2, "c", 1) == ["c", "d"]  # the original, not the duplicate


def test_beyond_window_by_seq_distance() -> None:
    rb: ReorderBuffer[str] = ReorderBuffer(window_bytes=800)
    assert rb.max_ahead == 100
    assert rb.push(100, "ok", 8) == []
    with pytest.raises(BeyondWindow, match="101 ahead"):
        rb.push(101, "too far", 8)
    # Just under half the sequence space ahead is "ahead", not "behind".
    with pytest.raises(BeyondWindow):
        rb.push(2**31 - 1, "far", 8)


def test_beyond_window_by_bytes_per_connection() -> None:
    window = 1000
    rb: ReorderBuffer[str] = ReorderBuffer(window_bytes=window)
    size = window // 2 - HELD_OVERHEAD  # two of these fill it exactly
    rb.push(1, "a", size)
    rb.push(2, "b", size)
    assert rb.held_bytes == window
    with pytest.raises(BeyondWindow, match="for this connection"):
        rb.push(3, "c", 0)
    assert len(rb) == 2 and rb.held_bytes == window
    # Releasing makes room again.
    assert rb.push(0, "z", 1) == ["z", "a", "b"]
    assert rb.push(4, "d", size) == []


def test_beyond_window_by_shared_budget() -> None:
    budget = HeldBudget(limit=3 * (100 + HELD_OVERHEAD))
    a: ReorderBuffer[str] = ReorderBuffer(window_bytes=10_000, budget=budget)
    b: ReorderBuffer[str] = ReorderBuffer(window_bytes=10_000, budget=budget)
    a.push(1, "a1", 100)
    a.push(2, "a2", 100)
    b.push(5, "b5", 100)
    assert budget.held == budget.limit
    with pytest.raises(BeyondWindow, match="total reorder window"):
        b.push(6, "b6", 1)
    with pytest.raises(BeyondWindow, match="total reorder window"):
        a.push(3, "a3", 1)
    # Neither buffer was charged for the refused message.
    assert a.held_bytes + b.held_bytes == budget.held
    a.push(0, "a0", 1)  # releases a1, a2
    assert budget.held == 100 + HELD_OVERHEAD
    b.push(6, "b6", 1)
    assert budget.held == 100 + 1 + 2 * HELD_OVERHEAD
    b.clear()
    assert budget.held == 0


def test_wrap_around_at_2_32() -> None:
    rb: ReorderBuffer[int] = ReorderBuffer(next_seq=TOP - 3)
    assert rb.push(TOP - 1, TOP - 1, 1) == []
    assert rb.push(1, 1, 1) == []
    assert rb.push(0, 0, 1) == []
    assert rb.push(TOP - 3, TOP - 3, 1) == [TOP - 3]
    assert rb.push(TOP - 2, TOP - 2, 1) == [TOP - 2, TOP - 1, 0, 1]
    assert rb.next_seq == 2
    # The seqs before the wrap are now behind: duplicates.
    with pytest.raises(DuplicateSeq):
        rb.push(TOP - 1, -1, 1)
    with pytest.raises(DuplicateSeq):
        rb.push(1, -1, 1)
    assert rb.push(2, 2, 1) == [2]


def test_wrap_around_next_seq_is_masked() -> None:
    rb: ReorderBuffer[str] = ReorderBuffer(next_seq=TOP - 1)
    assert rb.push(TOP - 1, "last", 1) == ["last"]
    assert rb.next_seq == 0
    rb2: ReorderBuffer[str] = ReorderBuffer(next_seq=TOP + 5)
    assert rb2.next_seq == 5


def test_seq_distance() -> None:
    assert seq_distance(5, 3) == 2
    assert seq_distance(1, TOP - 2) == 3
    assert seq_distance(TOP - 2, 1) == TOP - 3  # behind
    rb: ReorderBuffer[str] = ReorderBuffer(next_seq=1)
    assert rb.is_behind(0)
    assert rb.is_behind(TOP - 1)
    assert not rb.is_behind(1)
    assert not rb.is_behind(2)


def test_take_held_in_sequence_order_across_wrap() -> None:
    budget = HeldBudget()
    rb: ReorderBuffer[str] = ReorderBuffer(next_seq=TOP - 2, budget=budget)
    for seq in (3, TOP - 1, 0, 7, 1):
        rb.push(seq, f"m{seq}", 10)
    assert rb.take_held() == [(TOP - 1, f"m{TOP - 1}"), (0, "m0"), (1, "m1"), (3, "m3"), (7, "m7")]
    assert len(rb) == 0
    assert rb.held_bytes == 0
    assert budget.held == 0
    assert rb.next_seq == TOP - 2  # taking does not deliver
    assert rb.take_held() == []


# -- property tests ----------------------------------------------------------


@settings(max_examples=300)
@given(st.data())
def test_any_permutation_delivers_everything_once_in_order(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 60))
    start = data.draw(st.one_of(st.just(0), st.just(TOP - 30), st.integers(0, TOP - 1)))
    order = data.draw(st.permutations(range(n)))
    budget = HeldBudget()
    rb: ReorderBuffer[int] = ReorderBuffer(next_seq=start, budget=budget)
    delivered: list[int] = []
    for i in order:
        delivered.extend(rb.push((start + i) % TOP, i, 10))
    assert delivered == list(range(n))
    assert len(rb) == 0
    assert rb.held_bytes == 0
    assert budget.held == 0
    assert rb.next_seq == (start + n) % TOP


@settings(max_examples=200)
@given(st.data())
def test_duplicates_anywhere_are_refused_and_change_nothing(data: st.DataObject) -> None:
    n = data.draw(st.integers(2, 30))
    order = data.draw(st.permutations(range(n)))
    cut = data.draw(st.integers(1, n))
    rb: ReorderBuffer[int] = ReorderBuffer(next_seq=TOP - 10)
    delivered: list[int] = []
    for i in order[:cut]:
        delivered.extend(rb.push((TOP - 10 + i) % TOP, i, 1))
    dup = data.draw(st.sampled_from(order[:cut]))
    before = (rb.next_seq, len(rb), rb.held_bytes)
    with pytest.raises(DuplicateSeq):
        rb.push((TOP - 10 + dup) % TOP, -1, 1)
    assert (rb.next_seq, len(rb), rb.held_bytes) == before
    for i in order[cut:]:
        delivered.extend(rb.push((TOP - 10 + i) % TOP, i, 1))
    assert delivered == list(range(n))
