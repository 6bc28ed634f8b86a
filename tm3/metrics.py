"""``--metrics ENDPOINT``: the proxy's counters and live state in the
Prometheus text format, at ``/metrics``.

:class:`ProxyCollector` reads the proxy's :class:`~tm3.mux.settings.Stats`
and its live sessions when Prometheus scrapes, nothing before: the data path
pays nothing for metrics but the per-pipe byte counters. The page is made
in the reactor thread, in one go (``generate_latest``): a scrape reads a few
hundred numbers and one ``TCP_INFO`` per pipe, far less than a thread hand-off
would cost, and it sees the session state as one consistent moment.
(``prometheus_client.twisted.MetricsResource`` collects in a thread pool,
where reading the sessions would race the reactor.)

Every name starts with ``tm3_``; every sample has the label ``role`` (``rp``
or ``lp``); the per-pipe ones also ``session`` and ``pipe``.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from twisted.internet import endpoints
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tm3.cli import cannot_start, os_reason
from tm3.core.schedule import TCP_INFO_SIZE, TcpInfo
from tm3.listening import ListeningService
from tm3.mux.session import Session
from tm3.mux.settings import Stats

# struct tcp_info: tcpi_total_retrans (u32) after 8 u8 fields and 23 u32 ones.
_TOTAL_RETRANS = struct.Struct("=I")
_TOTAL_RETRANS_OFFSET = 8 + 23 * 4

# Counters of Stats exposed as they are: (attribute, metric name, help).
STATS_COUNTERS = [
    ("connections_opened", "tm3_connections_opened_total", "Connections opened (SYN sent or received)."),
    ("connect_failures", "tm3_connect_failures_total", "RP: connects to servers that failed."),
    ("destinations_denied", "tm3_destinations_denied_total", "RP: SYNs refused by the destination policy."),
    (
        "connections_refused",
        "tm3_connections_refused_total",
        "Connections refused past --max-connections, or (RP) at the fd ceiling.",
    ),
    ("fd_limit_pauses", "tm3_fd_limit_pauses_total", "LP: times it stopped accepting clients at the fd ceiling."),
    ("resolve_failures", "tm3_resolve_failures_total", "LP: SOCKS names that did not resolve (besides timeouts)."),
    ("resolve_timeouts", "tm3_resolve_timeouts_total", "LP: SOCKS names with no answer in --resolve-timeout."),
    ("protocol_errors", "tm3_protocol_errors_total", "Sessions ended by a protocol error."),
    ("upload_pauses", "tm3_upload_pauses_total", "v1: times the socket queues paused all pipes."),
    ("download_pauses", "tm3_download_pauses_total", "Times sockets were paused because the pipes' queue was full."),
    ("credit_stalls", "tm3_credit_stalls_total", "v2: times a socket paused because its window was used up."),
    ("stalled_resets", "tm3_stalled_resets_total", "Connections reset by --stall-timeout."),
    ("credits_sent", "tm3_credits_sent_total", "v2: CREDIT messages sent."),
    ("tails_dropped", "tm3_tail_messages_dropped_total", "Messages for connections that were over, dropped."),
    ("tail_bytes_dropped", "tm3_tail_bytes_dropped_total", "Payload bytes dropped with connections that were over."),
    ("live_id_reuses", "tm3_live_id_reuses_total", "RP: ids reused while their connection was not over."),
]


class ProxyCollector(Collector):
    """The metrics of one proxy, read at scrape time from ``stats`` and
    ``sessions()`` (the live sessions)."""

    def __init__(self, role: str, stats: Stats, sessions: Callable[[], Iterable[Session]]) -> None:
        self.role = role
        self.stats = stats
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        role, stats = self.role, self.stats
        sessions = list(self.sessions())

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["role"])
            g.add_metric([role], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["role"])
            c.add_metric([role], value)
            return c

        yield gauge("tm3_sessions_up", "Sessions up now.", len(sessions))
        yield counter("tm3_sessions_total", "Sessions started.", stats.sessions)
        yield counter("tm3_sessions_ended_total", "Sessions ended.", stats.sessions_ended)
        pipes = [(s, i, p) for s in sessions for i, p in enumerate(s.pipes.pipes)]
        yield gauge(
            "tm3_pipes_up", "Pipes of live sessions that are connected.", sum(p.connected_ for _, _, p in pipes)
        )
        yield gauge(
            "tm3_connections_open",
            "Connections opened and not yet over.",
            stats.connections_opened - stats.connections_closed,
        )
        closed = CounterMetricFamily(
            "tm3_connections_closed_total", "Connections over, by how.", labels=["role", "how"]
        )
        for how, n in sorted(stats.ended_by.items()):
            closed.add_metric([role, how], n)
        yield closed

        def both_ways(name: str, doc: str, to_pipes: float, from_pipes: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["role", "direction"])
            c.add_metric([role, "to_pipes"], to_pipes)
            c.add_metric([role, "from_pipes"], from_pipes)
            return c

        yield both_ways(
            "tm3_payload_bytes_total",
            "Payload bytes: read from sockets for the pipes (to_pipes), written to sockets from them (from_pipes).",
            stats.bytes_to_pipes,
            stats.bytes_from_pipes,
        )
        yield both_ways(
            "tm3_messages_total",
            "Messages sent on (to_pipes) and received from the pipes.",
            stats.messages_sent,
            stats.messages_received,
        )
        for attr, name, doc in STATS_COUNTERS:
            yield counter(name, doc, getattr(stats, attr))
        yield gauge(
            "tm3_reorder_held_bytes",
            "Bytes held for sequence gaps (wire size plus overhead).",
            sum(s.inbound.held_budget.held for s in sessions),
        )
        yield gauge(
            "tm3_inbound_queued_bytes",
            "Bytes from the pipes queued for sockets that have not taken them.",
            sum(s.inbound.queued_total for s in sessions),
        )
        yield gauge(
            "tm3_outbound_queued_bytes",
            "Bytes from sockets waiting in user space for a pipe that can send (late binding).",
            sum(s.outbound.queued for s in sessions),
        )
        yield from self._pipes(pipes)

    def _pipes(self, pipes: list[tuple[Session, int, Any]]) -> Iterator[Metric]:
        labels = ["role", "session", "pipe"]

        def family(kind: type, name: str, doc: str) -> Any:
            return kind(name, doc, labels=labels)

        sent = family(CounterMetricFamily, "tm3_pipe_sent_bytes", "Bytes written to the pipe (messages, framed).")
        received = family(CounterMetricFamily, "tm3_pipe_received_bytes", "Bytes read from the pipe.")
        blocked = family(GaugeMetricFamily, "tm3_pipe_blocked", "1 while the pipe's write gate is closed.")
        rtt = family(GaugeMetricFamily, "tm3_pipe_rtt_seconds", "The kernel's smoothed RTT (TCP_INFO).")
        cwnd = family(GaugeMetricFamily, "tm3_pipe_cwnd_segments", "Congestion window (TCP_INFO).")
        lost = family(GaugeMetricFamily, "tm3_pipe_lost_segments", "Segments the kernel thinks are lost now.")
        retrans = family(CounterMetricFamily, "tm3_pipe_retransmits", "Segments retransmitted (tcpi_total_retrans).")
        notsent = family(GaugeMetricFamily, "tm3_pipe_notsent_bytes", "Bytes in the send buffer not yet sent.")
        for session, index, pipe in pipes:
            values = [self.role, session.name, str(index)]  # its place in the set, as "(#index)" in the log
            sent.add_metric(values, pipe.bytes_sent)
            received.add_metric(values, pipe.bytes_received)
            blocked.add_metric(values, 1 if pipe.blocked else 0)
            info, total_retrans = _tcp_info(pipe.socket() if pipe.connected_ else None)
            if info is not None:
                rtt.add_metric(values, info.rtt)
                cwnd.add_metric(values, info.cwnd)
                lost.add_metric(values, info.lost)
                retrans.add_metric(values, total_retrans)
                notsent.add_metric(values, info.notsent)
        yield from (sent, received, blocked, rtt, cwnd, lost, retrans, notsent)


def _tcp_info(sock: socket.socket | None) -> tuple[TcpInfo | None, int]:
    if sock is None:
        return None, 0
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
    except (OSError, TypeError, AttributeError):
        return None, 0
    info = TcpInfo.parse(raw)
    total = _TOTAL_RETRANS.unpack_from(raw, _TOTAL_RETRANS_OFFSET)[0] if info is not None else 0
    return info, total


class _WithRole(Collector):
    """Another collector's metrics with our ``role`` label added."""

    def __init__(self, inner: Collector, role: str) -> None:
        self.inner = inner
        self.role = role

    def collect(self) -> Iterator[Metric]:
        for family in self.inner.collect():
            family.samples = [s._replace(labels={**s.labels, "role": self.role}) for s in family.samples]
            yield family


def registry_for(collector: ProxyCollector) -> CollectorRegistry:
    """A registry of our own (not the global one): the proxy's metrics and
    the process's (``tm3_process_*``: CPU, memory, file descriptors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    registry.register(_WithRole(ProcessCollector(namespace="tm3", registry=None), collector.role))
    return registry


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


class _QuietSite(Site):
    noisy = False

    def log(self, request: http.Request) -> None:
        """No access log: a scrape every 15 s is not news."""


def metrics_site(registry: CollectorRegistry) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsPage(registry))
    return _QuietSite(root)


class MetricsService(ListeningService):
    """Serves ``/metrics`` on a Twisted server endpoint string."""

    log = Logger()

    def __init__(self, reactor: Any, description: str, collector: ProxyCollector, prog: str) -> None:
        self.where = description
        self.prog = prog
        super().__init__(
            endpoints.serverFromString(reactor, description),
            metrics_site(registry_for(collector)),  # type: ignore[arg-type]
            "metrics",
        )

    def startService(self) -> None:
        from twisted.internet.error import CannotListenError

        try:
            super().startService()
        except CannotListenError as e:
            cannot_start(self.prog, f"cannot listen on {self.where} (--metrics): {os_reason(e.socketError)}")
