"""The LP's application sockets: how an accepted connection learns where it
goes, and how it is carried.

- :class:`ClientConnection` is an accepted application socket. Its
  destination comes from the interception mode: the static target of a
  forward, ``SO_ORIGINAL_DST`` for transparent mode (:func:`transparent_factory`),
  or the SOCKS5 request (:class:`SocksClientConnection`).
- Once the destination is known the proxy opens a connection in its session
  (the SYN goes out) and the socket relays like any other
  :class:`~tm3.mux.stream.StreamProtocol`.
"""

from __future__ import annotations

import fcntl
import struct
import termios
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from tm3.logs import RateLimit
from tm3.lp.resolver import ResolveError, ResolverBusy, ResolveTimeout
from tm3.lp.socks import (
    ADDRESS_TYPE_NOT_SUPPORTED,
    ATYP_DOMAIN,
    ATYP_IPV6,
    GENERAL_FAILURE,
    HOST_UNREACHABLE,
    NETWORK_UNREACHABLE,
    Socks5Protocol,
    SocksError,
)
from tm3.mux.flow import abort_transport, reset_pending, unregister_producer
from tm3.mux.stream import StreamProtocol

if TYPE_CHECKING:
    from tm3.lp.service import LocalProxy

# How long a client that does not read may delay the reset that follows a
# server's reset (LocalRole.peer_reset): then it is reset anyway.
RESET_FLUSH_LIMIT = 10.0
RESET_FLUSH_POLL = 0.01

Destination = Callable[["ClientConnection"], "tuple[str, int] | None"]


class NoRoute(Exception):
    """The LP cannot carry a new connection now (no session, no free id, not IPv4)."""


# Refused clients (no session, --max-connections) can come by the thousand:
# one line a second at info, the rest at debug (and counted).
_REFUSALS = RateLimit(1.0)


class ClientConnection(StreamProtocol):
    """An application connection accepted by the LP.

    The connection is carried once :meth:`begin` names its destination; until
    then (a SOCKS handshake, a name lookup) bytes go to :meth:`before_begin`.
    """

    log = Logger()

    def __init__(self, proxy: LocalProxy, destination: Destination) -> None:
        super().__init__()
        self.proxy = proxy
        self.destination = destination
        self._reset_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.proxy.client_opened()
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        try:
            dest = self.destination(self)
        except OSError as e:
            self.log.warn(
                "{peer}: cannot tell where this connection was going ({why}); resetting it", peer=self.peer(), why=e
            )
            self.abort()
            return
        if dest is not None:
            self.begin(*dest)

    def peer(self) -> str:
        p = self.transport.getPeer() if self.transport is not None else None
        return f"{getattr(p, 'host', '?')}:{getattr(p, 'port', '?')}"

    def begin(self, host: str, port: int) -> bool:
        """Carry this connection to ``host:port`` over the pipes."""
        try:
            self.open_connection(host, port)
        except NoRoute as e:
            level, also = _REFUSALS.level()
            self.log.emit(
                level,
                "{peer} -> {host}:{port}: {why}; resetting{also}",
                peer=self.peer(),
                host=host,
                port=port,
                why=e,
                also=also,
            )
            self.abort()
            return False
        self.start_relaying()
        return True

    def open_connection(self, host: str, port: int) -> None:
        """Send the SYN; raises :class:`NoRoute` when the LP cannot."""
        session, conn = self.proxy.open(host, port)
        self.bind(session, conn)

    def before_begin(self, data: bytes) -> None:
        """Bytes that came before the destination was known."""
        self.log.warn("{peer}: data before the connection began; resetting", peer=self.peer())
        self.abort()

    def dataReceived(self, data: bytes) -> None:
        if self.conn is not None:
            StreamProtocol.dataReceived(self, data)
        elif not self.aborted:
            self.before_begin(data)

    def readConnectionLost(self) -> None:
        if self.conn is None:
            self.abort()  # gone before it said where to
        else:
            StreamProtocol.readConnectionLost(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.proxy.client_closed()
        call, self._reset_call = self._reset_call, None
        if call is not None and call.active():
            call.cancel()
        StreamProtocol.connectionLost(self, reason)

    def reset_when_flushed(self, chunks: list[bytes]) -> None:
        """Write ``chunks``, then reset the connection once the client has
        all that was written to it (or after :data:`RESET_FLUSH_LIMIT`)."""
        transport = self.transport
        if transport is None or self.aborted:
            return
        self.aborted = True  # the session is done with this socket
        unregister_producer(transport)
        transport.pauseProducing()  # type: ignore[attr-defined]
        for chunk in chunks:
            transport.write(chunk)
        reactor = self.proxy.reactor
        deadline = reactor.seconds() + RESET_FLUSH_LIMIT

        def check() -> None:
            self._reset_call = None
            if _unsent_bytes(transport) and reactor.seconds() < deadline:
                self._reset_call = reactor.callLater(RESET_FLUSH_POLL, check)
            else:
                abort_transport(transport)

        check()

    def abort(self) -> None:
        call, self._reset_call = self._reset_call, None
        if call is not None and call.active():  # a reset is waiting for a flush: now
            call.cancel()
            if self.transport is not None:
                abort_transport(self.transport)
            return
        StreamProtocol.abort(self)


def _unsent_bytes(transport: Any) -> int:
    """Bytes written to a TCP transport that its peer has not acknowledged:
    Twisted's buffer plus (Linux) the kernel's send queue."""
    n = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
    n += getattr(transport, "_tempDataLen", 0)
    try:
        raw = fcntl.ioctl(transport.getHandle().fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
        n += struct.unpack("i", raw)[0]
    except (AttributeError, OSError, ValueError):
        pass
    return n


class SocksClientConnection(Socks5Protocol, ClientConnection):  # type: ignore[misc]
    """A SOCKS5 client: the handshake (:class:`~tm3.lp.socks.Socks5Protocol`)
    names the destination, then the connection is carried like any other.

    The success reply goes out as soon as the SYN is sent: whether the RP's
    connect works is only known later (a FIN 0x99 then resets the client),
    and waiting for the server's first byte would deadlock protocols where
    the client speaks first.

    A name is resolved by the LP (:mod:`tm3.lp.resolver`) first, within
    ``--resolve-timeout``: reply 0x04 (host unreachable) when it does not
    resolve, 0x01 when the system resolver's threads are all busy.

    SOCKS listeners accept while no session is up (a client in the backlog
    could not be told anything): a request then waits for the session,
    within the handshake's ``timeout`` (``--socks-timeout``), after which the
    client gets reply 0x03, network unreachable.
    """

    def __init__(self, proxy: LocalProxy, timeout: float | None = None) -> None:
        Socks5Protocol.__init__(self, proxy.reactor, timeout)
        ClientConnection.__init__(self, proxy, _no_destination_yet)

    def socks_connect(self, host: str, port: int, atyp: int) -> Deferred[None]:
        if atyp == ATYP_IPV6:
            raise SocksError(ADDRESS_TYPE_NOT_SUPPORTED, f"TM3 carries IPv4 only, not [{host}]")
        if atyp == ATYP_DOMAIN:
            d: Deferred[str] = self.proxy.resolve(host)
            d.addErrback(self._unresolved, host)
        else:
            d = succeed(host)
        return d.addCallback(self._open_in_session, port)

    def _unresolved(self, f: Failure, host: str) -> str:
        f.trap(ResolveError)  # a cancel (the client left, the SOCKS timeout) goes on as it is
        error = f.value
        stats = self.proxy.stats
        if isinstance(error, ResolveTimeout):
            stats.resolve_timeouts += 1
            raise SocksError(HOST_UNREACHABLE, f"cannot resolve {host!r} in {error.seconds:g} s")
        stats.resolve_failures += 1
        if isinstance(error, ResolverBusy):
            raise SocksError(GENERAL_FAILURE, f"cannot resolve {host!r} now: {error}")
        raise SocksError(HOST_UNREACHABLE, f"cannot resolve {host!r} to an IPv4 address: {error}")

    def _open_in_session(self, host: str, port: int) -> Deferred[None] | None:
        if self.proxy.session is not None or self._timeout is None:
            self._open(host, port)
            return None
        # Cancelled (by the timeout, or the client leaving) while waiting:
        # when_session forgets the waiter.
        return self.proxy.when_session().addCallback(lambda _session: self._open(host, port))

    def socks_timed_out(self) -> SocksError:
        if self.proxy.session is None:
            return SocksError(NETWORK_UNREACHABLE, f"no pipe session to the RP at {self.proxy.remote}")
        return SocksError(HOST_UNREACHABLE, "the name did not resolve in time")

    def _open(self, host: str, port: int) -> None:
        try:
            self.open_connection(host, port)
        except NoRoute as e:
            raise SocksError(NETWORK_UNREACHABLE if self.proxy.session is None else GENERAL_FAILURE, str(e)) from None

    def socks_established(self, leftover: bytes) -> None:
        self.start_relaying()
        if leftover:
            StreamProtocol.dataReceived(self, leftover)

    def relay_data(self, data: bytes) -> None:
        StreamProtocol.dataReceived(self, data)

    def relay_eof(self) -> None:
        session, conn = self.session, self.conn
        if session is not None and conn is not None and not self.aborted and not self.read_closed:
            self.read_closed = True
            session.socket_eof(conn, self)

    def readConnectionLost(self) -> None:
        if reset_pending(self.transport):  # a RST reported as EOF: see reset_pending
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        Socks5Protocol.readConnectionLost(self)

    def writeConnectionLost(self) -> None:
        Socks5Protocol.writeConnectionLost(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        Socks5Protocol.connectionLost(self, reason)
        ClientConnection.connectionLost(self, reason)


def _no_destination_yet(_client: ClientConnection) -> None:
    return None  # the SOCKS request names it


class _InterceptFactory(Factory):
    noisy = False

    def __init__(self, make: Callable[[], ClientConnection]) -> None:
        self.make = make

    def buildProtocol(self, addr: Any) -> ClientConnection:
        proto = self.make()
        proto.factory = self
        return proto


def forward_factory(proxy: LocalProxy, host: str, port: int) -> Factory:
    """Every connection goes to the fixed ``host:port``."""
    return _InterceptFactory(lambda: ClientConnection(proxy, lambda _c: (host, port)))


def _original_destination(client: ClientConnection) -> tuple[str, int]:
    from tm3.lp.origdst import original_destination_of

    try:
        # Also refuses a connection made straight to the listener (its
        # "original" destination is the listener itself: carrying it would loop).
        return original_destination_of(client.transport)
    except (ValueError, TypeError) as e:  # not an IPv4 TCP socket
        raise OSError(str(e)) from None


def socks_factory(proxy: LocalProxy, timeout: float | None = None) -> Factory:
    """SOCKS5 clients (RFC 1928 CONNECT, no authentication); ``timeout``:
    seconds a client has from the accept to the reply (see
    :class:`SocksClientConnection`)."""
    return _InterceptFactory(lambda: SocksClientConnection(proxy, timeout))


def transparent_factory(proxy: LocalProxy) -> Factory:
    """Connections redirected by iptables (``nat`` ``REDIRECT``)."""
    return _InterceptFactory(lambda: ClientConnection(proxy, _original_destination))
