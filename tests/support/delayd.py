"""The delay half of the emulated WAN link: hold every packet of one NFQUEUE
for a fixed time, then accept it, in arrival order.

This kernel has no netem, so :mod:`tests.support.wan` sends a link's incoming
packets to an NFQUEUE (one per link end, inside that end's namespace) and runs
this program there::

    python -m tests.support.delayd --queue 7 --delay-ms 20

It owns one FIFO (:class:`DelayLine`): a packet is due ``delay`` after it
arrived and is accepted once due. The arrival time is the kernel's receive
stamp, which NFQUEUE passes on (the daemon turns stamping on with
``SO_TIMESTAMP`` on an unused socket: a machine-wide switch, which any
``ping`` also flips, costing a clock read per received packet), so the time a packet waited for the
daemon to read it is part of its delay, not added to it: about 100 us when
the daemon was asleep, milliseconds when it is busy. A packet without a
usable stamp is stamped when read. Due times never decrease, and releasing
from the head of the FIFO keeps the order of arrival: the link never
reorders. One thread does everything: ``select`` on the queue's netlink
socket with a timeout that ends at the next due time (aimed early by the
learnt oversleep, the rest spun), and the packet callback itself releases
what is due, so a long burst of arrivals does not hold back releases.
Verdicts in arrival order are also what the kernel finds cheapest: it looks
a verdict's packet up from the head of its list.

Packets are copied as metadata only (``COPY_META``): the payload never
crosses into user space. The kernel queue holds up to ``--max-queue`` packets
(beyond that the kernel drops, as a full router buffer would); the default is
far above what a test link holds (at 430 Mbit/s, 20 ms is about 720 full-size
packets).

It prints one line, ``delayd ready queue=N delay_ms=D``, once bound, and on
SIGTERM or SIGINT it accepts whatever it still holds (the caller removes the
iptables rule first, so nothing new arrives), unbinds, prints
``delayd stats packets=... max_held=... late_mean_us=... late_p50_us=...
late_p99_us=... late_max_us=... kernel_stamped=... read_age_mean_us=...
read_age_max_us=...`` (lateness: how long after its due time a packet was
accepted; read age: how long after its arrival the daemon read it) and
exits 0.

Its capacity is one Python thread's: on a 2-core VM about 500 Mbit/s of
full-size packets at 20 ms each way, and near that the backlog in front of
it makes packets late by milliseconds; below about 200 Mbit/s releases are
typically within tens of microseconds of their due time.

If it dies, packets in its queue are no longer accepted: the rule has no
``--queue-bypass``, so the link stops carrying traffic instead of silently
losing its delay.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import select
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["DelayLine", "Oversleep", "WallClock", "main", "serve"]

#: The netlink socket's receive buffer. Messages are metadata only (a few
#: hundred bytes of truesize each), so this holds tens of thousands of
#: arrivals the daemon has not read yet.
SOCKET_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_QUEUE = 16384

_PR_SET_TIMERSLACK = 29
# Python 3.11's socket module lacks it (asm-generic value, x86 and arm alike).
_SO_TIMESTAMP = getattr(socket, "SO_TIMESTAMP", 29)
# A kernel stamp older than this (or in the future) is not an arrival time
# (a clock step, or a departure time a sender set): use our own clock.
_MAX_AGE = 1.0
_WALL_REFRESH = 1.0
_PER_BUCKET = 100_000  # 10 us buckets
_BUCKETS = 1000  # up to 10 ms


class Held(Protocol):
    """What the line holds: anything that can be let through (a netfilterqueue Packet)."""

    def accept(self) -> None: ...


class DelayLine:
    """Packets in arrival order, each due ``delay`` seconds after it arrived.

    No I/O and no clock of its own: callers pass ``now`` (monotonic seconds),
    so tests drive it with made-up times.
    """

    def __init__(self, delay: float) -> None:
        if delay < 0:
            raise ValueError(f"delay must be >= 0, not {delay}")
        self.delay = delay
        self._held: deque[tuple[float, Held]] = deque()
        self._last_due = float("-inf")
        #: Packets taken in so far.
        self.packets = 0
        #: The most packets held at once.
        self.max_held = 0
        #: Packets accepted on time or late (not those flushed by :meth:`release_all`).
        self.released = 0
        #: Sum and maximum of (release time - due time), in seconds.
        self.late_total = 0.0
        self.late_max = 0.0
        #: Lateness histogram: bucket i counts releases i*10 us to (i+1)*10 us late;
        #: the last bucket takes everything later.
        self.late_buckets = [0] * _BUCKETS

    def __len__(self) -> int:
        return len(self._held)

    def push(self, arrived: float, packet: Held) -> None:
        """Take in ``packet``, which arrived at ``arrived``.

        A packet is never due before the one ahead of it: arrival stamps come
        from the kernel or, failing that, from the daemon's own clock, and a
        packet stamped late (by the daemon) must not let the next one (stamped
        by the kernel) overtake it.
        """
        due = arrived + self.delay
        if due < self._last_due:
            due = self._last_due
        self._last_due = due
        self._held.append((due, packet))
        self.packets += 1
        if len(self._held) > self.max_held:
            self.max_held = len(self._held)

    def release_due(self, now: float) -> int:
        """Accept every packet due at ``now``, oldest first; return how many."""
        held = self._held
        n = 0
        while held and held[0][0] <= now:
            due, packet = held.popleft()
            packet.accept()
            late = now - due
            self.late_total += late
            if late > self.late_max:
                self.late_max = late
            self.late_buckets[min(int(late * _PER_BUCKET), _BUCKETS - 1)] += 1
            n += 1
        self.released += n
        return n

    def next_due(self) -> float | None:
        """When the oldest held packet is due, or None if none is held."""
        return self._held[0][0] if self._held else None

    def release_all(self) -> int:
        """Accept everything still held, due or not (shutting down)."""
        n = len(self._held)
        while self._held:
            self._held.popleft()[1].accept()
        return n

    def late_quantile(self, q: float) -> float:
        """The lateness (seconds, to the 10 us bucket's upper edge) that a fraction ``q`` of releases stayed within."""
        target = q * self.released
        seen = 0
        for i, count in enumerate(self.late_buckets):
            seen += count
            if count and seen >= target:
                return (i + 1) / _PER_BUCKET
        return 0.0

    def stats(self) -> str:
        mean = self.late_total / self.released if self.released else 0.0
        return (
            f"packets={self.packets} max_held={self.max_held} "
            f"late_mean_us={mean * 1e6:.1f} late_p50_us={self.late_quantile(0.5) * 1e6:.0f} "
            f"late_p99_us={self.late_quantile(0.99) * 1e6:.0f} late_max_us={self.late_max * 1e6:.1f}"
        )


class Oversleep:
    """How late a timed sleep wakes up here, learnt as the daemon runs.

    On this kind of machine (a VM) a 5 ms sleep typically ends 100-150 us
    late, which would add that much to every delay. The loop aims its sleeps
    :attr:`margin` early and spins the rest, so releases land within a few
    us of their due time while the spinning costs only about the error of
    the estimate per sleep.
    """

    def __init__(self, initial: float = 100e-6, ceiling: float = 1e-3) -> None:
        self.margin = initial
        self.ceiling = ceiling

    def observe(self, late: float) -> None:
        """A sleep meant to end at t ended at t + ``late``."""
        late = min(max(late, 0.0), self.ceiling)
        self.margin += (late - self.margin) / 16


class WallClock:
    """Converts the kernel's wall-clock packet stamps to the monotonic clock.

    The offset between the two clocks is read as ``wall, monotonic, wall``
    several times, keeping the tightest triple: a preemption between two
    reads (hundreds of microseconds on this VM) would otherwise shift every
    stamp by that much, and a packet stamped with an arrival too early leaves
    too early. Refreshed every second of traffic, so a slewing wall clock
    stays within microseconds, and a stepped one within a second.
    """

    def __init__(
        self, wall: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic, tries: int = 8
    ) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._tries = tries
        self.offset = 0.0
        #: The monotonic time of the last :meth:`refresh`.
        self.refreshed = 0.0
        #: The spread (wall after - wall before) of the triple the offset came from.
        self.spread = 0.0
        self.refresh()

    def refresh(self) -> None:
        best_spread, best_offset, at = float("inf"), 0.0, 0.0
        for _ in range(self._tries):
            before = self._wall()
            mono = self._monotonic()
            after = self._wall()
            if after - before < best_spread:
                best_spread, best_offset, at = after - before, (before + after) / 2 - mono, mono
        self.offset, self.spread, self.refreshed = best_offset, best_spread, at

    def to_monotonic(self, wall_time: float) -> float:
        return wall_time - self.offset


def _tighten_timer_slack() -> None:
    # Linux lets a sleep overrun by the thread's timer slack (50 us by
    # default) to batch wake-ups; the release times want less.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl: Callable[..., int] = libc.prctl
        prctl(_PR_SET_TIMERSLACK, ctypes.c_ulong(1), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def serve(
    queue_num: int, delay: float, max_queue: int = DEFAULT_MAX_QUEUE, out: Callable[[str], None] = print
) -> DelayLine:
    """Bind ``queue_num`` and delay its packets until SIGTERM or SIGINT."""
    # Imported here so `--help` and the DelayLine work without the C library.
    from netfilterqueue import COPY_META, NetfilterQueue, Packet

    line = DelayLine(delay)
    clock = time.monotonic
    wall = WallClock()
    # ages[0]: packets with a usable kernel stamp; [1]: their summed age
    # (kernel arrival to our read), [2]: the largest.
    ages = [0, 0.0, 0.0]

    def on_packet(packet: Packet) -> None:
        now = clock()
        arrived = now
        stamp = packet.get_timestamp()
        if stamp:
            # The stamp is truncated to the microsecond: one more keeps the
            # delay from ever being short.
            age = now - wall.to_monotonic(stamp + 1e-6)
            if 0.0 <= age < _MAX_AGE:
                arrived = now - age
                ages[0] += 1
                ages[1] += age
                if age > ages[2]:
                    ages[2] = age
        line.push(arrived, packet)
        line.release_due(now)

    # Ask the kernel to stamp packets as they arrive (the socket itself is
    # never used): NFQUEUE passes the stamp on, so each delay runs from the
    # packet's arrival, not from when this process got round to reading it
    # (100 us later when idle, milliseconds later under load).
    stamper = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stamper.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMP, 1)

    stop: list[int] = []
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))

    _tighten_timer_slack()
    oversleep = Oversleep()
    nfq = NetfilterQueue()
    nfq.bind(queue_num, on_packet, max_len=max_queue, mode=COPY_META, sock_len=SOCKET_BYTES)
    fd = nfq.get_fd()
    waits = [fd, wake_r]
    out(f"delayd ready queue={queue_num} delay_ms={delay * 1000:g}")
    try:
        while not stop:
            due = line.next_due()
            if due is None:
                readable, _, _ = select.select(waits, [], [], None)
            else:
                wake_at = due - oversleep.margin
                timeout = wake_at - clock()
                if timeout > 0:
                    readable, _, _ = select.select(waits, [], [], timeout)
                    if not readable:
                        oversleep.observe(clock() - wake_at)
                else:
                    # Closer to the due time than a sleep can aim: spin,
                    # still taking arrivals so their stamps stay true.
                    readable, _, _ = select.select(waits, [], [], 0)
            if fd in readable:
                if clock() - wall.refreshed > _WALL_REFRESH:
                    wall.refresh()
                nfq.run(block=False)
            line.release_due(clock())
    finally:
        line.release_all()
        nfq.unbind()
        stamper.close()
        signal.set_wakeup_fd(-1)
        os.close(wake_r)
        os.close(wake_w)
    mean_age = ages[1] / ages[0] if ages[0] else 0.0
    out(
        f"delayd stats {line.stats()} kernel_stamped={ages[0]} "
        f"read_age_mean_us={mean_age * 1e6:.1f} read_age_max_us={ages[2] * 1e6:.1f}"
    )
    return line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.support.delayd",
        description="Hold each packet of an NFQUEUE for a fixed time, then accept it, in arrival order.",
    )
    parser.add_argument("--queue", type=int, required=True, help="the NFQUEUE number (iptables --queue-num)")
    parser.add_argument("--delay-ms", type=float, required=True, help="how long to hold each packet, in ms")
    parser.add_argument(
        "--max-queue",
        type=int,
        default=DEFAULT_MAX_QUEUE,
        help=f"packets the kernel may hold for us before it drops (default {DEFAULT_MAX_QUEUE})",
    )
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error("--delay-ms must be >= 0")
    if not 0 <= args.queue <= 65535:
        parser.error("--queue must be 0..65535")
    serve(args.queue, args.delay_ms / 1000, args.max_queue, out=lambda s: print(s, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
