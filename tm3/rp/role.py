"""The remote proxy's role in a session: connections begin with the LP's
SYN, and the RP opens the real TCP connection to the server.

Routing by id follows docs/protocol.md rules 8 and 9:

- a SYN for an id whose older connection is not over yet is **parked**: the
  new connection waits, and each message for the id goes to the old one if
  its seq is at or past the old one's next expected seq, else to the new one;
  when the old one is over the new one connects. If the old one is still not
  over ``reuse_grace`` seconds after the SYN, it is reset (a live id reused);
- a message for an id with no connection is **held** (an orphan), in case
  its SYN is still on a slower pipe: ``orphan_timeout`` seconds at most,
  bounded per id and in all;
- after we end a connection before the LP's last message came (connect
  failed, server reset), the LP's in-flight tail is dropped on arrival for
  ``orphan_timeout`` seconds (a **tombstone**) instead of held, where a reused
  id's SYN could take it over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.error import NotConnectingError
from twisted.internet.interfaces import IConnector, IDelayedCall
from twisted.internet.protocol import ClientFactory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tm3.core.destinations import DestinationPolicy
from tm3.core.lifecycle import Event, State
from tm3.core.reorder import ReorderError
from tm3.core.wire import REASON_RST, Fin, Message, ProtocolError, Syn, encode
from tm3.fdlimit import SocketCount, soft_limit
from tm3.logs import RateLimit
from tm3.mux.connection import Connection
from tm3.mux.role import IRole
from tm3.mux.session import Session
from tm3.mux.stream import StreamProtocol
from tm3.rp.orphans import Orphans

# One line per 10 s for SYNs refused at the fd ceiling (a flood, when it comes).
_FD_LINES = RateLimit(10.0)


class ServerConnection(StreamProtocol):
    """The RP's TCP connection to a server, for one connection id."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        factory = self.factory
        if isinstance(factory, ServerConnectionFactory):
            factory.socket_closed()
        super().connectionLost(reason)


class ServerConnectionFactory(ClientFactory):
    noisy = False  # one per connection: the end-of-connection line says enough

    def __init__(self, session: Session, role: RemoteRole, conn: Connection) -> None:
        self.session = session
        self.role = role
        self.conn = conn
        self.counted = True  # in role.sockets from the connect until the socket closes

    def buildProtocol(self, addr: Any) -> ServerConnection:
        proto = ServerConnection()
        proto.bind(self.session, self.conn)
        proto.factory = self
        return proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.socket_closed()
        self.role.connect_failed(self.conn, reason)

    def socket_closed(self) -> None:
        if self.counted:
            self.counted = False
            self.role.sockets.n -= 1


@implementer(IRole)
class RemoteRole:
    log = Logger()
    upload_from_pipes = True

    def __init__(
        self,
        session: Session,
        destinations: DestinationPolicy | None = None,
        has_fd_room: Callable[[], bool] = lambda: True,
        sockets: SocketCount | None = None,
    ) -> None:
        self.session = session
        self.has_fd_room = has_fd_room
        self.sockets = sockets if sockets is not None else SocketCount()  # server sockets open, all sessions
        self.destinations = destinations if destinations is not None else DestinationPolicy()
        self.reactor = session.reactor
        self.settings = session.settings
        self.stats = session.stats
        self.connectors: dict[Connection, IConnector] = {}
        self.parked: dict[int, Connection] = {}  # id -> the connection waiting for it
        self.reuse_timers: dict[int, IDelayedCall] = {}
        self.orphans = Orphans(session.reactor, session.settings, session.drop_tail, session.name)
        # id -> until when its in-flight tail is dropped on arrival (at most
        # one entry per id, so bounded by 65536; expired lazily).
        self.tombstones: dict[int, float] = {}
        # Bound once: route runs for every message.
        self._conns = session.conns
        self._push = session.inbound.push

    # -- routing (rules 8 and 9) -----------------------------------------------

    def route(self, msg: Message) -> None:
        cid = msg.conn_id
        conn = self._conns.get(cid)
        if type(msg) is Syn:
            self._syn(conn, msg)
            return
        if conn is None:
            deadline = self.tombstones.get(cid)
            if deadline is not None:
                if self.reactor.seconds() < deadline:
                    self.session.drop_tail(msg)
                    return
                del self.tombstones[cid]
            self.hold_orphan(msg)
            return
        target: Connection | None = conn
        if conn.life.peer_done:
            # The old connection has had its last message: this is the next
            # one's, but for a v2 reset right after a half-close.
            if conn.life.may_reset_after_fin and type(msg) is Fin and msg.seq == conn.rx.next_seq:
                target = conn if msg.reason == REASON_RST else self.parked.get(cid)
            else:
                target = self.parked.get(cid)
        elif cid in self.parked and conn.rx.is_behind(msg.seq):
            target = self.parked[cid]
        if target is None:
            self.hold_orphan(msg)
        else:
            self._push(target, msg)

    def _syn(self, old: Connection | None, msg: Syn) -> None:
        cid = msg.conn_id
        if msg.seq != 0:
            raise ProtocolError(f"SYN for connection {cid} with seq {msg.seq} (a SYN is always seq 0)")
        self.tombstones.pop(cid, None)
        session = self.session
        if old is not None and cid in self.parked:
            raise ProtocolError(f"duplicate SYN for connection {cid} (one is already waiting for the id)")
        conn = session.new_connection(cid, msg.host, msg.port, State.PARKED)
        if old is None:
            session.conns[cid] = conn
        else:
            self.parked[cid] = conn
            self.reuse_timers[cid] = self.reactor.callLater(self.settings.reuse_grace, self._reuse_expired, old)
        session.inbound.push(conn, msg)
        for m in self.orphans.take(cid):
            if conn.life.over:
                session.drop_tail(m)
            else:
                session.inbound.push(conn, m)

    def syn_delivered(self, conn: Connection, msg: Syn) -> None:
        if self.session.conns.get(conn.conn_id) is conn:
            self._start(conn)
        # else: parked behind the id's older connection, which starts it when over

    def _start(self, conn: Connection) -> None:
        if self.session.draining:
            self.session.event(conn, Event.DENIED, "draining")
            return
        limit = self.settings.max_connections
        if limit and len(self.session.live) > limit:
            self.stats.connections_refused += 1
            if self.stats.connections_refused == 1 or self.stats.connections_refused % 1000 == 0:
                self.log.warn(
                    "{session}: {n} connections open, --max-connections {limit}: refusing new ones ({refused} so far)",
                    session=self.session.name,
                    n=len(self.session.live) - 1,
                    limit=limit,
                    refused=self.stats.connections_refused,
                )
            self.session.event(conn, Event.DENIED, "max-connections")
            return
        if not self.has_fd_room():
            self.stats.connections_refused += 1
            if _FD_LINES.allow():
                self.log.warn(
                    "{session}: server sockets at their ceiling for RLIMIT_NOFILE {limit}: refusing new connections "
                    "until some close (pipes and open connections go on; {more} more refused since the last line)",
                    session=self.session.name,
                    limit=soft_limit(),
                    more=_FD_LINES.take_suppressed(),
                )
            self.session.event(conn, Event.DENIED, "fd-limit")
            return
        verdict = self.destinations.check(conn.host, conn.port)
        if verdict.allowed:
            self.session.event(conn, Event.CONNECT)
            return
        self.stats.destinations_denied += 1
        self.log.info(
            "conn {conn_id}: destination {host}:{port} denied by {rule}",
            conn_id=conn.conn_id,
            host=conn.host,
            port=conn.port,
            rule=verdict.rule,
        )
        self.session.event(conn, Event.DENIED)

    def after_fin(self, conn: Connection, messages: list[Message]) -> None:
        for m in messages:
            self.route(m)

    def hold_orphan(self, msg: Message) -> None:
        if not self.session.ended:  # what an ended session still routes must not start timers
            self.orphans.hold(msg)

    def _reuse_expired(self, old: Connection) -> None:
        cid = old.conn_id
        self.reuse_timers.pop(cid, None)
        if old.life.over or self.session.conns.get(cid) is not old:
            return
        self.stats.live_id_reuses += 1
        self.log.warn(
            "{session}: id {conn_id} was reused while its connection to {host}:{port} was not over"
            " {grace} s after the new SYN; resetting the old server connection",
            session=self.session.name,
            conn_id=cid,
            host=old.host,
            port=old.port,
            grace=self.settings.reuse_grace,
        )
        self.session.event(old, Event.ABORT, "id-reused")

    # -- connecting ------------------------------------------------------------

    def connect(self, conn: Connection) -> None:
        factory = ServerConnectionFactory(self.session, self, conn)
        self.sockets.n += 1
        self.connectors[conn] = self.reactor.connectTCP(
            conn.host, conn.port, factory, timeout=self.settings.connect_timeout
        )

    def connect_failed(self, conn: Connection, reason: Failure) -> None:
        self.connectors.pop(conn, None)
        if conn.life.over or self.session.ended:
            return  # we stopped the connect ourselves
        self.stats.connect_failures += 1
        self.log.info(
            "conn {conn_id}: connect to {host}:{port} failed: {why}",
            conn_id=conn.conn_id,
            host=conn.host,
            port=conn.port,
            why=reason.getErrorMessage(),
        )
        self.session.event(conn, Event.CONNECT_FAILED)

    def cancel_connect(self, conn: Connection) -> None:
        connector = self.connectors.pop(conn, None)
        if connector is not None:
            # A real connector's stopConnecting() reports the failed connect
            # synchronously (connect_failed), which sees the connection over.
            try:
                connector.stopConnecting()
            except NotConnectingError:
                pass  # it connected or failed in this same turn: its callback follows

    def peer_reset(self, conn: Connection) -> None:
        # The client aborted: reset the server at once, dropping the queue.
        self.session.inbound.drop_queue(conn)
        self.session.reset_socket(conn)

    # -- ending ------------------------------------------------------------------

    def connection_over(self, conn: Connection) -> None:
        cid = conn.conn_id
        session = self.session
        self.connectors.pop(conn, None)
        if session.conns.get(cid) is conn:
            timer = self.reuse_timers.pop(cid, None)
            if timer is not None and timer.active():
                timer.cancel()
            held = [m for _, m in conn.rx.take_held()]
            parked = self.parked.pop(cid, None)
            if parked is not None and not parked.life.over:
                session.conns[cid] = parked
                self._start(parked)
                self._route_held(held)
            else:
                del session.conns[cid]
                if not conn.life.peer_done:
                    # We ended it before the LP's last message came (connect
                    # failed, server reset): the LP's tail is still in flight.
                    # Drop it on arrival for a while rather than hold it where
                    # a reused id's SYN could take it over (rule 7: the LP
                    # reuses the id only 10 s after it got our FIN).
                    self.tombstones[cid] = self.reactor.seconds() + self.settings.orphan_timeout
                    for m in held:
                        session.drop_tail(m)
                else:
                    for m in held:  # numbered past its FIN: the next connection's
                        self.hold_orphan(m)
        elif self.parked.get(cid) is conn:
            # The parked connection was reset by the LP before it started.
            del self.parked[cid]

    def _route_held(self, held: list[Message]) -> None:
        # This runs from server callbacks and timers too, where no pipe read
        # would catch a ReorderError: a held message the next connection
        # cannot take (a duplicate, beyond its window) ends the session here.
        for m in held:
            try:
                self.route(m)
            except (ProtocolError, ReorderError) as e:
                self.session.protocol_error(f"a message held for id {m.conn_id}", str(e), -1, encode(m)[:16])
            if self.session.ended:
                return

    def session_ended(self) -> None:
        for timer in self.reuse_timers.values():
            if timer.active():
                timer.cancel()
        self.orphans.clear()
        self.tombstones.clear()
        self.parked.clear()
        self.reuse_timers.clear()
        self.connectors.clear()
