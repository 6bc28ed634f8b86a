"""Scheduling decisions, pure (no I/O): which connection sends next, and
which pipe takes a batch.

Messages are bound to a pipe late (tm3/mux/outbound.py): they wait in user
space until a pipe can really send, so two questions come up each time a
pipe has room.

**Which connection.** :class:`LeastServedFirst` serves the connection that
has sent the fewest bytes so far (least attained service: the first bytes
of a new object go before the middle of a bulk transfer; a SYN or a FIN
goes first of all, key ``CONTROL_FIRST``). One pick in ``share`` goes to the
connection that has waited longest instead, so bulk flows still progress
while small ones keep arriving.

**Which pipe.** With ``round robin`` the pipes that can take a batch are
tried in rotation. With ``delivery time`` they are ranked by when a byte
handed to them now is expected to reach the peer, estimated from the
kernel's ``TCP_INFO`` (:func:`expected_delivery`): half the smoothed RTT,
plus the time to send what is queued ahead of it beyond the congestion
window, plus a penalty while the pipe is repairing a loss (new data on such
a pipe waits in the peer's out-of-order queue for the retransmission).
"""

from __future__ import annotations

import heapq
import struct
from collections import deque
from collections.abc import Hashable
from typing import Generic, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)

# The key that puts a connection ahead of every one that has data: its next
# message is a SYN or a FIN.
CONTROL_FIRST = -1
DEFAULT_SHARE = 8  # one pick in 8 serves the longest-waiting connection


class LeastServedFirst(Generic[K]):
    """Connections with data waiting, picked by least attained service, with
    one pick in ``share`` for the one that has waited longest.

    ``push(key, served)`` enters a connection that has data waiting and is
    not waiting already; ``pop()`` takes the next one out (the caller pushes
    it again, with its new ``served``, if data is left). ``discard`` takes a
    connection out early. Entries left behind in the other structure are
    skipped lazily, and compacted once they outnumber the live ones.
    """

    __slots__ = ("share", "_heap", "_fifo", "_live", "_order", "_turn")

    def __init__(self, share: int = DEFAULT_SHARE) -> None:
        if share < 1:
            raise ValueError("share must be at least 1")
        self.share = share
        self._heap: list[tuple[int, int, K]] = []
        self._fifo: deque[tuple[int, K]] = deque()
        self._live: dict[K, int] = {}  # waiting connection -> the order of its entries
        self._order = 0
        self._turn = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def push(self, key: K, served: int) -> None:
        order = self._order = self._order + 1
        self._live[key] = order
        heapq.heappush(self._heap, (served, order, key))
        self._fifo.append((order, key))
        if max(len(self._fifo), len(self._heap)) > 2 * len(self._live) + 64:
            self._compact()

    def pop(self) -> K | None:
        live = self._live
        if not live:
            return None
        self._turn += 1
        if self._turn >= self.share:
            self._turn = 0
            fifo = self._fifo
            while fifo:
                order, key = fifo.popleft()
                if live.get(key) == order:
                    del live[key]
                    return key
        heap = self._heap
        while heap:
            _, order, key = heapq.heappop(heap)
            if live.get(key) == order:
                del live[key]
                return key
        raise AssertionError("a waiting connection has no entry")  # pragma: no cover

    def discard(self, key: K) -> None:
        self._live.pop(key, None)
        if not self._live:
            self._heap.clear()
            self._fifo.clear()

    def _compact(self) -> None:
        live = self._live
        self._heap = [e for e in self._heap if live.get(e[2]) == e[1]]
        heapq.heapify(self._heap)
        self._fifo = deque(e for e in self._fifo if live.get(e[1]) == e[0])


# -- the pipes: TCP_INFO and the expected delivery time --------------------------------

# struct tcp_info (include/uapi/linux/tcp.h) up to tcpi_min_rtt: 8 u8 fields,
# 24 u32 fields, 4 u64 fields, then 4 u32 fields (segs_out, segs_in,
# notsent_bytes, min_rtt).
_TCP_INFO = struct.Struct("=8B24I4Q4I")
TCP_INFO_SIZE = _TCP_INFO.size  # 152

# tcpi_ca_state values (include/uapi/linux/tcp.h).
CA_OPEN, CA_DISORDER, CA_CWR, CA_RECOVERY, CA_LOSS = range(5)


class TcpInfo(NamedTuple):
    """The fields of the kernel's ``TCP_INFO`` the scheduler reads (times in
    seconds, sizes in bytes unless named in segments)."""

    ca_state: int
    rto: float
    mss: int
    unacked: int  # segments sent and not yet acknowledged
    lost: int  # segments the kernel thinks are lost
    retrans: int  # segments retransmitted and not yet acknowledged
    rtt: float  # smoothed RTT
    cwnd: int  # congestion window, segments
    notsent: int  # bytes in the send buffer not yet sent
    min_rtt: float

    @classmethod
    def parse(cls, raw: bytes) -> TcpInfo | None:
        """From ``getsockopt(IPPROTO_TCP, TCP_INFO, TCP_INFO_SIZE)``; None if short."""
        if len(raw) < TCP_INFO_SIZE:
            return None
        f = _TCP_INFO.unpack_from(raw)
        # u8: state, ca_state, retransmits, probes, backoff, options, wscale, flags
        # u32 (from f[8]): rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans,
        # fackets, last_data_sent, last_ack_sent, last_data_recv, last_ack_recv, pmtu,
        # rcv_ssthresh, rtt, rttvar, snd_ssthresh, snd_cwnd, advmss, reordering,
        # rcv_rtt, rcv_space, total_retrans; u64 (f[32..35]); u32: segs_out, segs_in,
        # notsent_bytes, min_rtt.
        return cls(
            ca_state=f[1],
            rto=f[8] / 1e6,
            mss=f[10] or 1448,
            unacked=f[12],
            lost=f[14],
            retrans=f[15],
            rtt=f[23] / 1e6,
            cwnd=f[26],
            notsent=f[38],
            min_rtt=f[39] / 1e6 if f[39] != 0xFFFFFFFF else 0.0,
        )


def expected_delivery(info: TcpInfo, nbytes: int) -> float:
    """Seconds until ``nbytes`` handed to this pipe now are expected to
    reach the peer's application.

    Half an RTT for the trip; plus, when what is queued ahead (unacknowledged
    segments and unsent bytes) and these bytes do not fit in the congestion
    window, one RTT per window's worth beyond it; plus, while the pipe is
    repairing a loss, one RTT (the peer holds new data until the repair
    arrives), or the RTO once the kernel has fallen back to it."""
    rtt = info.rtt or 0.001
    mss = info.mss
    cwnd = max(info.cwnd, 1)
    segments = info.unacked + (info.notsent + nbytes + mss - 1) // mss
    t = rtt / 2
    if segments > cwnd:
        t += rtt * (segments - cwnd) / cwnd
    if info.ca_state >= CA_LOSS:
        t += max(info.rto, rtt)
    elif info.ca_state >= CA_RECOVERY or info.lost or info.retrans:
        t += rtt
    return t
