"""The remote proxy (RP) role: sessions that open real TCP connections to
servers when the LP asks for them.

- :class:`RemoteSession` routes each message to its connection by id,
  following PROTOCOL.md rules 8 and 9: a SYN for an id whose older connection
  is not over yet is *parked* behind it; messages for an id with no
  connection are held (briefly, and bounded) for a SYN still on a slower
  pipe, or dropped and counted as the tail of a connection already over.
- :class:`ServerConnection` is the socket to the server
  (a :class:`~tm3.mux.session.StreamProtocol`), opened with
  ``reactor.connectTCP`` through :class:`ServerConnectionFactory`.
- :class:`Multiplexer` is the service that owns the current session: a new
  complete pipe set from :class:`~tm3.mux.pipes.PipeFactory` replaces it, a lost
  pipe ends it, and the service itself never stops because an LP went away.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from tm3.mux.session import CLOSED, CONNECTING, PARKED, Connection, Session, Settings, Stats, StreamProtocol
from tm3.mux.pipes import PipeProtocol
from tm3.core.reorder import ReorderError
from tm3.core.wire import REASON_RST, Message, ProtocolError, Syn, encode, wire_size


class ServerConnection(StreamProtocol):
    """The RP's TCP connection to a server, for one connection id."""


class ServerConnectionFactory(ClientFactory):
    protocol = ServerConnection
    noisy = False  # one per connection: the end-of-connection line says enough

    def __init__(self, session: RemoteSession, conn: Connection) -> None:
        self.session = session
        self.conn = conn

    def buildProtocol(self, addr: Any) -> ServerConnection:
        proto = ServerConnection(self.conn)
        proto.factory = self
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.session.connect_failed(self.conn, reason)


class _Orphans:
    """Messages for an id that has no connection (yet)."""

    __slots__ = ("messages", "size", "timer")

    def __init__(self, timer: IDelayedCall) -> None:
        self.messages: list[Message] = []
        self.size = 0
        self.timer = timer


class RemoteSession(Session):
    log = Logger()
    role = "rp"
    pipes_carry_upload = True

    def __init__(self, pipes: list[PipeProtocol], reactor: Any, settings: Settings, stats: Stats, **kw: Any) -> None:
        self.orphans: dict[int, _Orphans] = {}
        self.orphan_total = 0
        # id -> until when its in-flight tail is dropped on arrival (at most
        # one entry per id, so bounded by 65536; expired lazily).
        self.tombstones: dict[int, float] = {}
        super().__init__(pipes, reactor, settings, stats, **kw)

    # -- routing (PROTOCOL.md rules 8 and 9) ---------------------------------

    def route(self, msg: Message) -> None:
        cid = msg.conn_id
        conn = self.conns.get(cid)
        if type(msg) is Syn:
            self._syn(conn, msg)
            return
        if conn is None:
            deadline = self.tombstones.get(cid)
            if deadline is not None:
                if self.reactor.seconds() < deadline:
                    self.drop_tail(msg)
                    return
                del self.tombstones[cid]
            self.hold_orphan(msg)
            return
        target: Connection | None = conn
        if conn.fin_received is not None:
            # The old connection has had its last message: this is the next one's.
            target = conn.parked
        elif conn.parked is not None and conn.rx.is_behind(msg.seq):
            target = conn.parked
        if target is None:
            self.hold_orphan(msg)
        else:
            self.push(target, msg)

    def _syn(self, old: Connection | None, msg: Syn) -> None:
        cid = msg.conn_id
        if msg.seq != 0:
            raise ProtocolError(f"SYN for connection {cid} with seq {msg.seq} (a SYN is always seq 0)")
        self.tombstones.pop(cid, None)
        conn = Connection(self, cid, msg.host, msg.port)
        self.stats.connections_opened += 1
        if old is None:
            self.conns[cid] = conn
        else:
            if old.parked is not None:
                raise ProtocolError(f"duplicate SYN for connection {cid} (one is already waiting for the id)")
            conn.state = PARKED
            old.parked = conn
            old.reuse_timer = self.reactor.callLater(self.settings.reuse_grace, self._reuse_expired, old)
        self.push(conn, msg)
        orphans = self.orphans.pop(cid, None)
        if orphans is not None:
            orphans.timer.cancel()
            self.orphan_total -= orphans.size
            for m in orphans.messages:
                if conn.over:
                    self.drop_tail(m)
                else:
                    self.push(conn, m)

    def after_fin(self, conn: Connection, messages: list[Message]) -> None:
        for m in messages:
            self.route(m)

    def deliver_syn(self, conn: Connection, msg: Syn) -> None:
        if conn.state != PARKED:
            self.connect(conn)

    def hold_orphan(self, msg: Message) -> None:
        if self.ended:
            return  # what an ended session still routes must not start timers
        cid = msg.conn_id
        size = wire_size(msg)
        orphans = self.orphans.get(cid)
        s = self.settings
        if orphans is None:
            orphans = _Orphans(self.reactor.callLater(s.orphan_timeout, self._orphans_expired, cid))
            self.orphans[cid] = orphans
        if orphans.size + size > s.orphan_id_limit or self.orphan_total + size > s.orphan_total_limit:
            self.drop_tail(msg)
            return
        orphans.messages.append(msg)
        orphans.size += size
        self.orphan_total += size

    def _orphans_expired(self, cid: int) -> None:
        orphans = self.orphans.pop(cid, None)
        if orphans is None:
            return
        self.orphan_total -= orphans.size
        for m in orphans.messages:
            self.drop_tail(m)
        self.log.debug(
            "{session}: dropped {n} messages for id {conn_id}, which has no connection",
            session=self.name,
            n=len(orphans.messages),
            conn_id=cid,
        )

    def _reuse_expired(self, old: Connection) -> None:
        old.reuse_timer = None
        if old.over or self.conns.get(old.conn_id) is not old:
            return
        self.stats.live_id_reuses += 1
        self.log.warn(
            "{session}: id {conn_id} was reused while its connection to {host}:{port} was not over"
            " {grace} s after the new SYN; resetting the old server connection",
            session=self.name,
            conn_id=old.conn_id,
            host=old.host,
            port=old.port,
            grace=self.settings.reuse_grace,
        )
        self.abort_stream(old)
        self.connection_done(old, "id-reused")

    # -- connections ---------------------------------------------------------

    def connect(self, conn: Connection) -> None:
        conn.state = CONNECTING
        self.live.add(conn)
        reactor: IReactorTCP = self.reactor  # type: ignore[assignment]
        conn.connector = reactor.connectTCP(
            conn.host, conn.port, ServerConnectionFactory(self, conn), timeout=self.settings.connect_timeout
        )

    def connect_failed(self, conn: Connection, reason: Failure) -> None:
        conn.connector = None
        if conn.state == CLOSED or self.ended:
            return  # we stopped the connect ourselves
        conn.state = CLOSED
        self.live.discard(conn)
        self.stats.connect_failures += 1
        self.log.info(
            "conn {conn_id}: connect to {host}:{port} failed: {why}",
            conn_id=conn.conn_id,
            host=conn.host,
            port=conn.port,
            why=reason.getErrorMessage(),
        )
        conn.how = "connect-failed"
        if conn.fin_received == REASON_RST or conn.over:
            return
        self.send_fin(conn, REASON_RST)

    def connection_over(self, conn: Connection) -> None:
        cid = conn.conn_id
        if conn.reuse_timer is not None:
            if conn.reuse_timer.active():
                conn.reuse_timer.cancel()
            conn.reuse_timer = None
        if self.conns.get(cid) is conn:
            held = [m for _, m in conn.rx.take_held()]
            parked, conn.parked = conn.parked, None
            if parked is not None and not parked.over:
                self.conns[cid] = parked
                self.connect(parked)
                self._route_held(held)
            else:
                del self.conns[cid]
                if conn.fin_received is None:
                    # We ended it before the LP's last message came (connect
                    # failed, server reset): the LP's tail is still in flight.
                    # Drop it on arrival for a while rather than hold it where
                    # a reused id's SYN could take it over (rule 7: the LP
                    # reuses the id only 10 s after it got our FIN).
                    self.tombstones[cid] = self.reactor.seconds() + self.settings.orphan_timeout
                    for m in held:
                        self.drop_tail(m)
                else:
                    for m in held:  # numbered past its FIN: the next connection's
                        self.hold_orphan(m)
            return
        current = self.conns.get(cid)
        if current is not None and current.parked is conn:
            # The parked connection was reset by the LP before it started.
            current.parked = None

    def _route_held(self, held: list[Message]) -> None:
        # This runs from server callbacks and timers too, where no pipe read
        # would catch a ReorderError: a held message the next connection
        # cannot take (a duplicate, beyond its window) ends the session here.
        for m in held:
            try:
                self.route(m)
            except (ProtocolError, ReorderError) as e:
                self.stats.protocol_errors += 1
                self.log.error(
                    "{session}: protocol error in a message held for id {conn_id}: {reason}"
                    " (bytes: {raw}); ending the session",
                    session=self.name,
                    conn_id=m.conn_id,
                    reason=str(e),
                    raw=encode(m)[:16].hex(" "),
                )
                self.end(f"protocol error in a message held for id {m.conn_id}")
            if self.ended:
                return

    def end_hook(self) -> None:
        for orphans in self.orphans.values():
            if orphans.timer.active():
                orphans.timer.cancel()
        self.orphans.clear()
        self.orphan_total = 0
        self.tombstones.clear()


class Multiplexer(Service):
    """Owns the RP's current session (at most one at a time)."""

    log = Logger()

    def __init__(self, reactor: IReactorTime, settings: Settings, session_class: type[Session] = RemoteSession) -> None:
        self.reactor = reactor
        self.settings = settings
        self.stats = Stats()
        self.session: Session | None = None
        self.session_class = session_class
        self._count = 0

    def start_session(self, pipes: list[PipeProtocol]) -> Session:
        if self.session is not None:
            self.session.end("replaced by a newer complete pipe set")
        self._count += 1
        name = f"session {self._count}"
        session = self.session_class(pipes, self.reactor, self.settings, self.stats, on_end=self._ended, name=name)
        if not session.ended:
            self.session = session
            self.log.info(
                "{session} up: {n} pipes from {peers}",
                session=name,
                n=len(pipes),
                peers=", ".join(p.name for p in pipes),
            )
        return session

    def _ended(self, session: Session, why: str) -> None:
        if self.session is session:
            self.session = None

    def stopService(self) -> Any:
        if self.session is not None:
            self.session.end("service stopping")
        return super().stopService()
