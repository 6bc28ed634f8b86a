"""Bounding the pipe pause that full socket queues cause (v1 has no window).

When the queues of sockets that do not take their bytes reach the ceilings,
the session stops reading every pipe: every connection waits, and while the
pipes are not read the peer cannot even tell us it gave up on the connection
at fault. :class:`StallWatch` runs while the pipes are paused and, every
``stall_timeout`` seconds, resets each connection whose socket took none of
its queue in that period (FIN 0x99 both ways: the life cycle's STALLED). The
queues shrink, reading resumes, and the pause never outlives its cause.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from tm3.core.lifecycle import Event
from tm3.mux.connection import Connection

if TYPE_CHECKING:
    from tm3.mux.session import Session


class StallWatch:
    log = Logger()

    def __init__(self, session: Session) -> None:
        self.session = session
        self._call: IDelayedCall | None = None
        self._progress: dict[Connection, int] = {}  # bytes written, at the last check

    def start(self) -> None:
        """The pipes were paused: check in ``stall_timeout`` seconds."""
        if self._call is None:
            self._progress = self._queued_progress()
            self._call = self.session.reactor.callLater(self.session.settings.stall_timeout, self._check)

    def stop(self) -> None:
        """The pipes resumed (or the session ended)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._progress = {}

    def _queued_progress(self) -> dict[Connection, int]:
        session = self.session
        return {conn: conn.bytes_in for conn in session.live | session.sockets if conn.queued}

    def _check(self) -> None:
        self._call = None
        session = self.session
        if session.ended or not session.pipes.reading_paused:
            return
        before = self._progress
        for conn, written in self._queued_progress().items():
            if before.get(conn) != written:
                continue  # it took something, or is new: give it a whole period
            session.stats.stalled_resets += 1
            self.log.warn(
                "{session}: conn {conn_id} to {host}:{port}: its socket took none of its {queued} queued bytes"
                " in {seconds:g} s while the queues kept every pipe paused; resetting it",
                session=session.name,
                conn_id=conn.conn_id,
                host=conn.host,
                port=conn.port,
                queued=conn.queued,
                seconds=session.settings.stall_timeout,
            )
            session.event(conn, Event.STALLED)
            if session.ended:
                return
        if session.pipes.reading_paused:
            self.start()
