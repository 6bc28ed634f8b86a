"""A remote proxy driven entirely in memory, for tests.

Pipes and server connections are ``StringTransport``s, the reactor is a
``MemoryReactorClock`` whose connectors behave like Twisted's real ones when
told to stop (``stopConnecting`` reports the failed connect synchronously, as
``twisted.internet.base.BaseConnector`` does). Nothing touches the network.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, NotConnectingError, UserError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from tm3.core import wire
from tm3.mux.pipes import PipeProtocol
from tm3.mux.session import Session
from tm3.mux.settings import Settings
from tm3.rp.role import RemoteRole, ServerConnection
from tm3.rp.service import Multiplexer, PipeFactory


class Connector:
    """Like ``twisted.internet.base.BaseConnector`` as far as the RP can see."""

    def __init__(self, factory: Any, host: str, port: int) -> None:
        self.factory = factory
        self.address = IPv4Address("TCP", host, port)
        self.state = "connecting"
        self.stopped = False

    def stopConnecting(self) -> None:
        if self.state != "connecting":
            raise NotConnectingError("we're not trying to connect")
        self.stopped = True
        self.state = "disconnected"
        self.factory.clientConnectionFailed(self, Failure(UserError()))

    def disconnect(self) -> None:
        if self.state == "connecting":
            self.stopConnecting()

    def connect(self) -> None:
        pass

    def getDestination(self) -> IPv4Address:
        return self.address


class Reactor(MemoryReactorClock):
    def connectTCP(self, host, port, factory, timeout=30, bindAddress=None):  # type: ignore[no-untyped-def]
        self.tcpClients.append((host, port, factory, timeout, bindAddress))
        connector = Connector(factory, host, port)
        factory.startedConnecting(connector)
        self.connectors.append(connector)
        return connector


class PipeTransport(StringTransport):
    """A pipe's transport: counts ``writeSequence`` calls and decodes what
    the RP wrote."""

    def __init__(self, port: int, host: str = "10.9.0.1") -> None:
        super().__init__(peerAddress=IPv4Address("TCP", host, port))
        self.write_sequences = 0
        self.decoder = wire.Decoder()
        self._seen = 0

    def writeSequence(self, data: Any) -> None:
        self.write_sequences += 1
        super().writeSequence(data)

    def new_messages(self) -> list[wire.Message]:
        value = self.value()
        chunk, self._seen = value[self._seen :], len(value)
        return list(self.decoder.feed(chunk))


class ServerTransport(StringTransport):
    """A server socket's transport: half-closeable, like a TCP transport, and
    optionally pausing its producer after taking ``pause_after`` more bytes
    (a server that stops reading)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", host, port))
        self.write_closed = False
        self.pause_after: int | None = None

    def loseWriteConnection(self) -> None:
        # A TCP transport shuts down its write side once its buffer is
        # empty (at once here), then tells a half-closeable protocol.
        if not self.write_closed:
            self.write_closed = True
            self.protocol.writeConnectionLost()

    def write(self, data: bytes) -> None:
        assert not self.write_closed, "write after loseWriteConnection"
        assert not self.disconnecting, "write after loseConnection"
        super().write(data)
        if self.pause_after is not None:
            self.pause_after -= len(data)
            if self.pause_after <= 0:
                self.pause_after = None
                self.producer.pauseProducing()


class RP:
    """A Multiplexer + PipeFactory with in-memory pipes and servers."""

    def __init__(self, n: int = 2, **settings: Any) -> None:
        self.n = n
        self.reactor = Reactor()
        self.settings = Settings(**settings)
        self.mux = Multiplexer(self.reactor, self.settings)
        self.mux.startService()
        # Pipes that send nothing count as v1 at the next reactor turn, not
        # after the real second (add_pipe takes that turn).
        self.factory = PipeFactory(n, self.reactor, self.mux.start_session, hello_wait=0.0)
        self.pipes: list[tuple[PipeProtocol, PipeTransport]] = []
        self.servers: dict[int, tuple[ServerConnection, ServerTransport]] = {}
        self._port = 5000

    # -- pipes -------------------------------------------------------------

    def add_pipe(self, host: str = "10.9.0.1") -> tuple[PipeProtocol, PipeTransport]:
        """A pipe from ``host`` (another address: another LP)."""
        self._port += 1
        transport = PipeTransport(self._port, host)
        proto = self.factory.buildProtocol(transport.getPeer())
        assert isinstance(proto, PipeProtocol)
        proto.makeConnection(transport)
        if proto.greeter is not None:
            self.reactor.advance(0)  # a silent pipe is v1
        return proto, transport

    def up(self, host: str = "10.9.0.1") -> Session:
        """Connect a complete set of pipes from ``host``; returns the new session."""
        self.pipes = [self.add_pipe(host) for _ in range(self.n)]
        return self.session

    @property
    def session(self) -> Session:
        session = self.mux.session
        assert session is not None
        return session

    @property
    def role(self) -> RemoteRole:
        role = self.session.role
        assert isinstance(role, RemoteRole)
        return role

    def send(self, *messages: wire.Message, pipe: int = 0) -> None:
        self.send_raw(b"".join(wire.encode(m) for m in messages), pipe=pipe)

    def send_raw(self, data: bytes, pipe: int = 0) -> None:
        self.pipes[pipe][0].dataReceived(data)

    def flush(self) -> None:
        self.reactor.advance(0)

    def sent_per_pipe(self) -> list[list[wire.Message]]:
        """New messages written to each pipe since the last look."""
        self.flush()
        return [t.new_messages() for _, t in self.pipes]

    def sent(self) -> list[wire.Message]:
        """New messages written to any pipe, by (conn_id, seq)."""
        out = [m for per in self.sent_per_pipe() for m in per]
        return sorted(out, key=lambda m: (m.conn_id, m.seq))

    # -- servers -----------------------------------------------------------

    def accept(self, index: int = -1) -> tuple[ServerConnection, ServerTransport]:
        """Complete the connectTCP call number ``index``."""
        if index < 0:
            index += len(self.reactor.tcpClients)
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        connector = self.reactor.connectors[index]
        assert connector.state == "connecting"
        connector.state = "connected"
        transport = ServerTransport(host, port)
        proto = factory.buildProtocol(transport.getPeer())
        transport.protocol = proto
        proto.makeConnection(transport)
        self.servers[index] = (proto, transport)
        return proto, transport

    def refuse(self, index: int = -1, reason: BaseException | None = None) -> None:
        if index < 0:
            index += len(self.reactor.tcpClients)
        _, _, factory, _, _ = self.reactor.tcpClients[index]
        connector = self.reactor.connectors[index]
        assert connector.state == "connecting"
        connector.state = "disconnected"
        from twisted.internet.error import ConnectionRefusedError

        factory.clientConnectionFailed(connector, Failure(reason or ConnectionRefusedError()))

    def close_server(self, index: int, reason: BaseException | None = None) -> None:
        """The server's socket is gone (both ways)."""
        proto, _ = self.servers[index]
        proto.connectionLost(Failure(reason or ConnectionDone()))
