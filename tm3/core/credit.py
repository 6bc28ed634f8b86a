"""Per-connection flow control, version 2 (docs/protocol.md, "Flow control"):
pure, no I/O.

Each direction of each connection has a window: the sender may have sent at
most as many payload bytes as the receiver has granted (the peer's initial
window, from the handshake, plus every CREDIT since). The receiver grants more
as its socket takes bytes, so a socket that reads slowly holds up only its own
connection: its sender stops reading *that* socket, and every other
connection goes on.

A fixed small window caps a single connection at window / RTT (yamux's
256 KiB gave 24-28 Mbit/s at 50 ms), so windows autotune the way QUIC
stacks do: a receiver that must grant again less than two round trips after
its last grant doubles the window (the window, not the socket, is what holds
the sender back), up to a per-connection maximum and while the session's
budget for growth lasts. A socket that reads slowly is granted at the pace it
reads, so its window never grows.
"""

from __future__ import annotations

from collections.abc import Callable

KiB = 1024
MiB = 1024 * KiB
DEFAULT_INITIAL_WINDOW = 256 * KiB
DEFAULT_MAX_WINDOW = 16 * MiB
DEFAULT_SESSION_WINDOW = 64 * MiB
# A round trip shorter than this is not believed (loopback's kernel RTT is
# microseconds; Python's own turn-around is the real one).
MIN_RTT = 0.005


class WindowExceeded(Exception):
    pass


class WindowBudget:
    """How far all of one session's receive windows may grow past their
    initial sizes, together (the per-session ceiling)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> int:
        """Up to ``n`` bytes of growth; returns how many were granted."""
        n = max(0, min(n, self.limit - self.used))
        self.used += n
        return n

    def give(self, n: int) -> None:
        self.used -= n


class ReceiveWindow:
    """The receiving side of one connection, one direction."""

    __slots__ = ("initial", "maximum", "window", "granted", "received", "consumed", "_next", "_last", "_budget", "_clock", "_rtt")  # fmt: skip

    def __init__(
        self,
        initial: int,
        maximum: int,
        budget: WindowBudget,
        clock: Callable[[], float],
        rtt: Callable[[], float],
    ) -> None:
        self.initial = initial
        self.maximum = max(maximum, initial)
        self.window = initial
        self.granted = initial  # payload bytes the peer may send in all, so far
        self.received = 0
        self.consumed = 0  # taken by the socket
        self._next = initial - initial // 2  # grant again once consumed reaches this
        self._last = -1.0  # when we last granted
        self._budget = budget
        self._clock = clock
        self._rtt = rtt

    def receive(self, n: int) -> None:
        """``n`` payload bytes arrived; raises :class:`WindowExceeded` past
        what was granted."""
        self.received += n
        if self.received > self.granted:
            raise WindowExceeded(f"{self.received - self.granted} bytes past the {self.granted} granted")

    def consume(self, n: int) -> int:
        """The socket took ``n`` bytes; returns the CREDIT to send (0: none yet)."""
        self.consumed += n
        if self.consumed < self._next:
            return 0
        now = self._clock()
        if self._last >= 0 and now - self._last < 2 * max(self._rtt(), MIN_RTT) and self.window < self.maximum:
            self.window += self._budget.take(min(self.window, self.maximum - self.window))
        self._last = now
        increment = self.consumed + self.window - self.granted
        self.granted += increment
        # Grant again when half the window is used: the grant's round trip is
        # covered by the other half.
        self._next = self.consumed + self.window // 2
        return increment

    def release(self) -> None:
        """The connection is over: its growth goes back to the session."""
        self._budget.give(self.window - self.initial)
        self.window = self.initial
