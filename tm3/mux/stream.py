"""The socket of one carried connection (to the server on the RP, from the
client on the LP): a half-closeable Twisted protocol that relays between its
transport and the session, and nothing else.

Its :class:`~tm3.mux.flow.WriteGate` is the transport's producer, so a socket
that does not take bytes as fast as the pipes bring them makes the session
queue them (and, past a ceiling, stop reading the pipes) instead of growing
the transport's buffer without bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tm3.mux.flow import (
    WriteGate,
    abort_transport,
    register_producer,
    reset_pending,
    unregister_producer,
)

if TYPE_CHECKING:
    from tm3.mux.connection import Connection
    from tm3.mux.session import Session


@implementer(IHalfCloseableProtocol)
class StreamProtocol(Protocol):
    """Relays between one socket and its connection in a session.

    The RP creates it bound (:meth:`bind` before the connect); the LP binds
    an accepted client once it knows where the connection goes."""

    def __init__(self) -> None:
        self.session: Session | None = None
        self.conn: Connection | None = None
        self.gate = WriteGate(_nothing, self._write_resumed)
        self.aborted = False  # we reset it: the session is done with this socket
        self.read_closed = False
        self.write_closed = False

    def bind(self, session: Session, conn: Connection) -> None:
        self.session = session
        self.conn = conn

    def start_relaying(self) -> None:
        """Register the write gate and hand the socket to the session."""
        transport = self.transport
        assert transport is not None and self.session is not None and self.conn is not None
        register_producer(transport, self.gate)
        self.session.attach(self.conn, self)

    # -- Twisted callbacks -------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        self.start_relaying()

    def dataReceived(self, data: bytes) -> None:
        session, conn = self.session, self.conn
        if session is not None and conn is not None and not self.aborted:
            session.outbound.socket_data(conn, data)

    def readConnectionLost(self) -> None:
        if self.read_closed:
            return  # a TCP transport resumed after its peer's EOF reads the EOF again
        if reset_pending(self.transport):  # a RST reported as EOF: see reset_pending
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self.read_closed = True
        session, conn = self.session, self.conn
        if session is not None and conn is not None and not self.aborted:
            session.socket_eof(conn, self)
        self._close_if_shut_down()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        self._close_if_shut_down()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        session, conn = self.session, self.conn
        if session is not None and conn is not None:
            session.socket_lost(conn, self, reason.check(ConnectionDone) is not None)

    def _close_if_shut_down(self) -> None:
        # Twisted keeps the socket open after both halves are shut down
        # (tcp.Connection.readConnectionLost/_closeWriteConnection): close it.
        if self.read_closed and self.write_closed and self.transport is not None:
            self.transport.loseConnection()

    def _write_resumed(self) -> None:
        session, conn = self.session, self.conn
        if session is not None and conn is not None and not self.aborted:
            session.inbound.drain(conn)

    # -- what the session does with the socket -----------------------------

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

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

    def abort(self) -> None:
        """RST the socket, dropping whatever it had buffered."""
        if self.aborted:
            return
        self.aborted = True
        if self.transport is not None:
            abort_transport(self.transport)


def _nothing() -> None:
    """A paused write gate needs no action: the session reads ``is_blocked``
    whenever it writes."""
