"""Deterministic test bytes: :class:`Pattern`, the one byte stream every
server, client and benchmark here sends and checks (by content or by digest)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import ClassVar


class Pattern:
    """A deterministic byte stream: a pseudo-random block of prime length
    repeated, so that no two messages of a power-of-two size at different
    offsets look alike (a reordering shows in the digest)."""

    PERIOD = 1048573  # prime, just under 1 MiB

    _blocks: ClassVar[dict[int, bytes]] = {}
    _digests: ClassVar[dict[tuple[int, int], str]] = {}

    def __init__(self, seed: int = 1) -> None:
        self.seed = seed
        block = self._blocks.get(seed)
        if block is None:
            block = random.Random(seed).randbytes(self.PERIOD)
            self._blocks[seed] = block
        self._doubled = memoryview(block + block)

    def chunk(self, offset: int, size: int) -> bytes:
        assert size <= self.PERIOD
        start = offset % self.PERIOD
        return bytes(self._doubled[start : start + size])

    def chunks(self, total: int, size: int = 65536, offset: int = 0) -> Iterator[bytes]:
        end = offset + total
        while offset < end:
            n = min(size, end - offset)
            yield self.chunk(offset, n)
            offset += n

    def bytes(self, total: int, offset: int = 0) -> bytes:
        return b"".join(self.chunks(total, self.PERIOD, offset))

    def digest(self, total: int) -> str:
        key = (self.seed, total)
        found = self._digests.get(key)
        if found is None:
            h = hashlib.sha256()
            for c in self.chunks(total, self.PERIOD):
                h.update(c)
            found = self._digests[key] = h.hexdigest()
        return found
