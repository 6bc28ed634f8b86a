"""The local proxy's role in a session: connections begin here.

The LP opens each connection itself (an id per docs/protocol.md rule 7, then
the SYN), never receives a SYN, and drops what the RP sends for an id that
is over here (counted). When the server resets a connection, the RP's 0x99
comes after every byte the server sent before the reset: over TCP those
bytes reach the client before the RST, so the LP writes them all and resets
the client only once it has them (:meth:`ClientConnection.reset_when_flushed`).
"""

from __future__ import annotations

from zope.interface import implementer

from tm3.core.ids import IdAllocator
from tm3.core.lifecycle import LifecycleError
from tm3.core.wire import Message, ProtocolError, Syn, encode_syn
from tm3.lp.clients import ClientConnection
from tm3.mux.connection import Connection
from tm3.mux.role import IRole
from tm3.mux.session import Session


@implementer(IRole)
class LocalRole:
    upload_from_pipes = False

    def __init__(self, session: Session) -> None:
        self.session = session
        self.ids = IdAllocator(session.reactor.seconds)
        # Bound once: route runs for every message.
        self._conns = session.conns
        self._push = session.inbound.push

    def open(self, host: str, port: int) -> Connection:
        """Start a connection to ``host:port`` (IPv4): allocate an id, send
        the SYN. Raises ``IdsExhausted``, or ``ValueError`` for a bad address."""
        cid = self.ids.allocate()
        try:
            syn = encode_syn(cid, host, port)
        except ValueError:
            self.ids.release(cid)
            raise
        session = self.session
        conn = session.new_connection(cid, host, port)
        session.conns[cid] = conn
        session.outbound.send(conn, syn)
        return conn

    def route(self, msg: Message) -> None:
        if type(msg) is Syn:
            raise ProtocolError(f"the RP sent a SYN (for connection {msg.conn_id}); only the LP opens connections")
        conn = self._conns.get(msg.conn_id)
        if conn is None:
            self.session.drop_tail(msg)  # the tail of a connection that is over here
        else:
            self._push(conn, msg)

    def syn_delivered(self, conn: Connection, msg: Syn) -> None:
        raise ProtocolError(f"the RP sent a SYN (for connection {msg.conn_id}); only the LP opens connections")

    def after_fin(self, conn: Connection, messages: list[Message]) -> None:
        for m in messages:
            self.session.drop_tail(m)

    def connect(self, conn: Connection) -> None:
        raise LifecycleError("the LP's connections start from an accepted socket; they never connect")

    def cancel_connect(self, conn: Connection) -> None:
        pass  # the client's socket is attached as soon as the SYN is sent

    def peer_reset(self, conn: Connection) -> None:
        session = self.session
        chunks = session.inbound.take_queue(conn)
        stream = session.detach(conn)
        if isinstance(stream, ClientConnection):
            stream.reset_when_flushed(chunks)
        # else: the client's socket is gone already; nothing is left to reset

    def connection_over(self, conn: Connection) -> None:
        if self.session.conns.get(conn.conn_id) is conn:
            del self.session.conns[conn.conn_id]
            # The id's 10 s quarantine (rule 7) starts once our last message
            # for it is on a pipe, not while it still waits for one.
            cid = conn.conn_id
            self.session.outbound.after_sent(conn, lambda: self.ids.release(cid))

    def session_ended(self) -> None:
        pass
