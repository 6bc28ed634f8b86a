"""The SOCKS5 server side of the local proxy (RFC 1928): CONNECT, no auth.

This module owns the SOCKS5 conversation with an application, and nothing
past it:

* :class:`Socks5Handshake` is a pure, I/O-free state machine. It is fed the
  client's bytes in whatever pieces TCP delivered them and returns events:
  :class:`SendBytes` (write these), :class:`ConnectRequest` (the client wants
  ``host:port``) or :class:`HandshakeFailed` (write ``reply``, then close).
  Bytes that arrived after the request (optimistic clients send application
  data without waiting for the reply) are kept for :meth:`~Socks5Handshake.leftover`.
* :func:`reply` builds a request reply; the ``SUCCEEDED`` ... ``ADDRESS_TYPE_NOT_SUPPORTED``
  constants are RFC 1928's REP codes.
* :class:`Socks5Protocol` is the Twisted glue. It runs the handshake and hands
  the decision to overridable hooks: :meth:`~Socks5Protocol.socks_connect`
  opens the upstream (for TM3: a stream over the multiplexer), after which
  the relay hooks get the bytes.

Only method 0x00 ("no authentication required") and command CONNECT are
served: TM3's local proxy listens on loopback for the host's own
applications, and BIND or UDP ASSOCIATE have no counterpart in the pipe
protocol.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import socket
import struct
from typing import Final

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
    ITCPTransport,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tm3.logs import RateLimit

__all__ = [
    "ADDRESS_TYPE_NOT_SUPPORTED",
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "CMD_BIND",
    "CMD_CONNECT",
    "CMD_UDP_ASSOCIATE",
    "COMMAND_NOT_SUPPORTED",
    "CONNECTION_REFUSED",
    "GENERAL_FAILURE",
    "HOST_UNREACHABLE",
    "MAX_GREETING_SIZE",
    "MAX_REQUEST_SIZE",
    "METHOD_NO_ACCEPTABLE",
    "METHOD_NO_AUTH",
    "NETWORK_UNREACHABLE",
    "NOT_ALLOWED",
    "REPLY_MESSAGES",
    "SOCKS_VERSION",
    "SUCCEEDED",
    "TTL_EXPIRED",
    "ConnectRequest",
    "Event",
    "HandshakeFailed",
    "HandshakeFinishedError",
    "SendBytes",
    "Socks5Handshake",
    "Socks5Protocol",
    "SocksError",
    "reply",
]

SOCKS_VERSION: Final = 0x05
_SOCKS4_VERSION: Final = 0x04

METHOD_NO_AUTH: Final = 0x00
METHOD_NO_ACCEPTABLE: Final = 0xFF

CMD_CONNECT: Final = 0x01
CMD_BIND: Final = 0x02
CMD_UDP_ASSOCIATE: Final = 0x03

ATYP_IPV4: Final = 0x01
ATYP_DOMAIN: Final = 0x03
ATYP_IPV6: Final = 0x04

# RFC 1928 section 6, the REP field of a reply.
SUCCEEDED: Final = 0x00
GENERAL_FAILURE: Final = 0x01
NOT_ALLOWED: Final = 0x02
NETWORK_UNREACHABLE: Final = 0x03
HOST_UNREACHABLE: Final = 0x04
CONNECTION_REFUSED: Final = 0x05
TTL_EXPIRED: Final = 0x06
COMMAND_NOT_SUPPORTED: Final = 0x07
ADDRESS_TYPE_NOT_SUPPORTED: Final = 0x08

REPLY_MESSAGES: Final[dict[int, str]] = {
    SUCCEEDED: "succeeded",
    GENERAL_FAILURE: "general SOCKS server failure",
    NOT_ALLOWED: "connection not allowed by ruleset",
    NETWORK_UNREACHABLE: "network unreachable",
    HOST_UNREACHABLE: "host unreachable",
    CONNECTION_REFUSED: "connection refused",
    TTL_EXPIRED: "TTL expired",
    COMMAND_NOT_SUPPORTED: "command not supported",
    ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}

_COMMAND_NAMES: Final[dict[int, str]] = {
    CMD_CONNECT: "CONNECT",
    CMD_BIND: "BIND",
    CMD_UDP_ASSOCIATE: "UDP ASSOCIATE",
}

#: VER, NMETHODS, and at most 255 METHODS.
MAX_GREETING_SIZE: Final = 2 + 255
#: VER, CMD, RSV, ATYP, then the longest address (a length byte and a
#: 255-byte domain name) and DST.PORT.
MAX_REQUEST_SIZE: Final = 4 + 1 + 255 + 2

_REQUEST_HEADER: Final = struct.Struct("!BBBB")  # VER CMD RSV ATYP
_PORT: Final = struct.Struct("!H")
_REPLY_HEADER: Final = struct.Struct("!BBBB")  # VER REP RSV ATYP

# An invalid domain name is a name nobody can reach: "host unreachable" tells
# the user (curl prints the code) more than "general server failure" would.
_BAD_DOMAIN_REPLY: Final = HOST_UNREACHABLE
_MAX_LABEL = 63  # RFC 1035 section 2.3.4
# A client that keeps asking for a dead destination must not flood the log:
# one failed SOCKS connect a second at info, the rest at debug (and counted).
_FAILURES = RateLimit(1.0)


@frozen
class SendBytes:
    """Write ``data`` to the client; the handshake goes on."""

    data: bytes


@frozen
class ConnectRequest:
    """The client asked to CONNECT to ``host:port``.

    ``host`` is a dotted quad for :data:`ATYP_IPV4`, the (validated, ASCII)
    domain name for :data:`ATYP_DOMAIN`, and an IPv6 address in
    ``inet_ntop`` form for :data:`ATYP_IPV6`. The handshake is over: answer
    with :func:`reply`.
    """

    atyp: int
    host: str
    port: int


@frozen
class HandshakeFailed:
    """Write ``reply`` (possibly empty) to the client, then close. ``reason``
    is for the log."""

    reply: bytes
    reason: str


Event = SendBytes | ConnectRequest | HandshakeFailed


class HandshakeFinishedError(RuntimeError):
    """:meth:`Socks5Handshake.feed` was called after the handshake ended (it
    emitted :class:`ConnectRequest` or :class:`HandshakeFailed`): from then
    on the bytes belong to the relay, or to nobody."""


class SocksError(Exception):
    """Why a CONNECT failed, as the REP code to answer with.

    Raise it (or fail :meth:`Socks5Protocol.socks_connect`'s Deferred with
    it) to choose the reply the client sees.
    """

    def __init__(self, rep_code: int, message: str = "") -> None:
        if not GENERAL_FAILURE <= rep_code <= 0xFF:
            raise ValueError(f"not a SOCKS5 failure code: {rep_code!r}")
        if not message:
            message = REPLY_MESSAGES.get(rep_code, f"reply code {rep_code:#04x}")
        super().__init__(rep_code, message)
        self.rep_code = rep_code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} (SOCKS5 reply {self.rep_code:#04x})"


def reply(rep_code: int, bind_ip: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    """The server's reply to a request (RFC 1928 section 6).

    ``VER 05, REP, RSV 00, ATYP, BND.ADDR, BND.PORT`` (port big-endian).
    ATYP is 01 for an IPv4 ``bind_ip`` and 04 for an IPv6 one, so a server
    that knows its real bound address can report it either way.

    :raises ValueError: for a code or port out of range, or an ``bind_ip``
        that is not an IP address.
    """
    if not 0 <= rep_code <= 0xFF:
        raise ValueError(f"reply code out of range: {rep_code!r}")
    if not 0 <= bind_port <= 0xFFFF:
        raise ValueError(f"port out of range: {bind_port!r}")
    address = ipaddress.ip_address(bind_ip)
    atyp = ATYP_IPV4 if address.version == 4 else ATYP_IPV6
    return _REPLY_HEADER.pack(SOCKS_VERSION, rep_code, 0, atyp) + address.packed + _PORT.pack(bind_port)


def _version_error(what: str, version: int) -> str:
    reason = f"{what}: unsupported SOCKS version {version:#04x}, only 0x05 is served"
    if version == _SOCKS4_VERSION:
        reason += " (this is a SOCKS4/4a request)"
    return reason


def _domain_error(raw: bytes) -> str | None:
    """Why ``raw`` is not an acceptable domain name, or ``None`` if it is.

    Clients send names as given (curl's ``--socks5-hostname``, browsers'
    remote DNS); internationalized names must already be A-labels
    (``xn--...``), which is what IDNA-aware clients send. The label rules
    are the DNS ones: nothing that breaks them resolves anyway, and refusing
    here keeps garbage (NUL bytes, control characters) out of logs and out of
    the resolver.
    """
    if not raw:
        return "empty domain name"
    if len(raw) > 255:  # unreachable from the wire (one length byte); API guard
        return f"domain name of {len(raw)} bytes is longer than 255"
    for byte in raw:
        if not 0x21 <= byte <= 0x7E:
            return (
                f"domain name contains byte {byte:#04x}: only printable ASCII "
                "is accepted (IDNs must be sent as xn-- A-labels)"
            )
    # A single trailing dot names the root explicitly ("example.com.").
    name = raw[:-1] if raw.endswith(b".") and len(raw) > 1 else raw
    for label in name.split(b"."):
        if not label:
            return f"domain name {raw!r} has an empty label"
        if len(label) > _MAX_LABEL:
            return f"domain name has a label of {len(label)} bytes (at most {_MAX_LABEL})"
    return None


class _Stage(enum.Enum):
    GREETING = enum.auto()
    REQUEST = enum.auto()
    CONNECT_REQUESTED = enum.auto()
    FAILED = enum.auto()


class Socks5Handshake:
    """The server side of a SOCKS5 handshake, without I/O.

    :meth:`feed` takes bytes as they arrive, one at a time or everything at
    once, and returns the events they complete. Every decision is taken as
    soon as the bytes that decide it are there (a SOCKS4 client is refused on
    its first byte), so the outcome depends only on the bytes and never on
    how TCP cut them.

    Memory is bounded by the protocol: between calls at most one incomplete
    message is buffered (``MAX_GREETING_SIZE`` or ``MAX_REQUEST_SIZE``
    bytes), since the length fields are one byte wide. Bytes past the request
    come only from the same ``feed`` call that completed it (one socket
    read), and are handed over, not kept growing: further calls raise.
    """

    def __init__(self) -> None:
        self._stage = _Stage.GREETING
        self._buffer = bytearray()
        self._leftover = b""

    @property
    def finished(self) -> bool:
        """Whether the handshake has ended, either way."""
        return self._stage in (_Stage.CONNECT_REQUESTED, _Stage.FAILED)

    def leftover(self) -> bytes:
        """The bytes that followed the CONNECT request (early application
        data), to be relayed once the connection is established.

        :raises RuntimeError: if no :class:`ConnectRequest` has been emitted.
        """
        if self._stage is not _Stage.CONNECT_REQUESTED:
            raise RuntimeError("no CONNECT request has been received")
        return self._leftover

    def feed(self, data: bytes) -> list[Event]:
        """Take the client's next bytes; return the events they complete.

        :raises HandshakeFinishedError: if the handshake has already ended.
        """
        if self.finished:
            raise HandshakeFinishedError(
                f"SOCKS5 handshake already ended ({self._stage.name}); {len(data)} bytes fed after it"
            )
        self._buffer += data
        events: list[Event] = []
        offset = 0
        while not self.finished:
            if self._stage is _Stage.GREETING:
                used = self._parse_greeting(offset, events)
            else:
                used = self._parse_request(offset, events)
            if used == 0:
                break
            offset += used
        if self._stage is _Stage.CONNECT_REQUESTED:
            self._leftover = bytes(memoryview(self._buffer)[offset:])
            self._buffer = bytearray()
        elif self._stage is _Stage.FAILED:
            self._buffer = bytearray()
        elif offset:
            # Compact once per call, not once per message.
            del self._buffer[:offset]
        return events

    def _fail(self, events: list[Event], reply_bytes: bytes, reason: str) -> int:
        self._stage = _Stage.FAILED
        events.append(HandshakeFailed(reply_bytes, reason))
        # Any nonzero value ends feed()'s loop; the bytes are dropped anyway.
        return 1

    def _parse_greeting(self, offset: int, events: list[Event]) -> int:
        """Parse ``VER NMETHODS METHODS`` at ``offset``; return the bytes
        consumed, 0 if more are needed."""
        available = len(self._buffer) - offset
        if available < 1:
            return 0
        version = self._buffer[offset]
        if version != SOCKS_VERSION:
            return self._fail(events, b"", _version_error("greeting", version))
        if available < 2:
            return 0
        nmethods = self._buffer[offset + 1]
        no_acceptable = bytes((SOCKS_VERSION, METHOD_NO_ACCEPTABLE))
        if nmethods == 0:
            return self._fail(events, no_acceptable, "greeting offers no methods")
        size = 2 + nmethods
        if available < size:
            return 0
        methods = self._buffer[offset + 2 : offset + size]
        if METHOD_NO_AUTH not in methods:
            offered = ", ".join(f"{m:#04x}" for m in methods)
            return self._fail(
                events,
                no_acceptable,
                f"no acceptable method: client offers {offered}, only 0x00 (no authentication) is served",
            )
        events.append(SendBytes(bytes((SOCKS_VERSION, METHOD_NO_AUTH))))
        self._stage = _Stage.REQUEST
        return size

    def _parse_request(self, offset: int, events: list[Event]) -> int:
        """Parse ``VER CMD RSV ATYP DST.ADDR DST.PORT`` at ``offset``."""
        buf = self._buffer
        available = len(buf) - offset
        if available < 1:
            return 0
        if buf[offset] != SOCKS_VERSION:
            return self._fail(events, b"", _version_error("request", buf[offset]))
        if available < _REQUEST_HEADER.size:
            return 0
        # RSV is not checked: RFC 1928 says "X'00'", but nothing depends on
        # it and being strict would only break sloppy clients.
        _, command, _, atyp = _REQUEST_HEADER.unpack_from(buf, offset)
        start = offset + _REQUEST_HEADER.size
        if atyp == ATYP_IPV4:
            address_size = 4
        elif atyp == ATYP_IPV6:
            address_size = 16
        elif atyp == ATYP_DOMAIN:
            if available < _REQUEST_HEADER.size + 1:
                return 0
            address_size = 1 + buf[start]
        else:
            # Without a known ATYP the request's length is unknown, so this
            # is decided now, before the command.
            return self._fail(
                events,
                reply(ADDRESS_TYPE_NOT_SUPPORTED),
                f"unknown address type {atyp:#04x}",
            )
        size = _REQUEST_HEADER.size + address_size + _PORT.size
        if available < size:
            return 0
        (port,) = _PORT.unpack_from(buf, start + address_size)
        raw = bytes(buf[start : start + address_size])
        if atyp == ATYP_IPV4:
            host = socket.inet_ntop(socket.AF_INET, raw)
        elif atyp == ATYP_IPV6:
            host = socket.inet_ntop(socket.AF_INET6, raw)
        else:
            host = raw[1:].decode("latin-1")  # validated below, before use
        # The command is checked only once the whole request is in, so the
        # refusal can name the destination, and the client's request is
        # fully read when the connection closes (unread bytes turn the close
        # into a RST, which can destroy the reply in flight).
        if command != CMD_CONNECT:
            name = _COMMAND_NAMES.get(command, f"unknown command {command:#04x}")
            return self._fail(
                events,
                reply(COMMAND_NOT_SUPPORTED),
                f"{name} to {host!r}:{port} not supported, only CONNECT is served",
            )
        if atyp == ATYP_DOMAIN:
            problem = _domain_error(raw[1:])
            if problem is not None:
                return self._fail(events, reply(_BAD_DOMAIN_REPLY), problem)
        events.append(ConnectRequest(atyp, host, port))
        self._stage = _Stage.CONNECT_REQUESTED
        return size


class _Phase(enum.Enum):
    HANDSHAKE = enum.auto()
    CONNECTING = enum.auto()
    RELAYING = enum.auto()
    CLOSED = enum.auto()


def _failure_reply(failure: Failure) -> tuple[int, str, bool]:
    """The REP code and log message for a failed connect, and whether the
    failure was expected (a routine network outcome, not a bug)."""
    error = failure.value
    if isinstance(error, SocksError):
        return error.rep_code, error.message, True
    # Subclasses may pass Twisted's connect errors through unchanged; these
    # follow the usual errno-to-REP mapping (Dante's, among others).
    if isinstance(error, DNSLookupError):
        return HOST_UNREACHABLE, str(error), True
    if isinstance(error, ConnectionRefusedError):
        return CONNECTION_REFUSED, str(error), True
    if isinstance(error, NoRouteError):  # ENETUNREACH
        return NETWORK_UNREACHABLE, str(error), True
    if isinstance(error, (TCPTimedOutError, ConnectTimeoutError, TimeoutError)):
        return TTL_EXPIRED, str(error), True
    if isinstance(error, ConnectError):
        if error.osError == errno.EHOSTUNREACH:
            return HOST_UNREACHABLE, str(error), True
        return GENERAL_FAILURE, str(error), True
    return GENERAL_FAILURE, f"{type(error).__name__}: {error}", False


@implementer(IHalfCloseableProtocol)
class Socks5Protocol(Protocol):
    """The SOCKS5 server side of one client connection.

    Subclasses override :meth:`socks_connect` (open the upstream),
    :meth:`socks_established` and :meth:`relay_data` (move bytes), and
    optionally :meth:`relay_eof` and :meth:`socks_aborted`. Subclasses that
    define ``__init__``, ``connectionLost``, ``readConnectionLost`` or
    ``writeConnectionLost`` must call the base class's.

    Reading from the client is paused while the connect is pending, so an
    optimistic client's data waits in the kernel instead of in our memory. The
    consequence: a client that goes away during the connect is noticed only
    once reading resumes, so ``socks_connect`` must time out on its own (a
    Twisted ``HostnameEndpoint(..., timeout=...)`` does). If the connection is
    lost while the connect is pending (an abort, a write error, shutdown),
    the connect's Deferred is cancelled and :meth:`socks_aborted` called.

    Half-close is kept: the client's EOF reaches :meth:`relay_eof`, and the
    connection is closed once both directions have been shut down.

    With a ``timeout`` (and the ``clock`` to count it), the whole handshake,
    from the accept to the reply, must be over within that many seconds: a
    client that says nothing, or stops halfway, is then closed, and a connect
    still pending is cancelled and answered with :meth:`socks_timed_out`'s
    reply. Without one, a silent client holds its socket for as long as it
    likes.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime | None = None, timeout: float | None = None) -> None:
        if timeout is not None and clock is None:
            raise ValueError("a SOCKS handshake timeout needs a clock")
        self._clock = clock
        self._timeout = timeout
        self._timer: IDelayedCall | None = None
        self._handshake = Socks5Handshake()
        self._phase = _Phase.HANDSHAKE
        self._pending_connect: Deferred[None] | None = None
        # Only non-empty while connecting: the request's leftover, plus
        # anything a transport that cannot pause still delivered.
        self._early: list[bytes] = []
        self._paused = False
        self._read_closed = False
        self._write_closed = False
        self._destination = ""

    # -- hooks for subclasses ------------------------------------------------

    def socks_connect(self, host: str, port: int, atyp: int) -> Deferred[None]:
        """Open the upstream connection to ``host:port``.

        ``atyp`` is :data:`ATYP_IPV4`, :data:`ATYP_DOMAIN` (``host`` is then
        an unresolved name) or :data:`ATYP_IPV6`. Fire the Deferred when
        the upstream is ready; fail it with :class:`SocksError` to choose the
        reply (other exceptions become GENERAL_FAILURE, except Twisted's
        connect errors, which map to their REP codes). Make it cancellable,
        or release what it opens in :meth:`socks_aborted`.
        """
        raise SocksError(NOT_ALLOWED, "socks_connect is not implemented")

    def socks_established(self, leftover: bytes) -> None:
        """The client has been told the connect succeeded. ``leftover`` is
        application data it sent before that (often empty)."""

    def relay_data(self, data: bytes) -> None:
        """Bytes from the client, after :meth:`socks_established`."""

    def relay_eof(self) -> None:
        """The client half-closed (sent FIN) after :meth:`socks_established`.

        The default closes the whole connection, which is what a protocol
        that ignores half-close gets; relays should pass the EOF upstream and
        later call ``self.transport.loseWriteConnection()`` when the upstream
        is done.
        """
        self._transport.loseConnection()

    def socks_aborted(self) -> None:
        """The client connection was lost, or the handshake timed out, while
        :meth:`socks_connect` was pending; its Deferred has been cancelled and
        its result is ignored."""

    def socks_timed_out(self) -> SocksError:
        """The reply for a connect still pending when the handshake's
        ``timeout`` runs out (its Deferred is then cancelled)."""
        return SocksError(TTL_EXPIRED, "the connect did not finish in time")

    # -- Twisted callbacks ---------------------------------------------------

    def connectionMade(self) -> None:
        if self._timeout is not None and self._clock is not None:
            self._timer = self._clock.callLater(self._timeout, self._timed_out)
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self._phase is _Phase.RELAYING:
            self.relay_data(data)
        elif self._phase is _Phase.HANDSHAKE:
            self._handshake_data(data)
        elif self._phase is _Phase.CONNECTING:
            # Reading is paused, but a transport that cannot pause (or
            # bytes already read when pausing) still lands here.
            self._early.append(data)
        # CLOSED: we are closing and nobody wants the bytes.

    def readConnectionLost(self) -> None:
        self._read_closed = True
        if self._phase is _Phase.RELAYING:
            self.relay_eof()
            self._close_if_shut_down()
        elif self._phase is _Phase.HANDSHAKE:
            self.log.debug("SOCKS client {peer} closed during the handshake", peer=self._peer())
            self._phase = _Phase.CLOSED
            self._transport.loseConnection()
        elif self._phase is _Phase.CONNECTING:
            # Possibly a half-close after optimistic data: hand the EOF on
            # once the relay exists (see _connect_succeeded).
            pass
        else:
            self._transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self._write_closed = True
        self._close_if_shut_down()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        phase, self._phase = self._phase, _Phase.CLOSED
        self._stop_timer()
        self._early.clear()
        if phase is _Phase.CONNECTING:
            self.log.debug(
                "SOCKS client {peer} went away while connecting to {destination}",
                peer=self._peer(),
                destination=self._destination,
            )
            pending, self._pending_connect = self._pending_connect, None
            if pending is not None:
                pending.cancel()
            self.socks_aborted()

    # -- internals -----------------------------------------------------------

    @property
    def _transport(self) -> ITransport:
        transport = self.transport
        assert transport is not None, "not connected"
        return transport

    def _peer(self) -> str:
        transport = self.transport
        return str(transport.getPeer()) if transport is not None else "?"

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _timed_out(self) -> None:
        self._timer = None
        if self._phase is _Phase.HANDSHAKE:
            self.log.debug(
                "SOCKS client {peer} did not finish its handshake in {timeout:g} s; closing",
                peer=self._peer(),
                timeout=self._timeout,
            )
            self._phase = _Phase.CLOSED
            self._transport.loseConnection()
        elif self._phase is _Phase.CONNECTING:
            error = self.socks_timed_out()
            level, also = _FAILURES.level()
            self.log.emit(
                level,
                "SOCKS connect from {peer} to {destination} timed out after {timeout:g} s: {message} (reply {rep_code:#04x})"
                "{also}",
                also=also,
                peer=self._peer(),
                destination=self._destination,
                timeout=self._timeout,
                message=error.message,
                rep_code=error.rep_code,
            )
            pending, self._pending_connect = self._pending_connect, None
            self._refuse(reply(error.rep_code))  # CLOSED first: the cancel below is ignored
            if pending is not None:
                pending.cancel()
            self.socks_aborted()

    def _close_if_shut_down(self) -> None:
        # Twisted keeps a socket open after both halves are shut down; a
        # half-closing protocol has to close it itself.
        if self._read_closed and self._write_closed:
            self._transport.loseConnection()

    def _pause_reading(self) -> None:
        producer = IPushProducer(self.transport, None)
        if producer is not None and not self._paused:
            self._paused = True
            producer.pauseProducing()

    def _resume_reading(self) -> None:
        producer = IPushProducer(self.transport, None)
        if producer is not None and self._paused:
            self._paused = False
            producer.resumeProducing()

    def _handshake_data(self, data: bytes) -> None:
        for event in self._handshake.feed(data):
            if isinstance(event, SendBytes):
                self._transport.write(event.data)
            elif isinstance(event, HandshakeFailed):
                self.log.debug(
                    "SOCKS handshake with {peer} failed: {reason}",
                    peer=self._peer(),
                    reason=event.reason,
                )
                self._refuse(event.reply)
            else:
                self._start_connect(event)

    def _refuse(self, reply_bytes: bytes) -> None:
        self._phase = _Phase.CLOSED
        self._stop_timer()
        if reply_bytes:
            self._transport.write(reply_bytes)
        self._transport.loseConnection()

    def _start_connect(self, request: ConnectRequest) -> None:
        self._phase = _Phase.CONNECTING
        leftover = self._handshake.leftover()
        if leftover:
            self._early.append(leftover)
        self._destination = (
            f"[{request.host}]:{request.port}" if request.atyp == ATYP_IPV6 else f"{request.host}:{request.port}"
        )
        self.log.debug(
            "SOCKS client {peer} asks for {destination}",
            peer=self._peer(),
            destination=self._destination,
        )
        self._pause_reading()
        pending = maybeDeferred(self.socks_connect, request.host, request.port, request.atyp)
        # Set before adding callbacks: the Deferred may have fired already.
        self._pending_connect = pending
        pending.addCallbacks(self._connect_succeeded, self._connect_failed)
        pending.addErrback(self._hook_crashed)

    def _connect_succeeded(self, _: None) -> None:
        self._pending_connect = None
        if self._phase is not _Phase.CONNECTING:
            return  # lost meanwhile; socks_aborted has been called
        self._transport.write(reply(SUCCEEDED))
        self._phase = _Phase.RELAYING
        self._stop_timer()
        early = b"".join(self._early)
        self._early.clear()
        # Resume before the hook: resuming delivers nothing synchronously,
        # and the hook may want to pause the client itself (backpressure).
        self._resume_reading()
        self.socks_established(early)
        if self._read_closed and self._phase is _Phase.RELAYING:
            self.relay_eof()
            self._close_if_shut_down()

    def _connect_failed(self, failure: Failure) -> None:
        self._pending_connect = None
        if self._phase is not _Phase.CONNECTING:
            # Our own cancel() after the client left, or a late result.
            return None
        rep_code, message, expected = _failure_reply(failure)
        if expected:
            level, also = _FAILURES.level()
            self.log.emit(
                level,
                "SOCKS connect from {peer} to {destination} failed: {message} (reply {rep_code:#04x}){also}",
                also=also,
                peer=self._peer(),
                destination=self._destination,
                message=message,
                rep_code=rep_code,
            )
        else:
            self.log.failure(
                "SOCKS connect from {peer} to {destination} crashed",
                failure,
                peer=self._peer(),
                destination=self._destination,
            )
        self._refuse(reply(rep_code))
        return None

    def _hook_crashed(self, failure: Failure) -> None:
        if isinstance(failure.value, CancelledError):
            return
        # socks_established (or a later relay hook it ran) raised: the
        # connection's state is unknown, so it goes, without flushing.
        self.log.failure("SOCKS relay setup for {peer} crashed", failure, peer=self._peer())
        self._phase = _Phase.CLOSED
        transport = self.transport
        if transport is not None:
            tcp = ITCPTransport(transport, None)
            if tcp is not None:
                tcp.abortConnection()
            else:
                transport.loseConnection()
