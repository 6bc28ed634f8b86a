"""A local proxy driven entirely in memory, for tests.

The real :class:`~tm3.lp.service.LocalProxy` runs on rp_harness's
``MemoryReactorClock``: its dialer's ``connectTCP`` calls are recorded there
and completed here with :class:`~rp_harness.PipeTransport`\\ s (the RP's end
of each pipe is the test: it reads what the LP wrote with a
:class:`~tm3.core.wire.Decoder` and writes messages back). The listener is a
real :class:`~tm3.listening.ListeningService` on a fake port that records
whether it is accepting, and each application client is the proxy's own
protocol (forward or SOCKS5) on a :class:`ClientTransport`. Nothing touches
the network.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.python.failure import Failure

from tests.support.rp_harness import PipeTransport, Reactor, ServerTransport
from tm3.core import wire
from tm3.lp.clients import ClientConnection, forward_factory, socks_factory
from tm3.lp.role import LocalRole
from tm3.lp.service import LocalProxy
from tm3.mux.pipes import PipeProtocol
from tm3.mux.session import Session
from tm3.mux.settings import Settings

RP_HOST, RP_PORT = "10.9.0.1", 6000
TARGET = ("93.184.216.34", 443)  # where a forward listener sends every client


class FakePort:
    """A listening port as far as the LP can see: it only starts and stops
    reading (accepting)."""

    def __init__(self, port: int, interface: str) -> None:
        self.address = IPv4Address("TCP", interface or "0.0.0.0", port)
        self.reading = True  # a real port reads as soon as it listens

    def startReading(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def stopListening(self) -> None:
        self.reading = False

    def getHost(self) -> IPv4Address:
        return self.address


class LPReactor(Reactor):
    def listenTCP(self, port, factory, backlog=50, interface=""):  # type: ignore[no-untyped-def]
        self.tcpServers.append((port, factory, backlog, interface))
        return FakePort(port, interface)


class ClientTransport(ServerTransport):
    """An application client's transport: half-closeable, asserting that
    nothing is written after it was closed or reset.

    ``holding`` models a client that has not read what it was sent yet: the
    bytes stay in ``dataBuffer`` (where a Twisted TCP transport keeps what
    the kernel has not taken) until :meth:`client_reads`. ``handle`` stands
    for the socket under it (``getHandle``), for the TIOCOUTQ check."""

    def __init__(self, port: int) -> None:
        super().__init__("127.0.0.1", port)
        self.holding = False
        self.dataBuffer = b""
        self.offset = 0
        self.handle: socket.socket | None = None

    def write(self, data: bytes) -> None:
        assert self.connected, "write after the connection was lost"
        super().write(data)
        if self.holding:
            self.dataBuffer += data

    # As twisted.internet.abstract.FileDescriptor: pausing is always
    # allowed, and resuming a closing transport does nothing (a
    # StringTransport raises for both after loseConnection).
    def pauseProducing(self) -> None:
        self.producerState = "paused"

    def resumeProducing(self) -> None:
        if self.connected and not self.disconnecting:
            super().resumeProducing()

    def client_reads(self) -> None:
        self.dataBuffer = b""

    def getHandle(self) -> socket.socket:
        if self.handle is None:
            raise AttributeError("no socket under this transport")
        return self.handle


class LP:
    """A LocalProxy with in-memory pipes and clients. ``mode`` is
    ``"forward"`` (every client goes to :data:`TARGET`) or ``"socks"``."""

    def __init__(self, n: int = 2, mode: str = "forward", **settings: Any) -> None:
        self.n = n
        self.reactor = LPReactor()
        self.settings = Settings(**settings)
        endpoint = TCP4ClientEndpoint(self.reactor, RP_HOST, RP_PORT, timeout=10)
        self.proxy = LocalProxy(self.reactor, endpoint, n, self.settings, f"{RP_HOST}:{RP_PORT}")
        self.stats = self.proxy.stats
        factory = socks_factory(self.proxy) if mode == "socks" else forward_factory(self.proxy, *TARGET)
        self.listener = self.proxy.add_listener(
            TCP4ServerEndpoint(self.reactor, 1080, interface="127.0.0.1"), factory, mode
        )
        self.proxy.startService()
        self.pipes: list[tuple[PipeProtocol, PipeTransport]] = []
        self.dialed = 0  # connectTCP calls completed or failed so far
        self._client_port = 40000

    # -- pipes -------------------------------------------------------------

    @property
    def accepting(self) -> bool:
        port = self.listener.port
        assert isinstance(port, FakePort)
        return port.reading

    def dials(self) -> list[tuple[str, int]]:
        """Where the pipe connects not yet answered go."""
        return [(h, p) for h, p, *_ in self.reactor.tcpClients[self.dialed :]]

    def connect_pipe(self) -> tuple[PipeProtocol, PipeTransport]:
        """Complete the oldest pipe connect still pending."""
        host, port, factory, _, _ = self.reactor.tcpClients[self.dialed]
        self.dialed += 1
        transport = PipeTransport(port)
        wrapper = factory.buildProtocol(transport.getPeer())
        transport.protocol = wrapper
        wrapper.makeConnection(transport)
        return wrapper._wrappedProtocol, transport

    def fail_pipe(self, reason: BaseException | None = None) -> None:
        """The oldest pipe connect still pending fails."""
        _, _, factory, _, _ = self.reactor.tcpClients[self.dialed]
        connector = self.reactor.connectors[self.dialed]
        self.dialed += 1
        factory.clientConnectionFailed(connector, Failure(reason or ConnectionRefusedError()))

    def up(self) -> Session:
        """Complete the pending dial: the ``n`` pipes connect, a session starts."""
        assert len(self.dials()) == self.n, self.dials()
        self.pipes = [self.connect_pipe() for _ in range(self.n)]
        return self.session

    @property
    def session(self) -> Session:
        session = self.proxy.session
        assert session is not None
        return session

    @property
    def role(self) -> LocalRole:
        role = self.session.role
        assert isinstance(role, LocalRole)
        return role

    def lose_pipe(self, index: int, reason: BaseException | None = None) -> None:
        self.pipes[index][0].connectionLost(Failure(reason or ConnectionLost()))

    # -- the RP's side of the pipes -----------------------------------------

    def send(self, *messages: wire.Message, pipe: int = 0) -> None:
        """The RP writes ``messages`` on pipe number ``pipe``."""
        self.send_raw(b"".join(wire.encode(m) for m in messages), pipe=pipe)

    def send_raw(self, data: bytes, pipe: int = 0) -> None:
        self.pipes[pipe][1].protocol.dataReceived(data)

    def received(self, by_pipe: bool = False) -> Any:
        """What the LP wrote on the pipes since the last look (the end of
        the reactor turn flushes it): all messages by (id, seq), or one list
        per pipe in the order written."""
        self.reactor.advance(0)
        per_pipe = [t.new_messages() for _, t in self.pipes]
        if by_pipe:
            return per_pipe
        return sorted((m for msgs in per_pipe for m in msgs), key=lambda m: (m.conn_id, m.seq))

    # -- application clients -------------------------------------------------

    def accept(self) -> tuple[ClientConnection, ClientTransport]:
        """A client connects to the listener."""
        self._client_port += 1
        transport = ClientTransport(self._client_port)
        proto = self.listener.factory.buildProtocol(transport.getPeer())
        transport.protocol = proto
        proto.makeConnection(transport)
        return proto, transport

    @staticmethod
    def reset(client: ClientConnection) -> None:
        """The client resets its connection (TCP RST)."""
        client.transport.connected = False
        client.connectionLost(Failure(ConnectionLost("Connection reset by peer")))

    @staticmethod
    def closed(client: ClientConnection) -> None:
        """The socket the LP closed (or aborted) is gone: what the reactor
        reports after ``loseConnection`` or ``abortConnection``."""
        transport = client.transport
        assert transport.disconnecting
        transport.connected = False
        client.connectionLost(Failure(ConnectionAborted() if transport.disconnected else ConnectionDone()))
