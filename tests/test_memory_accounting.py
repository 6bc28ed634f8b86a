"""What the bounds count is what memory really costs: a flood of tiny
messages (held for a gap, held as orphans, queued for a slow socket) is
charged at least what it allocates (tracemalloc), so the documented limits
hold in memory and not only in payload bytes."""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable

import pytest

from tests.support.rp_harness import RP
from tm3.core.reorder import HeldBudget, ReorderBuffer
from tm3.core.wire import Data, Decoder, encode_data, encode_syn

N = 20_000


def allocated(action: Callable[[], object]) -> tuple[int, object]:
    """Bytes still allocated after ``action`` (its result kept alive)."""
    gc.collect()
    tracemalloc.start()
    try:
        result = action()
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return current, result


@pytest.mark.parametrize("payload", [0, 1, 100, 4096])
def test_held_messages_are_charged_what_they_cost(payload: int) -> None:
    stream = b"".join(encode_data(1, seq, b"x" * payload) for seq in range(1, N + 1))

    def hold() -> ReorderBuffer[Data]:
        rb: ReorderBuffer[Data] = ReorderBuffer(0, 1 << 40, HeldBudget(1 << 40))
        for m in Decoder().feed(stream):
            assert type(m) is Data
            rb.push(m.seq, m, 8 + len(m.payload))
        return rb

    cost, rb = allocated(hold)
    assert isinstance(rb, ReorderBuffer)
    assert rb.held_bytes >= cost, f"charged {rb.held_bytes / N:.0f} B a message, it costs {cost / N:.0f}"


@pytest.mark.parametrize("payload", [0, 1, 100])
def test_orphans_are_charged_what_they_cost(payload: int) -> None:
    rp = RP(n=1, orphan_id_limit=1 << 40, orphan_total_limit=1 << 40)
    session = rp.up()
    ids = 50
    stream = b"".join(encode_data(cid, seq, b"x" * payload) for seq in range(1, N // ids + 1) for cid in range(ids))
    cost, _ = allocated(lambda: rp.send_raw(stream))
    total = session.role.orphans.total  # type: ignore[attr-defined]
    assert total >= cost, f"charged {total}, it costs {cost}"


@pytest.mark.parametrize("payload", [1, 100, 4096])
def test_queued_chunks_are_charged_what_they_cost(payload: int) -> None:
    rp = RP(n=1, conn_queue_limit=1 << 40, total_queue_limit=1 << 40)
    session = rp.up()
    rp.send_raw(encode_syn(3, "93.184.216.34", 443))
    _, server = rp.accept()
    server.producer.pauseProducing()
    stream = b"".join(encode_data(3, seq, b"x" * payload) for seq in range(1, N + 1))
    cost, _ = allocated(lambda: rp.send_raw(stream))
    queued = session.inbound.queued_total
    assert queued >= cost, f"charged {queued / N:.0f} B a chunk, it costs {cost / N:.0f}"
