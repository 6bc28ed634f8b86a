"""The multiplexer core shared by both proxies: one session over ``n`` pipes,
and the application TCP connections it carries.

- :class:`Connection` is one application connection (one ``conn_id``): its
  reorder buffer, its send sequence number, the FIN state of both directions,
  and the queue of bytes its socket has not taken yet.
- :class:`StreamProtocol` is that connection's socket (to the server on the
  RP, from the client on the LP). It is half-closeable, and registers a
  :class:`~tm3.mux.flow.WriteGate` on its transport so a slow socket queues
  instead of growing the transport's buffer without bound.
- :class:`Session` receives messages from the pipes, reorders them per
  connection and acts on them in order; sends socket bytes as DATA messages;
  and applies backpressure both ways (PROTOCOL.md, "Limits and
  backpressure"):

  * download (socket -> pipes): when every pipe is blocked the session stops
    reading the sockets that were sending, and any other socket as soon as it
    sends; all resume as soon as one pipe resumes;
  * upload (pipes -> socket): bytes a socket has not taken are queued; past
    the per-connection or the global ceiling the session stops reading all
    pipes until the queues fall to half the ceilings.

The roles differ only in how connections begin (the RP connects on a SYN, the
LP accepts and sends one) and in what a message for an unknown id means:
subclasses fill in :meth:`Session.route` and :meth:`Session.connection_over`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import Any, ClassVar

from attrs import define, field, frozen
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tm3.mux.flow import WriteGate, abort_transport, register_producer, reset_pending, unregister_producer
from tm3.mux.pipes import PipeProtocol, PipeSet
from tm3.core.reorder import DEFAULT_TOTAL_WINDOW_BYTES, DEFAULT_WINDOW_BYTES, HeldBudget, ReorderBuffer, ReorderError
from tm3.core.wire import (
    DEFAULT_PAYLOAD,
    HEADER,
    REASON_FIN,
    REASON_RST,
    SEQ_MASK,
    Data,
    Fin,
    Message,
    ProtocolError,
    Syn,
    encode,
    encode_fin,
    wire_size,
)

MiB = 1024 * 1024
# Past this many bytes read from sockets while every pipe is blocked, stop
# reading all sockets at once (O(connections), so only when a broad burst
# makes the one-read-per-socket lazy pause too loose). Sockets the epoll
# reactor already found ready in the same poll still get their one read.
OVERDRAFT_LIMIT = 1 * MiB

# Connection states (of the socket side).
PARKED = "parked"  # RP: SYN for a reused id whose old connection is not over
CONNECTING = "connecting"
OPEN = "open"
CLOSED = "closed"


@frozen
class Settings:
    """Tunables of a session; the defaults are PROTOCOL.md's."""

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


@define
class Stats:
    """Counters over the life of a proxy (all sessions)."""

    sessions: int = 0
    sessions_ended: int = 0
    protocol_errors: int = 0
    connections_opened: int = 0
    connections_closed: int = 0
    connect_failures: int = 0
    bytes_from_pipes: int = 0  # payload written to sockets
    bytes_to_pipes: int = 0  # payload read from sockets
    messages_received: int = 0
    messages_sent: int = 0
    tails_dropped: int = 0  # messages for connections that are over
    tail_bytes_dropped: int = 0
    live_id_reuses: int = 0
    upload_pauses: int = 0
    download_pauses: int = 0
    ended_by: dict[str, int] = field(factory=dict)


class Connection:
    """One application connection carried by the session."""

    __slots__ = (
        "session", "conn_id", "host", "port", "rx", "tx_seq", "state", "stream", "connector",
        "fin_sent", "fin_received", "over", "queue", "queued", "shut_pending", "read_paused",
        "bytes_in", "bytes_out", "started", "how", "parked", "reuse_timer", "__weakref__",
    )  # fmt: skip

    def __init__(self, session: Session, conn_id: int, host: str, port: int, rx_next: int = 0) -> None:
        self.session = session
        self.conn_id = conn_id
        self.host = host
        self.port = port
        self.rx: ReorderBuffer[Message] = ReorderBuffer(
            rx_next, session.settings.window_bytes, session.held_budget
        )
        self.tx_seq = 0
        self.state = CONNECTING
        self.stream: StreamProtocol | None = None
        self.connector: Any = None
        self.fin_sent: int | None = None
        self.fin_received: int | None = None
        self.over = False
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.shut_pending = False
        self.read_paused = False
        self.bytes_in = 0  # payload from the pipes, written to the socket
        self.bytes_out = 0  # payload read from the socket, sent on the pipes
        self.started = time.monotonic()
        self.how = ""
        self.parked: Connection | None = None
        self.reuse_timer: IDelayedCall | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.conn_id} {self.host}:{self.port} {self.state}>"


@implementer(IHalfCloseableProtocol)
class StreamProtocol(Protocol):
    """The socket of one connection: relays bytes between it and the session."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.gate = WriteGate(self._write_paused, self._write_resumed)
        self.aborted = False
        self.read_closed = False
        self.write_closed = False

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        register_producer(transport, self.gate)
        self.conn.session.stream_opened(self.conn, self)

    def dataReceived(self, data: bytes) -> None:
        if not self.aborted:
            self.conn.session.stream_data(self.conn, data)

    def readConnectionLost(self) -> None:
        if reset_pending(self.transport):  # a RST reported as EOF: see reset_pending
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.read_closed = True
        if not self.aborted:
            self.conn.session.stream_eof(self.conn)
        self._close_if_shut_down()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        self._close_if_shut_down()

    def _close_if_shut_down(self) -> None:
        # Twisted keeps the socket open after both halves are shut down
        # (tcp.Connection.readConnectionLost/_closeWriteConnection): close it.
        if self.read_closed and self.write_closed and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.conn.session.stream_closed(self.conn, self, reason)

    def _write_paused(self) -> None:
        pass  # is_blocked is read by the session when it writes

    def _write_resumed(self) -> None:
        if not self.aborted:
            self.conn.session.stream_writable(self.conn)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def shutdown_write(self) -> None:
        transport = self.transport
        if transport is None or self.aborted:
            return
        # A registered producer keeps loseConnection/loseWriteConnection from
        # finishing (twisted.internet.abstract); we have nothing left to write.
        unregister_producer(transport)
        lose_write = getattr(transport, "loseWriteConnection", None)
        if lose_write is not None:
            lose_write()
        else:
            transport.loseConnection()

    def close(self) -> None:
        transport = self.transport
        if transport is None or self.aborted:
            return
        unregister_producer(transport)
        transport.loseConnection()

    def abort(self) -> None:
        """RST the socket, dropping whatever it had buffered."""
        if self.aborted:
            return
        self.aborted = True
        if self.transport is not None:
            abort_transport(self.transport)


class Session:
    """One set of pipes and the connections it carries (see module doc)."""

    log = Logger()
    role: ClassVar[str] = "session"
    # True on the RP, where bytes from the pipes go to the server (upload).
    pipes_carry_upload: ClassVar[bool] = True

    def __init__(
        self,
        pipes: list[PipeProtocol],
        reactor: IReactorTime,
        settings: Settings,
        stats: Stats,
        on_end: Any = None,
        name: str = "session",
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.stats = stats
        self.name = name
        self.on_end = on_end
        self.ended = False
        self.conns: dict[int, Connection] = {}
        self.live: set[Connection] = set()  # every connection with a socket or pending connect
        self.held_budget = HeldBudget(settings.total_window_bytes)
        self.queued_total = 0
        self.over_ceiling: set[Connection] = set()
        self.paused_readers: set[Connection] = set()
        self.recent_senders: set[Connection] = set()
        # Socket bytes accepted while every pipe was blocked (see stream_data).
        self.overdraft = 0
        self.paused_all = False
        self.pipes = PipeSet(pipes, reactor, self._all_pipes_blocked, self._pipes_unblocked)
        self.started = time.monotonic()
        stats.sessions += 1
        for pipe in pipes:
            pipe.attach(self)

    # -- pipes -> connections ----------------------------------------------

    def pipe_data(self, pipe: PipeProtocol, data: bytes) -> None:
        if self.ended:
            return
        stats = self.stats
        msg: Message | None = None
        try:
            for msg in pipe.decoder.feed(data):
                stats.messages_received += 1
                self.route(msg)
                if self.ended:
                    break
        except (ProtocolError, ReorderError) as e:
            if isinstance(e, ProtocolError) and e.offset >= 0:
                self.protocol_error(pipe, e.reason, e.offset, e.data)
            else:
                raw = encode(msg)[:16] if msg is not None else b""
                self.protocol_error(pipe, str(e), pipe.decoder.offset, raw)

    def route(self, msg: Message) -> None:
        """Give a message to the connection it belongs to (role-specific)."""
        raise NotImplementedError

    def push(self, conn: Connection, msg: Message) -> None:
        """Reorder ``msg`` into ``conn`` and act on whatever is now in order."""
        rx = conn.rx
        seq = msg.seq
        if seq == rx.next_seq and not rx.held_bytes:
            # The common case, in order with nothing held: no buffering, no
            # list (held_bytes is 0 exactly when nothing is held).
            rx.next_seq = (seq + 1) & SEQ_MASK
            if type(msg) is Data:
                self.write_to_stream(conn, msg.payload)  # type: ignore[union-attr]
            else:
                self.deliver(conn, msg)
            return
        ready = rx.push(seq, msg, wire_size(msg))
        for i, m in enumerate(ready):
            self.deliver(conn, m)
            if type(m) is Fin:
                # Anything after a connection's FIN belongs to the next
                # connection with this id (PROTOCOL.md rule 8).
                rest = ready[i + 1 :]
                rest.extend(item for _, item in conn.rx.take_held())
                if rest:
                    self.after_fin(conn, rest)
                break

    def after_fin(self, conn: Connection, messages: list[Message]) -> None:
        """Messages that arrived numbered past ``conn``'s FIN."""
        for m in messages:
            self.drop_tail(m)

    def deliver(self, conn: Connection, msg: Message) -> None:
        kind = type(msg)
        if kind is Data:
            self.write_to_stream(conn, msg.payload)  # type: ignore[union-attr]
        elif kind is Fin:
            self.peer_fin(conn, msg.reason)  # type: ignore[union-attr]
        else:
            self.deliver_syn(conn, msg)  # type: ignore[arg-type]

    def deliver_syn(self, conn: Connection, msg: Syn) -> None:
        raise ProtocolError(f"unexpected SYN for connection {msg.conn_id}")

    def write_to_stream(self, conn: Connection, payload: bytes) -> None:
        n = len(payload)
        if not n:
            return
        stream = conn.stream
        if conn.state == OPEN and stream is not None and not conn.queue and not stream.gate.is_blocked:
            # Counted when written, not when received: a connect that fails
            # (or a socket that goes away) took none of what was queued.
            conn.bytes_in += n
            self.stats.bytes_from_pipes += n
            stream.write(payload)
            return
        if conn.state == CLOSED:
            # The socket is gone (its peer closed it completely): there is no
            # one left to take these bytes.
            self.stats.tail_bytes_dropped += n
            return
        conn.queue.append(payload)
        conn.queued += n
        self.queued_total += n
        self._check_upload_ceiling(conn)

    def peer_fin(self, conn: Connection, reason: int) -> None:
        if reason != REASON_RST:
            reason = REASON_FIN  # the reference lets any other reason mean FIN
        conn.fin_received = reason
        if reason == REASON_RST:
            self._drop_queue(conn)
            self.abort_stream(conn)
            self.connection_done(conn, "rst")
            return
        if conn.state == OPEN and not conn.queue:
            assert conn.stream is not None
            conn.stream.shutdown_write()
        else:
            conn.shut_pending = True
        if conn.fin_sent is not None:
            self.connection_done(conn, conn.how or "fin")

    # -- sockets -> pipes --------------------------------------------------

    def stream_opened(self, conn: Connection, stream: StreamProtocol) -> None:
        conn.stream = stream
        if conn.state == CLOSED or self.ended:
            # Aborted while the connect was in flight.
            stream.abort()
            return
        conn.state = OPEN
        conn.connector = None
        self.live.add(conn)
        if self.pipes.all_blocked:
            self._pause_reader(conn)
        self._drain(conn)

    def stream_data(self, conn: Connection, data: bytes) -> None:
        if conn.fin_sent is not None:
            return
        n = len(data)
        conn.bytes_out += n
        self.stats.bytes_to_pipes += n
        maxp = self.settings.max_payload
        pipes = self.pipes
        cid = conn.conn_id
        seq = conn.tx_seq
        pack = HEADER.pack
        if n <= maxp:
            pipes.send_data(pack(cid, seq, n + 8), data)
            seq += 1
            sent = 1
        else:
            view = memoryview(data)
            sent = 0
            for off in range(0, n, maxp):
                chunk = bytes(view[off : off + maxp])
                pipes.send_data(pack(cid, seq & SEQ_MASK, len(chunk) + 8), chunk)
                seq += 1
                sent += 1
        conn.tx_seq = seq & SEQ_MASK
        self.stats.messages_sent += sent
        if pipes.unblocked == 0:
            self._pause_reader(conn)
            self.overdraft += n
            if self.overdraft > OVERDRAFT_LIMIT and not self.paused_all:
                self._pause_all_readers()
        else:
            self.recent_senders.add(conn)

    def stream_eof(self, conn: Connection) -> None:
        """The socket's peer finished sending (TCP FIN)."""
        if conn.fin_sent is None:
            self.send_fin(conn, REASON_FIN)
            if conn.fin_received is not None:
                self.connection_done(conn, "fin")

    def stream_writable(self, conn: Connection) -> None:
        self._drain(conn)

    def stream_closed(self, conn: Connection, stream: StreamProtocol, reason: Failure) -> None:
        conn.state = CLOSED
        self.live.discard(conn)
        self.paused_readers.discard(conn)
        self.recent_senders.discard(conn)
        self._drop_queue(conn)
        if stream.aborted or self.ended:
            return
        if conn.fin_sent is None:
            orderly = reason.check(ConnectionDone) is not None
            self.send_fin(conn, REASON_FIN if orderly else REASON_RST)
            if not orderly:
                self.connection_done(conn, "rst")
                return
            if conn.fin_received is not None:
                self.connection_done(conn, "fin")

    def send_fin(self, conn: Connection, reason: int) -> None:
        conn.fin_sent = reason
        self.pipes.send(encode_fin(conn.conn_id, conn.tx_seq, reason))
        conn.tx_seq = (conn.tx_seq + 1) & SEQ_MASK
        self.stats.messages_sent += 1
        if reason == REASON_RST and not conn.over:
            self.connection_done(conn, conn.how or "rst")

    # -- connection life ---------------------------------------------------

    def abort_stream(self, conn: Connection) -> None:
        """Reset the socket (or stop the connect) at once."""
        # CLOSED first: a real connector's stopConnecting() calls
        # clientConnectionFailed synchronously, and connect_failed must see
        # that we stopped it (else: a bogus connect failure, even a FIN 0x99).
        conn.state = CLOSED
        if conn.connector is not None:
            connector, conn.connector = conn.connector, None
            try:
                connector.stopConnecting()
            except Exception:
                pass
        if conn.stream is not None:
            conn.stream.abort()
        conn.state = CLOSED
        self.live.discard(conn)
        self.paused_readers.discard(conn)
        self.recent_senders.discard(conn)

    def connection_done(self, conn: Connection, how: str) -> None:
        """The connection is over for this side: log it and forget its id."""
        if conn.over:
            return
        conn.over = True
        conn.how = how
        self.stats.connections_closed += 1
        self.stats.ended_by[how] = self.stats.ended_by.get(how, 0) + 1
        self._log_end(conn, how)
        if conn.state == CLOSED or conn.state == PARKED:
            self._drop_queue(conn)
        self.connection_over(conn)

    def _log_end(self, conn: Connection, how: str) -> None:
        up, down = (conn.bytes_in, conn.bytes_out) if self.pipes_carry_upload else (conn.bytes_out, conn.bytes_in)
        self.log.info(
            "conn {conn_id} to {host}:{port} ended: {how}; up {up} B, down {down} B, {seconds:.3f} s",
            conn_id=conn.conn_id,
            host=conn.host,
            port=conn.port,
            how=how,
            up=up,
            down=down,
            seconds=time.monotonic() - conn.started,
        )

    def connection_over(self, conn: Connection) -> None:
        if self.conns.get(conn.conn_id) is conn:
            del self.conns[conn.conn_id]

    def drop_tail(self, msg: Message) -> None:
        self.stats.tails_dropped += 1
        if type(msg) is Data:
            self.stats.tail_bytes_dropped += len(msg.payload)  # type: ignore[union-attr]

    # -- upload queue and backpressure ---------------------------------------

    def _drain(self, conn: Connection) -> None:
        stream = conn.stream
        if stream is None or conn.state != OPEN:
            return
        queue = conn.queue
        gate = stream.gate
        freed = 0
        while queue and not gate.is_blocked:
            chunk = queue.popleft()
            freed += len(chunk)
            stream.write(chunk)
        if freed:
            conn.bytes_in += freed
            self.stats.bytes_from_pipes += freed
            conn.queued -= freed
            self.queued_total -= freed
            self._check_upload_resume(conn)
        if not queue and conn.shut_pending:
            conn.shut_pending = False
            stream.shutdown_write()

    def _drop_queue(self, conn: Connection) -> None:
        if conn.queued:
            self.stats.tail_bytes_dropped += conn.queued
            self.queued_total -= conn.queued
            conn.queued = 0
            conn.queue.clear()
            self._check_upload_resume(conn)
        conn.shut_pending = False

    def _check_upload_ceiling(self, conn: Connection) -> None:
        s = self.settings
        if conn.queued > s.conn_queue_limit and conn not in self.over_ceiling:
            self.over_ceiling.add(conn)
        if (self.over_ceiling or self.queued_total > s.total_queue_limit) and not self.pipes.reading_paused:
            self.stats.upload_pauses += 1
            self.log.info(
                "{session}: upload queues full (conn {conn_id} has {queued} B queued, {total} B in all);"
                " pausing all pipes until they drain",
                session=self.name,
                conn_id=conn.conn_id,
                queued=conn.queued,
                total=self.queued_total,
            )
            self.pipes.pause_reading()

    def _check_upload_resume(self, conn: Connection) -> None:
        s = self.settings
        if conn in self.over_ceiling and conn.queued <= s.conn_queue_limit // 2:
            self.over_ceiling.discard(conn)
        if (
            self.pipes.reading_paused
            and not self.over_ceiling
            and self.queued_total <= s.total_queue_limit // 2
            and not self.ended
        ):
            self.log.info("{session}: upload queues drained ({total} B); resuming pipes", session=self.name, total=self.queued_total)
            self.pipes.resume_reading()

    def _pause_reader(self, conn: Connection) -> None:
        if not conn.read_paused and conn.stream is not None and conn.stream.transport is not None:
            conn.read_paused = True
            conn.stream.transport.pauseProducing()  # type: ignore[attr-defined]
            self.paused_readers.add(conn)

    def _all_pipes_blocked(self) -> None:
        self.stats.download_pauses += 1
        self.overdraft = 0
        senders, self.recent_senders = self.recent_senders, set()
        for conn in senders:
            self._pause_reader(conn)

    def _pause_all_readers(self) -> None:
        # Many sockets that were quiet are each bringing one read while the
        # pipes are blocked: stop them all now rather than one read at a time.
        self.paused_all = True
        for conn in self.live:
            if conn.state == OPEN:
                self._pause_reader(conn)

    def _pipes_unblocked(self) -> None:
        self.overdraft = 0
        self.paused_all = False
        paused, self.paused_readers = self.paused_readers, set()
        for conn in paused:
            conn.read_paused = False
            if conn.stream is not None and conn.stream.transport is not None and conn.state == OPEN:
                conn.stream.transport.resumeProducing()  # type: ignore[attr-defined]

    # -- ending ------------------------------------------------------------

    def pipe_lost(self, pipe: PipeProtocol, reason: Failure) -> None:
        self.end(f"{pipe.name} closed: {reason.getErrorMessage()}")

    def protocol_error(self, pipe: PipeProtocol, reason: str, offset: int, data: bytes) -> None:
        self.stats.protocol_errors += 1
        self.log.error(
            "{session}: protocol error on {pipe} at offset {offset}: {reason} (bytes: {raw}); ending the session",
            session=self.name,
            pipe=pipe.name,
            offset=offset,
            reason=reason,
            raw=data.hex(" "),
        )
        self.end(f"protocol error on {pipe.name}")

    def end(self, why: str) -> None:
        """Abort every connection, close the pipes, forget everything."""
        if self.ended:
            return
        self.ended = True
        self.stats.sessions_ended += 1
        conns: set[Connection] = set(self.live)
        for conn in list(self.conns.values()):
            conns.add(conn)
            if conn.parked is not None:
                conns.add(conn.parked)
        for conn in conns:
            if conn.reuse_timer is not None and conn.reuse_timer.active():
                conn.reuse_timer.cancel()
            if not conn.over:
                conn.over = True
                self.stats.connections_closed += 1
                self.stats.ended_by["session-lost"] = self.stats.ended_by.get("session-lost", 0) + 1
                self._log_end(conn, "session-lost")
            self.abort_stream(conn)
            self._drop_queue(conn)
        self.conns.clear()
        self.live.clear()
        self.paused_readers.clear()
        self.recent_senders.clear()
        self.over_ceiling.clear()
        self.end_hook()
        self.pipes.close()
        self.log.info(
            "{session} lost after {seconds:.1f} s: {why}",
            session=self.name,
            seconds=time.monotonic() - self.started,
            why=why,
        )
        if self.on_end is not None:
            self.on_end(self, why)

    def end_hook(self) -> None:
        """Role-specific cleanup when the session ends (timers, holds)."""

    def connections(self) -> Iterable[Connection]:
        return self.conns.values()
