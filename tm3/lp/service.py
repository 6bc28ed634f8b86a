"""The local proxy (LP) role: intercepted application connections carried
over ``n`` pipes to the RP.

- :class:`PipeDialer` opens the ``n`` pipes to the RP, all at once, retrying
  with exponential backoff until the RP is up; a set is only used whole.
- :class:`LocalSession` is a :class:`~tm3.mux.session.Session` that opens
  connections itself (SYN with the original IPv4 destination, ids per
  PROTOCOL.md rule 7) and drops, counting them, RP messages for ids that are
  over.
- :class:`ClientConnection` is an accepted application socket. Its
  destination comes from the interception mode: the static target of a
  forward, ``SO_ORIGINAL_DST`` for transparent mode, or the SOCKS5 request.
- :class:`LocalProxy` is the service: listeners accept only while a session is
  up (in between, the listening sockets stop accepting and clients wait in the
  kernel's backlog); a lost pipe ends the session, resetting every connection
  it carried, and the dialer starts again.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from collections.abc import Callable
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from tm3.mux.flow import abort_transport, register_producer, reset_pending, unregister_producer
from tm3.core.ids import IdAllocator, IdsExhausted
from tm3.listening import ListeningService
from tm3.mux.session import CLOSED, OPEN, Connection, Session, Settings, Stats, StreamProtocol
from tm3.mux.pipes import PipeProtocol
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
from tm3.core.wire import REASON_RST, Message, ProtocolError, Syn, encode_syn

INITIAL_BACKOFF = 0.5
# A session that lasted this long resets the redial backoff.
STABLE_SESSION = 10.0
MAX_BACKOFF = 30.0
# How long a client that does not read may delay the reset that follows a
# server's reset (LocalSession.peer_fin): then it is reset anyway.
RESET_FLUSH_LIMIT = 10.0


class LocalSession(Session):
    log = Logger()
    role = "lp"
    pipes_carry_upload = False

    def __init__(self, pipes: list[PipeProtocol], reactor: Any, settings: Settings, stats: Stats, **kw: Any) -> None:
        self.ids = IdAllocator(reactor.seconds)
        super().__init__(pipes, reactor, settings, stats, **kw)

    def open(self, host: str, port: int) -> Connection:
        """Start a connection to ``host:port`` (IPv4): allocate an id, send the SYN."""
        syn_host = host
        cid = self.ids.allocate()
        try:
            syn = encode_syn(cid, syn_host, port)
        except ValueError:
            self.ids.release(cid)
            raise
        conn = Connection(self, cid, host, port)
        self.conns[cid] = conn
        self.stats.connections_opened += 1
        self.pipes.send(syn)
        conn.tx_seq = 1
        self.stats.messages_sent += 1
        return conn

    def route(self, msg: Message) -> None:
        if type(msg) is Syn:
            raise ProtocolError(f"the RP sent a SYN (for connection {msg.conn_id}); only the LP opens connections")
        conn = self.conns.get(msg.conn_id)
        if conn is None:
            self.drop_tail(msg)  # the tail of a connection that is over here
        else:
            self.push(conn, msg)

    def connection_over(self, conn: Connection) -> None:
        if self.conns.get(conn.conn_id) is conn:
            del self.conns[conn.conn_id]
            self.ids.release(conn.conn_id)

    def peer_fin(self, conn: Connection, reason: int) -> None:
        stream = conn.stream
        if reason != REASON_RST or conn.state != OPEN or not isinstance(stream, ClientConnection) or stream.aborted:
            super().peer_fin(conn, reason)
            return
        # The server reset its connection after sending every byte the RP
        # relayed before this FIN. Over TCP those bytes reach the client
        # before the RST; an abort now would drop whatever the client has
        # not read yet (our queue, the transport's buffer, the kernel's).
        conn.fin_received = reason
        chunks, n = list(conn.queue), conn.queued
        conn.queue.clear()
        conn.queued = 0
        conn.shut_pending = False
        self.queued_total -= n
        conn.bytes_in += n
        self.stats.bytes_from_pipes += n
        self._check_upload_resume(conn)
        conn.state = CLOSED
        self.paused_readers.discard(conn)
        self.recent_senders.discard(conn)
        stream.reset_when_flushed(chunks)
        self.connection_done(conn, "rst")


class ClientConnection(StreamProtocol):
    """An application connection accepted by the LP.

    The connection is carried once :meth:`begin` names its destination; until
    then (a SOCKS handshake, a name lookup) bytes go to :meth:`before_begin`.
    """

    log = Logger()

    def __init__(self, proxy: LocalProxy, destination: Callable[[ClientConnection], tuple[str, int] | None]) -> None:
        StreamProtocol.__init__(self, None)  # type: ignore[arg-type]
        self.proxy = proxy
        self.destination = destination
        self.conn: Connection | None = None  # type: ignore[assignment]
        self._reset_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        transport = self.transport
        assert transport is not None
        if ITCPTransport.providedBy(transport):
            transport.setTcpNoDelay(True)
        try:
            dest = self.destination(self)
        except OSError as e:
            self.log.warn("{peer}: cannot tell where this connection was going ({why}); resetting it", peer=self.peer(), why=e)
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
            conn = self.open_connection(host, port)
        except NoRoute as e:
            self.log.info("{peer} -> {host}:{port}: {why}; resetting", peer=self.peer(), host=host, port=port, why=e)
            self.abort()
            return False
        self.attach(conn)
        return True

    def open_connection(self, host: str, port: int) -> Connection:
        """Send the SYN; raises :class:`NoRoute` when the LP cannot."""
        session = self.proxy.session
        if session is None or session.ended:
            raise NoRoute("no pipe session to the RP")
        try:
            conn = session.open(host, port)
        except (IdsExhausted, ValueError) as e:
            raise NoRoute(str(e)) from None
        self.conn = conn
        return conn

    def attach(self, conn: Connection, early: bytes = b"") -> None:
        """Start relaying between this socket and ``conn``."""
        assert self.transport is not None
        register_producer(self.transport, self.gate)
        conn.session.stream_opened(conn, self)
        if early and conn.state == OPEN:
            conn.session.stream_data(conn, early)

    def before_begin(self, data: bytes) -> None:
        """Bytes that came before the destination was known."""
        self.log.warn("{peer}: data before the connection began; resetting", peer=self.peer())
        self.abort()

    def dataReceived(self, data: bytes) -> None:
        if self.conn is None:
            if not self.aborted:
                self.before_begin(data)
        elif not self.aborted:
            self.conn.session.stream_data(self.conn, data)

    def readConnectionLost(self) -> None:
        if self.conn is None:
            self.abort()  # gone before it said where to
        else:
            StreamProtocol.readConnectionLost(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        call, self._reset_call = self._reset_call, None
        if call is not None and call.active():
            call.cancel()
        if self.conn is not None:
            self.conn.session.stream_closed(self.conn, self, reason)

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
                self._reset_call = reactor.callLater(0.01, check)
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


class NoRoute(Exception):
    """The LP cannot carry a new connection now (no session, no free id, not IPv4)."""


class SocksClientConnection(Socks5Protocol, ClientConnection):  # type: ignore[misc]
    """A SOCKS5 client: the handshake (:class:`~tm3.lp.socks.Socks5Protocol`)
    names the destination, then the connection is carried like any other.

    The success reply goes out as soon as the SYN is sent: whether the RP's
    connect works is only known later (a FIN 0x99 then resets the client),
    and waiting for the server's first byte would deadlock protocols where
    the client speaks first.
    """

    def __init__(self, proxy: LocalProxy) -> None:
        Socks5Protocol.__init__(self)
        ClientConnection.__init__(self, proxy, lambda _c: None)

    def socks_connect(self, host: str, port: int, atyp: int) -> Deferred[None]:
        if atyp == ATYP_IPV6:
            raise SocksError(ADDRESS_TYPE_NOT_SUPPORTED, f"TM3 carries IPv4 only, not [{host}]")
        if atyp == ATYP_DOMAIN:
            d: Deferred[str] = self.proxy.reactor.resolve(host)

            def resolved(ip: str) -> None:
                self._open(ip, port)

            def unresolved(f: Failure) -> None:
                f.trap(DNSLookupError)
                raise SocksError(HOST_UNREACHABLE, f"cannot resolve {host!r} to an IPv4 address")

            return d.addCallbacks(resolved, unresolved)
        self._open(host, port)
        return succeed(None)

    def _open(self, host: str, port: int) -> None:
        try:
            self.open_connection(host, port)
        except NoRoute as e:
            raise SocksError(NETWORK_UNREACHABLE if self.proxy.session is None else GENERAL_FAILURE, str(e)) from None

    def socks_established(self, leftover: bytes) -> None:
        assert self.conn is not None
        self.attach(self.conn, leftover)

    def relay_data(self, data: bytes) -> None:
        if self.conn is not None and not self.aborted:
            self.conn.session.stream_data(self.conn, data)

    def relay_eof(self) -> None:
        if self.conn is not None and not self.aborted:
            self.conn.session.stream_eof(self.conn)

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


class _InterceptFactory(Factory):
    noisy = False
    def __init__(self, proxy: LocalProxy, make: Callable[[], ClientConnection]) -> None:
        self.proxy = proxy
        self.make = make

    def buildProtocol(self, addr: Any) -> ClientConnection:
        proto = self.make()
        proto.factory = self
        return proto


def forward_factory(proxy: LocalProxy, host: str, port: int) -> Factory:
    """Every connection goes to the fixed ``host:port``."""
    return _InterceptFactory(proxy, lambda: ClientConnection(proxy, lambda _c: (host, port)))


def _original_destination(client: ClientConnection) -> tuple[str, int]:
    from tm3.lp.origdst import original_destination_of

    try:
        # Also refuses a connection made straight to the listener (its
        # "original" destination is the listener itself: carrying it would loop).
        return original_destination_of(client.transport)
    except (ValueError, TypeError) as e:  # not an IPv4 TCP socket
        raise OSError(str(e)) from None


def socks_factory(proxy: LocalProxy) -> Factory:
    """SOCKS5 clients (RFC 1928 CONNECT, no authentication)."""
    return _InterceptFactory(proxy, lambda: SocksClientConnection(proxy))


def transparent_factory(proxy: LocalProxy) -> Factory:
    """Connections redirected by iptables (``nat`` ``REDIRECT``)."""
    return _InterceptFactory(proxy, lambda: ClientConnection(proxy, _original_destination))


class _DialAttempt(Factory):
    """One try at opening all ``n`` pipes; used whole or not at all."""

    protocol = PipeProtocol
    noisy = False

    def __init__(self, dialer: PipeDialer) -> None:
        self.dialer = dialer
        self.up: list[PipeProtocol] = []
        self.dead = False

    def pipe_made(self, pipe: PipeProtocol) -> None:
        if self.dead:
            pipe.abort()
            return
        self.up.append(pipe)
        if len(self.up) == self.dialer.n:
            self.dialer.complete(self)

    def pipe_gone(self, pipe: PipeProtocol, reason: Failure) -> None:
        if pipe in self.up and not self.dead:
            self.dialer.failed(self, reason)

    def abort(self) -> None:
        self.dead = True
        up, self.up = self.up, []
        for pipe in up:
            pipe.abort()


class PipeDialer:
    log = Logger()

    def __init__(
        self, reactor: Any, host: str, port: int, n: int, on_up: Callable[[list[PipeProtocol]], None], timeout: float = 10.0
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.n = n
        self.on_up = on_up
        self.timeout = timeout
        self.backoff = INITIAL_BACKOFF
        self.attempt: _DialAttempt | None = None
        self.retry: IDelayedCall | None = None
        self.stopped = True
        self.failures = 0

    def start(self, delay: float = 0.0) -> None:
        self.stopped = False
        if self.retry is not None and self.retry.active():
            return
        if delay > 0:
            self.retry = self.reactor.callLater(delay, self._dial)
        else:
            self._dial()

    def _dial(self) -> None:
        self.retry = None
        if self.stopped:
            return
        attempt = self.attempt = _DialAttempt(self)
        endpoint = TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)
        for _ in range(self.n):
            d: Deferred[Any] = endpoint.connect(attempt)
            d.addErrback(self._connect_failed, attempt)

    def _connect_failed(self, reason: Failure, attempt: _DialAttempt) -> None:
        self.failed(attempt, reason)

    def failed(self, attempt: _DialAttempt, reason: Failure) -> None:
        if attempt.dead or attempt is not self.attempt:
            return
        attempt.abort()
        self.attempt = None
        self.failures += 1
        if self.stopped:
            return
        self.log.warn(
            "cannot open {n} pipes to the RP at {host}:{port}: {why}; retrying in {delay:.1f} s",
            n=self.n,
            host=self.host,
            port=self.port,
            why=reason.getErrorMessage(),
            delay=self.backoff,
        )
        self.retry = self.reactor.callLater(self.backoff, self._dial)
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)

    def complete(self, attempt: _DialAttempt) -> None:
        if attempt is not self.attempt:
            attempt.abort()
            return
        self.attempt = None
        attempt.dead = True  # the pipes belong to the session now
        self.on_up(attempt.up)

    def next_delay(self, session_was_useful: bool) -> float:
        """Delay before redialing after a session ended: short after a
        session that lasted or carried traffic, growing after ones that
        died at once (the RP keeps closing them: it expects another --pipes)."""
        if session_was_useful:
            self.backoff = INITIAL_BACKOFF
            return INITIAL_BACKOFF
        delay = self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        return delay

    def stop(self) -> None:
        self.stopped = True
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        self.retry = None
        if self.attempt is not None:
            self.attempt.abort()
            self.attempt = None


class LocalProxy(MultiService):
    """The LP service: a pipe dialer, the current session, and listeners."""

    log = Logger()

    def __init__(self, reactor: Any, host: str, port: int, pipes: int, settings: Settings, connect_timeout: float = 10.0):
        super().__init__()
        self.setName("tm3lp")
        self.reactor = reactor
        self.settings = settings
        self.stats = Stats()
        self.session: LocalSession | None = None
        self.listeners: list[ListeningService] = []
        self.remote = f"{host}:{port}"
        self.dialer = PipeDialer(reactor, host, port, pipes, self._pipes_up, connect_timeout)
        self._count = 0
        self._session_started = 0.0
        self._opened_before = 0
        self._session_waiters: list[Deferred[LocalSession]] = []

    def add_listener(self, endpoint: Any, factory: Factory, description: str) -> ListeningService:
        listener = ListeningService(endpoint, factory, description)
        listener.setServiceParent(self)
        self.listeners.append(listener)
        return listener

    def startService(self) -> None:
        super().startService()
        self._set_accepting(False)
        self.dialer.start()

    def stopService(self) -> Any:
        self.running = False  # before ending the session: no reconnect now
        self.dialer.stop()
        if self.session is not None:
            self.session.end("service stopping")
        return super().stopService()

    def _set_accepting(self, on: bool) -> None:
        for listener in self.listeners:
            port = listener.port
            # A listening socket that stops reading stops accepting; clients
            # wait in the kernel backlog until the pipes are up.
            method = getattr(port, "startReading" if on else "stopReading", None)
            if method is not None:
                method()

    def _pipes_up(self, pipes: list[PipeProtocol]) -> None:
        self._count += 1
        name = f"session {self._count}"
        session = LocalSession(pipes, self.reactor, self.settings, self.stats, on_end=self._ended, name=name)
        if session.ended:
            return
        self.session = session
        self._session_started = self.reactor.seconds()
        self._opened_before = self.stats.connections_opened
        self.log.info("{session} up: {n} pipes to the RP at {remote}", session=name, n=len(pipes), remote=self.remote)
        self._set_accepting(True)
        waiters, self._session_waiters = self._session_waiters, []
        for d in waiters:
            d.callback(session)

    def _ended(self, session: Session, why: str) -> None:
        if self.session is session:
            self.session = None
            self._set_accepting(False)
            if self.running:
                lasted = self.reactor.seconds() - self._session_started
                carried = self.stats.connections_opened > self._opened_before
                delay = self.dialer.next_delay(carried or lasted >= STABLE_SESSION)
                hint = ""
                if lasted < 1.0 and not carried:
                    hint = f" (it lasted {lasted:.2f} s: does the RP expect --pipes {self.dialer.n}?)"
                self.log.warn(
                    "pipes to the RP lost ({why}){hint}; reconnecting in {delay:.1f} s", why=why, hint=hint, delay=delay
                )
                self.dialer.start(delay=delay)

    def when_session(self) -> Deferred[LocalSession]:
        """Fires with the session once all pipes are up (at once if they are)."""
        d: Deferred[LocalSession] = Deferred()
        if self.session is not None:
            d.callback(self.session)
        else:
            self._session_waiters.append(d)
        return d


def resolve_ipv4(host: str) -> str:
    """An IPv4 literal as is, or the first IPv4 address of a name (blocking:
    used at start-up only)."""
    try:
        socket.inet_aton(host)
        if host.count(".") == 3:
            return host
    except OSError:
        pass
    infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} has no IPv4 address")
    return str(infos[0][4][0])
