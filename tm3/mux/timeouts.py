"""Bounds on how long a connection may wait for nothing.

- **Half-close linger** (``--half-close-timeout``, 120 s by default): once we
  have sent our FIN, the connection waits for the peer's. A peer that never
  sends one (a public RP was seen to close the server connection on the
  LP's FIN and say nothing more) would otherwise keep the connection, its
  socket and its id for good. Once the peer has sent nothing for that long
  (it may well go on sending after our FIN: a download after a request and
  a half-close), the connection is given up
  (the life cycle's ABORT, ``how`` "half-close-timeout"): the socket is
  reset, the id freed.
- **Idle** (``--idle-timeout``, off by default): a connection that moved no
  byte either way for that long is reset (FIN 0x99 to the peer). Checked by
  a sweep every half period that compares byte counters, so the data path
  pays nothing for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tm3.core.lifecycle import Event, State
from tm3.mux.connection import Connection

if TYPE_CHECKING:
    from tm3.mux.session import Session

# We sent our FIN and wait for the peer's.
LINGERING = frozenset({State.OPEN_LOCAL_DONE, State.CLOSED_LOCAL_DONE})


class Timeouts:
    log = Logger()

    def __init__(self, session: Session) -> None:
        self.session = session
        settings = session.settings
        self.half_close = settings.half_close_timeout
        self.idle = settings.idle_timeout
        self._lingering: dict[Connection, IDelayedCall] = {}
        self._moved: dict[Connection, tuple[int, float]] = {}  # bytes moved, and since when
        self._sweep: LoopingCall | None = None
        if self.idle > 0:
            self._sweep = LoopingCall(self._check_idle)
            self._sweep.clock = session.reactor
            self._sweep.start(self.idle / 2, now=False)

    # -- half-close ------------------------------------------------------------------

    def state_changed(self, conn: Connection) -> None:
        if self.half_close > 0 and conn.life.state in LINGERING and conn not in self._lingering:
            self._arm(conn)

    def _arm(self, conn: Connection) -> None:
        received = conn.bytes_in + conn.queued + conn.rx.held_bytes
        self._lingering[conn] = self.session.reactor.callLater(self.half_close, self._linger_expired, conn, received)

    def _linger_expired(self, conn: Connection, received: int) -> None:
        del self._lingering[conn]
        if conn.life.state not in LINGERING or self.session.ended:
            return
        if conn.bytes_in + conn.queued + conn.rx.held_bytes != received:
            # The peer is still sending (a download after the client's
            # request and half-close): only its silence counts.
            self._arm(conn)
            return
        self.log.info(
            "conn {conn_id} to {host}:{port}: no FIN from the peer {seconds:g} s after ours; giving it up",
            conn_id=conn.conn_id,
            host=conn.host,
            port=conn.port,
            seconds=self.half_close,
        )
        self.session.event(conn, Event.ABORT, "half-close-timeout")

    # -- idle ------------------------------------------------------------------------

    def _check_idle(self) -> None:
        session = self.session
        now = session.reactor.seconds()
        moved = self._moved
        seen: dict[Connection, tuple[int, float]] = {}
        for conn in list(session.live):
            total = conn.bytes_in + conn.bytes_out
            last = moved.get(conn)
            since = now if last is None or last[0] != total else last[1]
            if now - since >= self.idle and conn.life.state is not State.OVER:
                self.log.info(
                    "conn {conn_id} to {host}:{port}: idle for {seconds:g} s; resetting it",
                    conn_id=conn.conn_id,
                    host=conn.host,
                    port=conn.port,
                    seconds=self.idle,
                )
                session.event(conn, Event.STALLED, "idle-timeout")
                continue
            seen[conn] = (total, since)
        self._moved = seen

    # -- the end ---------------------------------------------------------------------

    def forget(self, conn: Connection) -> None:
        call = self._lingering.pop(conn, None)
        if call is not None and call.active():
            call.cancel()

    def close(self) -> None:
        for call in self._lingering.values():
            if call.active():
                call.cancel()
        self._lingering.clear()
        self._moved.clear()
        if self._sweep is not None and self._sweep.running:
            self._sweep.stop()
