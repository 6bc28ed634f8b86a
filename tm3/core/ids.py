"""Connection id allocation for the LP (docs/protocol.md rule 7): pure, no I/O.

Hands out the least recently freed id, and never one freed less than
``quarantine`` seconds ago, so messages still in flight for an old connection
cannot be taken for a new one. All 65536 ids start free, in order.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Callable

ID_COUNT = 1 << 16
DEFAULT_QUARANTINE = 10.0


class IdsExhausted(Exception):
    """Every id is in use or was freed too recently to reuse."""


class IdAllocator:
    __slots__ = ("_free", "_freed_at", "_in_use", "quarantine", "_now")

    def __init__(self, now: Callable[[], float], quarantine: float = DEFAULT_QUARANTINE, count: int = ID_COUNT) -> None:
        self._free: deque[int] = deque(range(count))
        self._freed_at = array("d", [float("-inf")]) * count
        self._in_use = 0
        self.quarantine = quarantine
        self._now = now

    @property
    def in_use(self) -> int:
        return self._in_use

    def allocate(self) -> int:
        free = self._free
        if not free:
            raise IdsExhausted(f"all {len(self._freed_at)} connection ids are in use")
        cid = free[0]
        wait = self._freed_at[cid] + self.quarantine - self._now()
        if wait > 0:
            raise IdsExhausted(
                f"no connection id free for {self.quarantine:g} s yet ({self._in_use} in use; next in {wait:.1f} s)"
            )
        free.popleft()
        self._in_use += 1
        return cid

    def release(self, cid: int) -> None:
        self._freed_at[cid] = self._now()
        self._free.append(cid)
        self._in_use -= 1
