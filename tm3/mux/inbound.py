"""The inbound half of a session: pipes -> sockets.

Bytes from each pipe are cut into messages, given to the role to route by id,
put back in sequence order per connection, and acted on: DATA is written to
the connection's socket, a FIN is an event for the connection's life cycle,
a SYN goes to the role.

A socket that does not take the bytes as fast as the pipes bring them gets a
queue. Version 2 has a window per connection (tm3/core/credit.py): the peer never
sends more than the socket's queue may hold, and each byte the socket takes
is granted back (CREDIT), so a slow socket holds up only its own connection.
Version 1 has no per-connection window, so the only lossless
answer to a queue that keeps growing is to stop reading *all* pipes: past the
per-connection ceiling or the global one, reading stops until the queues are
down to half (hysteresis, so the pipes do not flap), and a
:class:`~tm3.mux.stalls.StallWatch` keeps that pause from outliving its cause. Bytes held for a
sequence gap never count here: pausing the pipes could hold back the very
message that fills the gap; the reorder window bounds them instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from tm3.core.credit import WindowExceeded
from tm3.core.lifecycle import WAITING, Event
from tm3.core.reorder import HeldBudget, ReorderError
from tm3.core.wire import (
    REASON_RST,
    SEQ_MASK,
    Credit,
    Data,
    Fin,
    Message,
    ProtocolError,
    Syn,
    encode,
    wire_size,
)
from tm3.logs import RateLimit
from tm3.mux.connection import Connection
from tm3.mux.stalls import StallWatch

if TYPE_CHECKING:
    from tm3.mux.pipes import PipeProtocol
    from tm3.mux.session import Session


# What a queued chunk costs besides its payload, charged against the queue
# ceilings: measured 41 bytes (the bytes object's header and its deque slot).
QUEUE_CHUNK_OVERHEAD = 48


PAUSE_LINE_INTERVAL = 10.0


def _also(lines: RateLimit) -> str:
    n = lines.take_suppressed()
    return f" ({n} more since the last such line)" if n else ""


class Inbound:
    log = Logger()

    def __init__(self, session: Session) -> None:
        self.session = session
        self.settings = session.settings
        self.stats = session.stats
        self.held_budget = HeldBudget(session.settings.total_window_bytes)
        self.queued_total = 0
        self.over_ceiling: set[Connection] = set()
        self.stalls = StallWatch(session)
        # The pipes can pause and resume many times a second under load: a
        # line each at most every 10 s (the metrics count every pause).
        self._pause_lines = RateLimit(PAUSE_LINE_INTERVAL, session.reactor.seconds)
        self._resume_lines = RateLimit(PAUSE_LINE_INTERVAL, session.reactor.seconds)

    # -- messages ------------------------------------------------------------

    def pipe_data(self, pipe: PipeProtocol, data: bytes) -> None:
        session = self.session
        stats = self.stats
        route = session.role.route
        credit = session.outbound.credit
        msg: Message | None = None
        try:
            for item in pipe.decoder.feed(data):
                stats.messages_received += 1
                if isinstance(item, Credit):
                    credit(item.conn_id, item.increment)
                    continue
                msg = item
                route(msg)
                if session.ended:
                    break
        except (ProtocolError, ReorderError) as e:
            if isinstance(e, ProtocolError) and e.offset >= 0:
                session.protocol_error(pipe.name, e.reason, e.offset, e.data)
            else:
                raw = encode(msg)[:16] if msg is not None else b""
                session.protocol_error(pipe.name, str(e), pipe.decoder.offset, raw)

    def push(self, conn: Connection, msg: Message) -> None:
        """Reorder ``msg`` into ``conn`` and act on whatever is now in order."""
        rx = conn.rx
        seq = msg.seq
        rwin = conn.rwin
        if rwin is not None and type(msg) is Data:
            try:
                rwin.receive(len(msg.payload))
            except WindowExceeded as e:
                raise ProtocolError(f"connection {msg.conn_id} sent {e}") from None
        if seq == rx.next_seq and not rx.held_bytes:
            # The common case, in order with nothing held: no buffering, no
            # list (held_bytes is 0 exactly when nothing is held).
            rx.next_seq = (seq + 1) & SEQ_MASK
            if type(msg) is Data:
                self.write(conn, msg.payload)
            else:
                self._deliver(conn, msg)
            return
        ready = rx.push(seq, msg, wire_size(msg))
        for i, m in enumerate(ready):
            self._deliver(conn, m)
            if type(m) is Fin:
                # Anything after a connection's FIN belongs to the next
                # connection with this id (docs/protocol.md rule 8), but
                # a v2 reset after a half-close.
                rest = ready[i + 1 :]
                rest.extend(item for _, item in conn.rx.take_held())
                if rest and conn.life.may_reset_after_fin:
                    first = rest[0]
                    if type(first) is Fin and first.reason == REASON_RST and first.seq == (m.seq + 1) & SEQ_MASK:
                        del rest[0]
                        self._deliver(conn, first)
                if rest:
                    self.session.role.after_fin(conn, rest)
                break

    def _deliver(self, conn: Connection, msg: Message) -> None:
        if type(msg) is Data:
            self.write(conn, msg.payload)
        elif type(msg) is Fin:
            self.session.event(conn, Event.PEER_RST if msg.reason == REASON_RST else Event.PEER_FIN)
        else:
            assert type(msg) is Syn
            self.session.role.syn_delivered(conn, msg)

    # -- the socket's queue --------------------------------------------------

    def write(self, conn: Connection, payload: bytes) -> None:
        """DATA in order: to the socket now, to its queue, or (the socket is
        gone for good) dropped and counted."""
        n = len(payload)
        if not n:
            return
        stream = conn.stream
        if stream is not None:
            if not conn.queue and not stream.gate.is_blocked:
                # Counted when written, not when received: a connect that
                # fails (or a socket that goes away) took none of the queue.
                conn.bytes_in += n
                self.stats.bytes_from_pipes += n
                stream.write(payload)
                if conn.rwin is not None:
                    self._consumed(conn, n)
                return
        elif conn.life.state not in WAITING:
            self.stats.tail_bytes_dropped += n
            return
        conn.queue.append(payload)
        cost = n + QUEUE_CHUNK_OVERHEAD
        conn.queued += cost
        if conn.rwin is None:
            # (A v2 connection's queue is bounded by its window, and must
            # hold up only itself: it is not part of the pipes' ceilings.)
            self.queued_total += cost
            self._check_ceiling(conn)

    def drain(self, conn: Connection) -> None:
        """Write what the socket will take now; half-close once all is written
        if the peer's FIN asked for it."""
        stream = conn.stream
        if stream is None:
            return
        queue = conn.queue
        gate = stream.gate
        freed = chunks = 0
        while queue and not gate.is_blocked:
            chunk = queue.popleft()
            freed += len(chunk)
            chunks += 1
            stream.write(chunk)
        if chunks:
            conn.bytes_in += freed
            self.stats.bytes_from_pipes += freed
            self._dequeued(conn, freed + chunks * QUEUE_CHUNK_OVERHEAD)
            if conn.rwin is not None:
                self._consumed(conn, freed)
        if not queue and conn.shut_pending:
            conn.shut_pending = False
            stream.shutdown_write()

    def _consumed(self, conn: Connection, n: int) -> None:
        """Version 2: the socket took ``n`` bytes; grant the peer more."""
        assert conn.rwin is not None
        if conn.life.peer_done:
            return  # the peer sends nothing more: no credit, and no growth
        increment = conn.rwin.consume(n)
        if increment:
            self.session.outbound.send_credit(conn, increment)

    def shutdown_when_drained(self, conn: Connection) -> None:
        conn.shut_pending = True
        self.drain(conn)

    def take_queue(self, conn: Connection) -> list[bytes]:
        """Hand over what the socket has not taken (to be written at once by
        the caller: the LP's flush-then-reset)."""
        chunks = list(conn.queue)
        conn.queue.clear()
        conn.shut_pending = False
        if chunks:
            n = sum(map(len, chunks))
            conn.bytes_in += n
            self.stats.bytes_from_pipes += n
            self._dequeued(conn, conn.queued)
        return chunks

    def drop_queue(self, conn: Connection) -> None:
        conn.shut_pending = False
        if conn.queue:
            self.stats.tail_bytes_dropped += sum(map(len, conn.queue))
            conn.queue.clear()
            self._dequeued(conn, conn.queued)

    # -- ceilings --------------------------------------------------------------

    def _check_ceiling(self, conn: Connection) -> None:
        s = self.settings
        if conn.queued > s.conn_queue_limit:
            self.over_ceiling.add(conn)
        pipes = self.session.pipes
        if (self.over_ceiling or self.queued_total > s.total_queue_limit) and not pipes.reading_paused:
            self.stats.upload_pauses += 1
            if self._pause_lines.allow():
                self.log.debug(
                    "{session}: socket queues full (conn {conn_id} has {queued} B queued, {total} B in all);"
                    " pausing all pipes until they drain{also}",
                    session=self.session.name,
                    also=_also(self._pause_lines),
                    conn_id=conn.conn_id,
                    queued=conn.queued,
                    total=self.queued_total,
                )
            pipes.pause_reading()
            self.stalls.start()

    def conn_over(self, conn: Connection) -> None:
        """No byte can join an over connection's queue: it no longer holds
        the pipes by the per-connection ceiling (the total still counts it)."""
        if conn in self.over_ceiling:
            self.over_ceiling.discard(conn)
            self._resume_if_drained()

    def close(self) -> None:
        self.stalls.stop()
        self.over_ceiling.clear()

    def _dequeued(self, conn: Connection, n: int) -> None:
        conn.queued -= n
        if conn.rwin is not None:
            return
        self.queued_total -= n
        s = self.settings
        if conn.queued <= s.conn_queue_limit // 2:
            self.over_ceiling.discard(conn)
        self._resume_if_drained()

    def _resume_if_drained(self) -> None:
        s = self.settings
        pipes = self.session.pipes
        if (
            pipes.reading_paused
            and not self.over_ceiling
            and self.queued_total <= s.total_queue_limit // 2
            and not self.session.ended
        ):
            if self._resume_lines.allow():
                self.log.debug(
                    "{session}: socket queues drained ({total} B); resuming pipes{also}",
                    session=self.session.name,
                    total=self.queued_total,
                    also=_also(self._resume_lines),
                )
            pipes.resume_reading()
            self.stalls.stop()
