"""Real TCP servers for the RP's integration tests, on 127.0.0.1, port 0.

Every server is a :class:`TestServer` (``await server.start()``, ``port``,
``await server.stop()``) around a factory that keeps every connection it
accepted, so a test can await the n-th connection and, on each one, the end
of the connection and how it ended (:meth:`TrackedProtocol.lost`: an orderly
close or a reset).

- :class:`EchoProtocol`: echoes, with backpressure; half-closeable: after the
  client's FIN it echoes what is left, then closes.
- :class:`SourceProtocol`: sends ``size`` deterministic bytes
  (:class:`~tests.support.pattern.Pattern`) as fast as its transport takes
  them, then closes in order.
- :class:`SinkProtocol`: hashes everything it receives; after the client's FIN
  it reports ``"<count> <sha256 hex>\\n"`` (also as :meth:`report`), sends
  ``extra`` pattern bytes, and closes.
- :class:`ResetAfterProtocol`: sends ``k`` bytes, waits until the kernel has
  sent them, then aborts (RST).
- :class:`NeverReadProtocol`: does not read until told to
  (:meth:`NeverReadProtocol.start_reading`); then it behaves like a sink.
- :class:`HalfCloseFirstProtocol`: sends a greeting, half-closes its side at
  once, and keeps reading (hashing) until the client's FIN.
- :class:`TrackedProtocol` itself holds a connection open and records what it
  gets: the "tell me when my connection was reset" server.
"""

from __future__ import annotations

import fcntl
import hashlib
import socket
import struct
import termios
from typing import Any

from twisted.internet import defer, error
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.support.pattern import Pattern
from tests.support.producers import PatternProducer, Pausable
from tests.support.waiting import Event


def unsent_bytes(transport: Any) -> int:
    """Bytes the kernel still holds in the socket's send queue (Linux SIOCOUTQ)."""
    raw = fcntl.ioctl(transport.getHandle().fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", raw)[0])


def twisted_buffered(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds in user space, not yet given to the kernel."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def was_reset(reason: Failure | BaseException) -> bool:
    """Whether a connection ended otherwise than by an orderly close."""
    if isinstance(reason, Failure):
        reason = reason.value
    return not isinstance(reason, error.ConnectionDone)


class TrackedProtocol(Protocol):
    """Holds the connection open, counts what it receives, and tells when and
    how the connection ended (``lost`` fires with the exception, not a
    Failure, so that a reset is a result to check, not an error)."""

    def __init__(self) -> None:
        self.received = 0
        self.lost = Event()
        self.eof = Event()  # the client's FIN (half-closeable subclasses)
        self.index = -1

    def connectionMade(self) -> None:
        self.factory.made(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.fire(reason.value)
        self.factory.gone(self)

    @property
    def reset(self) -> bool:
        assert self.lost.fired
        return was_reset(self.lost.result)


class _ReadThrottle(Pausable):
    """Registered on a transport, it stops the protocol reading while the
    transport's write buffer is full (how a well-behaved echo server works)."""

    def __init__(self, transport: Any) -> None:
        super().__init__()
        self.transport = transport

    def on_pause(self) -> None:
        self.transport.pauseProducing()

    def on_resume(self) -> None:
        self.transport.resumeProducing()


@implementer(IHalfCloseableProtocol)
class EchoProtocol(TrackedProtocol):
    def connectionMade(self) -> None:
        self.transport.registerProducer(_ReadThrottle(self.transport), True)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        self.eof.fire()
        self.transport.unregisterProducer()
        self.transport.loseConnection()  # after the echo is flushed

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class SourceProtocol(TrackedProtocol):
    """Writes ``size`` pattern bytes as fast as the transport takes them
    (a :class:`PatternProducer`), then closes in order."""

    def __init__(self, size: int, seed: int = 1, sndbuf: int | None = None) -> None:
        super().__init__()
        self.size = size
        self.seed = seed
        self.sndbuf = sndbuf
        self.writer: PatternProducer | None = None

    def connectionMade(self) -> None:
        if self.sndbuf is not None:
            self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        super().connectionMade()
        self.writer = PatternProducer(self.transport, self.size, self.seed)
        self.writer.done.wait().addCallback(lambda _: self.transport.loseConnection())

    @property
    def written(self) -> int:
        return 0 if self.writer is None else self.writer.written

    @property
    def paused(self) -> bool:
        """Whether the transport has paused the writer (its buffer is full)."""
        return self.writer is not None and self.writer.paused

    def readConnectionLost(self) -> None:
        self.eof.fire()  # keep sending: the client only finished its side

    def writeConnectionLost(self) -> None:
        pass


@implementer(IHalfCloseableProtocol)
class SinkProtocol(TrackedProtocol):
    """Hashes what it receives; on the client's FIN reports count and digest
    (to the client and as ``report``), sends ``extra`` pattern bytes, closes."""

    def __init__(self, extra: int = 0, seed: int = 2) -> None:
        super().__init__()
        self.hash = hashlib.sha256()
        self.extra = extra
        self.seed = seed
        self.report = Event()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.hash.update(data)

    def readConnectionLost(self) -> None:
        self.eof.fire()
        result = (self.received, self.hash.hexdigest())
        self.report.fire(result)
        self.transport.write(f"{result[0]} {result[1]}\n".encode())
        for chunk in Pattern(self.seed).chunks(self.extra):
            self.transport.write(chunk)
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


@implementer(IPushProducer)
class ResetAfterProtocol(TrackedProtocol):
    """Sends ``k`` pattern bytes; once the kernel has sent them all, aborts."""

    def __init__(self, k: int, seed: int = 3, reactor: Any = None) -> None:
        super().__init__()
        self.k = k
        self.pattern = Pattern(seed)
        self.reactor = reactor
        self.written = 0
        self.aborted = Event()
        self._poll: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # A pull producer: resumeProducing is called each time the transport's
        # buffer is empty, so "all written" means "all handed to the kernel".
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.written < self.k:
            n = min(65536, self.k - self.written)
            self.transport.write(self.pattern.chunk(self.written, n))
            self.written += n
        else:
            self.transport.unregisterProducer()
            self._wait_sent()

    def _wait_sent(self) -> None:
        self._poll = None
        if not self.connected:
            return
        if unsent_bytes(self.transport) > 0:
            self._poll = self.reactor.callLater(0.005, self._wait_sent)
            return
        self.aborted.fire()
        self.transport.abortConnection()

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._poll is not None and self._poll.active():
            self._poll.cancel()
        super().connectionLost(reason)


@implementer(IHalfCloseableProtocol)
class NeverReadProtocol(SinkProtocol):
    """Stops reading as soon as it connects; :meth:`start_reading` turns it
    into a sink (hash, report on the client's FIN)."""

    def __init__(self, rcvbuf: int | None = None) -> None:
        super().__init__()
        self.rcvbuf = rcvbuf
        self.reading = False

    def connectionMade(self) -> None:
        if self.rcvbuf is not None:
            self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        self.transport.pauseProducing()
        super().connectionMade()

    def start_reading(self) -> None:
        self.reading = True
        self.transport.resumeProducing()


@implementer(IHalfCloseableProtocol)
class HalfCloseFirstProtocol(SinkProtocol):
    """Sends ``greeting`` and half-closes at once, then keeps reading until the
    client's FIN (``report`` fires with count and digest), then closes."""

    def __init__(self, greeting: bytes) -> None:
        super().__init__()
        self.greeting = greeting

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(self.greeting)
        self.transport.loseWriteConnection()

    def readConnectionLost(self) -> None:
        self.eof.fire()
        self.report.fire((self.received, self.hash.hexdigest()))
        self.transport.loseConnection()


class TrackingFactory(Factory):
    def __init__(self, make: Any) -> None:
        self.make = make
        self.protocols: list[TrackedProtocol] = []
        self.open: set[TrackedProtocol] = set()
        self._waiting: dict[int, Event] = {}

    def buildProtocol(self, addr: Any) -> TrackedProtocol:
        proto = self.make()
        proto.factory = self
        return proto

    def made(self, proto: TrackedProtocol) -> None:
        proto.index = len(self.protocols)
        self.protocols.append(proto)
        self.open.add(proto)
        self._event(proto.index).fire(proto)

    def gone(self, proto: TrackedProtocol) -> None:
        self.open.discard(proto)

    def _event(self, index: int) -> Event:
        ev = self._waiting.get(index)
        if ev is None:
            ev = self._waiting[index] = Event()
        return ev

    def connection(self, index: int = 0) -> defer.Deferred[Any]:
        """Fires with the ``index``-th accepted connection (0-based)."""
        return self._event(index).wait()


class TestServer:
    """A listening server on 127.0.0.1 whose connections are tracked."""

    __test__ = False  # not a pytest class

    def __init__(self, reactor: Any, make: Any) -> None:
        self.reactor = reactor
        self.factory = TrackingFactory(make)
        self.listening: Any = None
        self.port = 0

    async def start(self) -> TestServer:
        # Twisted's default backlog of 50 overflows when hundreds of connects
        # arrive at once, and the kernel then resets some of them.
        self.listening = self.reactor.listenTCP(0, self.factory, backlog=1024, interface="127.0.0.1")
        self.port = self.listening.getHost().port
        return self

    def connection(self, index: int = 0) -> defer.Deferred[Any]:
        return self.factory.connection(index)

    @property
    def protocols(self) -> list[Any]:
        return self.factory.protocols

    async def stop(self) -> None:
        if self.listening is not None:
            listening, self.listening = self.listening, None
            await listening.stopListening()
        waits = []
        for proto in list(self.factory.open):
            if proto.transport is not None:
                proto.transport.abortConnection()
            waits.append(proto.lost.wait())
        if waits:
            await defer.DeferredList(waits)


def echo(reactor: Any) -> TestServer:
    return TestServer(reactor, EchoProtocol)


def source(reactor: Any, size: int, seed: int = 1, sndbuf: int | None = None) -> TestServer:
    return TestServer(reactor, lambda: SourceProtocol(size, seed, sndbuf))


def sink(reactor: Any, extra: int = 0, seed: int = 2) -> TestServer:
    return TestServer(reactor, lambda: SinkProtocol(extra, seed))


def reset_after(reactor: Any, k: int, seed: int = 3) -> TestServer:
    return TestServer(reactor, lambda: ResetAfterProtocol(k, seed, reactor))


def never_read(reactor: Any, rcvbuf: int | None = None) -> TestServer:
    return TestServer(reactor, lambda: NeverReadProtocol(rcvbuf))


def half_close_first(reactor: Any, greeting: bytes) -> TestServer:
    return TestServer(reactor, lambda: HalfCloseFirstProtocol(greeting))


def watch(reactor: Any) -> TestServer:
    return TestServer(reactor, TrackedProtocol)
