"""What a session is tuned with (:class:`Settings`) and what it counts
(:class:`Stats`). The defaults are docs/protocol.md's; every one of them is an
option of both proxies (tm3/options.py)."""

from __future__ import annotations

from attrs import define, field, frozen

from tm3.core.credit import DEFAULT_INITIAL_WINDOW, DEFAULT_MAX_WINDOW, DEFAULT_SESSION_WINDOW
from tm3.core.reorder import DEFAULT_TOTAL_WINDOW_BYTES, DEFAULT_WINDOW_BYTES
from tm3.core.schedule import DEFAULT_SHARE
from tm3.core.wire import DEFAULT_PAYLOAD
from tm3.fdlimit import DEFAULT_FD_RESERVE
from tm3.mux.pipes import DEFAULT_PIPE_LOWAT, DELIVERY_TIME

MiB = 1024 * 1024


@frozen
class Settings:
    """Tunables of a session."""

    max_payload: int = DEFAULT_PAYLOAD
    connect_timeout: float = 10.0
    conn_queue_limit: int = 4 * MiB
    total_queue_limit: int = 64 * MiB
    window_bytes: int = DEFAULT_WINDOW_BYTES
    total_window_bytes: int = DEFAULT_TOTAL_WINDOW_BYTES
    orphan_timeout: float = 10.0
    orphan_id_limit: int = 1 * MiB
    orphan_total_limit: int = 16 * MiB
    reuse_grace: float = 2.0
    stall_timeout: float = 10.0
    half_close_timeout: float = 120.0  # 0: wait for the peer's FIN for ever
    idle_timeout: float = 0.0  # 0: off
    drain_timeout: float = 10.0  # on stop: how long open connections may finish; 0: reset them at once
    max_connections: int = 16384  # per session (the RP) and per LP; 0: no limit
    fd_reserve: int = DEFAULT_FD_RESERVE  # descriptors kept free beside sockets and pipes (tm3/fdlimit.py)
    # Version 2 flow control (tm3/core/credit.py).
    initial_window: int = DEFAULT_INITIAL_WINDOW
    max_window: int = DEFAULT_MAX_WINDOW
    session_window: int = DEFAULT_SESSION_WINDOW
    # Late binding and scheduling (tm3/mux/outbound.py, tm3/core/schedule.py).
    pipe_lowat: int = DEFAULT_PIPE_LOWAT
    pipe_scheduler: str = DELIVERY_TIME
    pipe_congestion: str = ""  # TCP_CONGESTION on every pipe; "" keeps the system's default
    send_queue: int = 256 * 1024
    total_send_queue: int = 16 * MiB
    send_share: int = DEFAULT_SHARE


@frozen
class Terms:
    """What one session's two ends agreed on in the handshake: the protocol
    version and, for version 2, the window the peer gives each of our
    connections before its first CREDIT."""

    version: int = 1
    peer_window: int = 0

    @property
    def v2(self) -> bool:
        return self.version == 2


V1 = Terms()


@define
class Stats:
    """Counters over the life of a proxy (all sessions)."""

    sessions: int = 0
    sessions_ended: int = 0
    protocol_errors: int = 0
    connections_opened: int = 0
    connections_closed: int = 0
    connect_failures: int = 0
    destinations_denied: int = 0
    connections_refused: int = 0  # past --max-connections, or (RP) at the fd ceiling
    fd_limit_pauses: int = 0  # LP: times it stopped accepting clients at the fd ceiling
    resolve_failures: int = 0  # LP: SOCKS names that did not resolve (no such name, no free thread)
    resolve_timeouts: int = 0  # LP: SOCKS names with no answer in --resolve-timeout
    bytes_from_pipes: int = 0  # payload written to sockets
    bytes_to_pipes: int = 0  # payload read from sockets
    messages_received: int = 0
    messages_sent: int = 0
    tails_dropped: int = 0  # messages for connections that are over
    tail_bytes_dropped: int = 0
    live_id_reuses: int = 0
    upload_pauses: int = 0
    stalled_resets: int = 0
    download_pauses: int = 0
    credits_sent: int = 0
    credits_dropped: int = 0  # for connections that are over
    credit_stalls: int = 0  # a socket paused because its connection's window was used up
    ended_by: dict[str, int] = field(factory=dict)

    def ended(self, how: str) -> None:
        self.connections_closed += 1
        self.ended_by[how] = self.ended_by.get(how, 0) + 1
