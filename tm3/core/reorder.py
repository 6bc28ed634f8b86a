"""Per-connection reordering by sequence number (docs/protocol.md, "Sequence
numbers and reordering"): pure, no I/O.

Messages of one connection may arrive over any pipe in any order; a
:class:`ReorderBuffer` holds those that come early and releases them strictly
in sequence order once the gap is filled, like TCP reassembly. Sequence
numbers are compared modulo 2**32 (RFC 1982 serial-number arithmetic), so a
connection may carry more than 2**32 messages.

What is held for a gap is bounded twice: per connection by the buffer's own
byte limit, and across all connections by a shared :class:`HeldBudget`.
Exceeding either means the peer is broken (a correct peer never leaves more
than the reorder window in flight), which is a protocol error, never a pause:
pausing the pipes could hold back the very message that fills the gap.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from tm3.core.wire import SEQ_MASK

SEQ_HALF = 1 << 31

DEFAULT_WINDOW_BYTES = 64 * 1024 * 1024
DEFAULT_TOTAL_WINDOW_BYTES = 256 * 1024 * 1024
# Each held message is charged this much on top of its wire size, so that a
# flood of tiny messages is bounded by what it really costs in memory.
# Measured (tracemalloc, CPython 3.11): an empty DATA held costs 208 bytes
# (the Data tuple, its dict entry and key, the (item, cost) tuple); one with
# a payload of p bytes 241-250 + p (the dict grows in steps). Charged: 8 + p + 256.
HELD_OVERHEAD = 256

T = TypeVar("T")


class ReorderError(Exception):
    """The message cannot be accepted; the peer broke the protocol."""


class DuplicateSeq(ReorderError):
    pass


class BeyondWindow(ReorderError):
    pass


def seq_distance(seq: int, base: int) -> int:
    """How far ``seq`` is ahead of ``base`` (mod 2**32): 0..2**31-1 is ahead
    or equal, a result >= 2**31 means ``seq`` is behind ``base``."""
    return (seq - base) & SEQ_MASK


class HeldBudget:
    """Bytes held for gaps across all connections of a session."""

    __slots__ = ("limit", "held")

    def __init__(self, limit: int = DEFAULT_TOTAL_WINDOW_BYTES) -> None:
        self.limit = limit
        self.held = 0


class ReorderBuffer(Generic[T]):
    """Releases items in sequence order starting at ``next_seq``.

    ``push`` is O(1) for an in-order item, plus O(1) per held item it releases.
    """

    __slots__ = ("next_seq", "_held", "held_bytes", "window_bytes", "max_ahead", "_budget")

    def __init__(
        self,
        next_seq: int = 0,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        budget: HeldBudget | None = None,
    ) -> None:
        self.next_seq = next_seq & SEQ_MASK
        self._held: dict[int, tuple[T, int]] = {}
        self.held_bytes = 0
        self.window_bytes = window_bytes
        # A message can't be smaller than its 8-byte header, so a seq further
        # ahead than window/8 leaves a gap that no in-window sender could make.
        self.max_ahead = max(1, window_bytes // 8)
        self._budget = budget

    def __len__(self) -> int:
        return len(self._held)

    def is_behind(self, seq: int) -> bool:
        return seq_distance(seq, self.next_seq) >= SEQ_HALF

    def push(self, seq: int, item: T, size: int) -> list[T]:
        """Offer the item numbered ``seq`` (``size`` bytes on the wire);
        returns the items now deliverable, in order (often empty)."""
        distance = (seq - self.next_seq) & SEQ_MASK
        if distance == 0:
            ready = [item]
            nxt = (seq + 1) & SEQ_MASK
            held = self._held
            if held:
                while nxt in held:
                    held_item, held_size = held.pop(nxt)
                    self._release(held_size)
                    ready.append(held_item)
                    nxt = (nxt + 1) & SEQ_MASK
            self.next_seq = nxt
            return ready
        if distance >= SEQ_HALF:
            raise DuplicateSeq(f"seq {seq} was already delivered (next expected {self.next_seq})")
        if seq in self._held:
            raise DuplicateSeq(f"seq {seq} is already held")
        if distance > self.max_ahead:
            raise BeyondWindow(
                f"seq {seq} is {distance} ahead of the next expected {self.next_seq}"
                f" (reorder window {self.max_ahead} messages)"
            )
        cost = size + HELD_OVERHEAD
        if self.held_bytes + cost > self.window_bytes:
            raise BeyondWindow(
                f"holding seq {seq} would exceed the reorder window of {self.window_bytes} bytes for this connection"
            )
        budget = self._budget
        if budget is not None:
            if budget.held + cost > budget.limit:
                raise BeyondWindow(f"holding seq {seq} would exceed the total reorder window of {budget.limit} bytes")
            budget.held += cost
        self.held_bytes += cost
        self._held[seq] = (item, cost)
        return []

    def take_held(self) -> list[tuple[int, T]]:
        """Remove and return everything held, in sequence order from
        ``next_seq`` (used when a reused id hands over to the next connection)."""
        base = self.next_seq
        items = sorted(self._held.items(), key=lambda kv: (kv[0] - base) & SEQ_MASK)
        for _, (_, cost) in items:
            self._release(cost)
        self._held.clear()
        return [(seq, item) for seq, (item, _) in items]

    def clear(self) -> None:
        self.take_held()

    def _release(self, cost: int) -> None:
        self.held_bytes -= cost
        if self._budget is not None:
            self._budget.held -= cost
