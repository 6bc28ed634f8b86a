"""The PROXY protocol in front of the RP's pipe port: ``--listen haproxy:tcp:6000``.

Behind HAProxy (``send-proxy-v2`` on its server lines) every accepted pipe
starts with HAProxy's PROXY header (v1 text or v2 binary), which names the
LP's real address. The RP must see that address, not HAProxy's: v1 pipe sets
are grouped by source address, ``--allow-from`` judges it, and the log and
sessions name it.

Twisted ships this as the ``haproxy:`` endpoint (twisted.protocols.haproxy),
but its wrapper connects the wrapped protocol at accept, before the header has
arrived: ``getPeer()`` in ``connectionMade`` and the address handed to
``buildProtocol`` are HAProxy's (Twisted issue 12501, open), so ``--allow-from``
and the pipe's name would judge the balancer. And a malformed header either
closes the connection without a word or, for a v1 header with a bad port,
logs a traceback. So the RP reads the header itself (with Twisted's parsers):

- :class:`ProxyHeaderFactory` builds no pipe at accept. Its
  :class:`ProxyHeaderProtocol` buffers until the header is complete, then asks
  the pipe factory for a pipe with the real address (so ``--allow-from`` sees
  it), connects the pipe with itself as the transport (``getPeer`` says the
  LP's address from the start), and passes on whatever followed the header.
- A malformed header, or none within :data:`HEADER_TIMEOUT` seconds, closes
  the connection with one warning line naming the sender and the first bytes.
- A ``LOCAL`` header (v2; HAProxy's own health check, which sends one when
  the server line has ``send-proxy-v2``) is the balancer asking whether the
  port is open: the answer is the accepted connection; it is closed at once,
  without a pipe or a log line.
- A header without addresses (v1 ``UNKNOWN``, v2 ``UNSPEC``) means the
  connection's own endpoints, as the specification says.

TLS: HAProxy in TCP mode passes TLS through and writes its header before the
LP's ClientHello, in clear. So ``haproxy:tls:...`` (or ``haproxy:ssl:...``)
reads the header on TCP and runs TLS after it: :func:`proxied` takes the TLS
endpoint apart and puts the header beneath TLS.

Only put ``haproxy:`` on a port that nothing but the balancer can reach: the
header is believed, so anyone who can connect can claim any address.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, cast

from twisted.internet import interfaces
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidNetworkProtocol, InvalidProxyHeader, MissingAddressData
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from tm3.logs import RateLimit

PREFIX = "haproxy"
HEADER_TIMEOUT = 10.0
# Connections waiting for their header at once; more are closed at accept
# (each holds a descriptor for up to HEADER_TIMEOUT).
MAX_WAITING = 256
V1_MAX = 107  # the longest v1 line, CRLF included (the specification's figure)
V2_FIXED = 16  # the v2 signature, version and command, family, length


class BadHeader(ValueError):
    """Not a PROXY header, or a malformed one; the message says what."""


def parse_header(buffer: bytes) -> tuple[IAddress | None, bool, int] | None:
    """The header at the start of ``buffer``: (source address or None, whether it
    is a LOCAL connection, its length), or None while it is incomplete.

    :raises BadHeader: if ``buffer`` cannot start a valid header.
    """
    v2 = V2Parser.PREFIX
    if buffer[: len(v2)] == v2[: len(buffer)]:
        if len(buffer) < V2_FIXED:
            return None
        if buffer[12] & 0xF0 != 0x20:
            raise BadHeader(f"PROXY v2 version {buffer[12] >> 4}, not 2")
        size = V2_FIXED + int.from_bytes(buffer[14:16], "big")
        if len(buffer) < size:
            return None
        local = buffer[12] & 0x0F == 0
        info = _parse(V2Parser.parse, buffer[:size])
        return info, local, size
    v1 = V1Parser.PROXYSTR + b" "
    if buffer[: len(v1)] != v1[: len(buffer)]:
        raise BadHeader("not a PROXY header")
    end = buffer.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buffer) >= V1_MAX:
            raise BadHeader(f"PROXY v1 line longer than {V1_MAX} bytes")
        return None
    if buffer[:end].split(b" ")[1:2] == [V1Parser.UNKNOWN_PROTO]:
        return None, False, end + 2  # Twisted's parser wants a space after UNKNOWN; the specification does not
    return _parse(V1Parser.parse, buffer[:end]), False, end + 2


def _parse(parse: Any, header: bytes) -> IAddress | None:
    try:
        info = parse(header)
    # Twisted's parsers let a bad port (ValueError), bad bytes in an address
    # (UnicodeDecodeError) or a short v2 block (struct.error) through.
    except (InvalidProxyHeader, ValueError, IndexError, KeyError, struct.error) as e:
        if isinstance(e, MissingAddressData | struct.error):
            what = "addresses missing or cut short"
        elif isinstance(e, InvalidNetworkProtocol):
            what = "an unknown protocol or address family"
        elif isinstance(e, ValueError):
            what = "a malformed address or port"
        else:
            what = "not a PROXY v1 line or v2 block"
        raise BadHeader(f"malformed PROXY header: {what}") from None
    source: IAddress | None = info.source
    if isinstance(source, IPv4Address | IPv6Address):
        try:
            ip = ipaddress.ip_address(source.host)  # v1 takes any word for an address
        except ValueError:
            raise BadHeader(f"PROXY header source {source.host!r} is not an IP address") from None
        if (ip.version == 6) != isinstance(source, IPv6Address):
            raise BadHeader(f"PROXY header source {source.host!r} is not of the family the header says")
        if not 0 <= source.port <= 65535:
            raise BadHeader(f"PROXY header source port {source.port} is not in 0..65535")
    return source


def _where(peer: IAddress) -> str:
    return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"


# Connections past MAX_WAITING: one line per 10 s at most.
_CROWDED = RateLimit(10.0)


class ProxyHeaderProtocol(ProtocolWrapper):
    """Reads the header, then is the pipe's transport, with the real peer."""

    log = Logger()

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        # No wrapped protocol until the header names the peer.
        self.factory = factory
        self.proxy_factory = factory
        self.wrappedProtocol: IProtocol | None = None  # type: ignore[assignment]
        self.buffer = b""
        self.peer: IAddress | None = None
        self.timer: interfaces.IDelayedCall | None = None

    def makeConnection(self, transport: interfaces.ITransport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.proxy_factory.registerProtocol(self)
        factory = self.proxy_factory
        if factory.waiting >= factory.max_waiting:
            if _CROWDED.allow():
                self.log.warn(
                    "connection from {where} closed: {n} connections already wait for their PROXY header "
                    "({more} more closed since the last line)",
                    where=_where(transport.getPeer()),
                    n=factory.waiting,
                    more=_CROWDED.take_suppressed(),
                )
            cast(Any, transport).abortConnection()
            return
        factory.waiting += 1
        self.timer = factory.reactor.callLater(factory.timeout, self._too_slow)

    def logPrefix(self) -> str:
        return "ProxyHeaderProtocol"

    def getPeer(self) -> IAddress:
        if self.peer is not None:
            return self.peer
        assert self.transport is not None
        peer: IAddress = self.transport.getPeer()
        return peer

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self.disconnecting:
            return
        self.buffer += data
        try:
            parsed = parse_header(self.buffer)
        except BadHeader as e:
            self._refuse(str(e))
            return
        if parsed is None:
            return
        source, local, size = parsed
        self._stop_timer()
        rest, self.buffer = self.buffer[size:], b""
        if local:
            self.loseConnection()  # the balancer's health check: the accept was the answer
            return
        if source is not None:
            self.peer = source
        pipe = self.proxy_factory.build(self.getPeer())
        if pipe is None:  # refused (the pipe factory logged why)
            self.loseConnection()
            return
        self.wrappedProtocol = pipe
        pipe.makeConnection(self)  # type: ignore[arg-type]  # it provides what the TCP transport does
        if rest and self.wrappedProtocol is not None and not self.disconnecting:
            pipe.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        self.proxy_factory.unregisterProtocol(self)
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        if wrapped is not None:
            wrapped.connectionLost(reason)

    def _too_slow(self) -> None:
        self._stop_timer()
        self._refuse(f"sent no complete PROXY header within {self.proxy_factory.timeout:g} s")

    def _refuse(self, why: str) -> None:
        self._stop_timer()
        assert self.transport is not None
        self.log.warn(
            "connection from {where} closed: {why} (first bytes {first!r}); --listen haproxy: wants HAProxy's "
            "send-proxy-v2 on every connection",
            where=_where(self.transport.getPeer()),
            why=why,
            first=self.buffer[:16],
        )
        self.buffer = b""
        transport: Any = self.transport
        transport.abortConnection()

    def _stop_timer(self) -> None:
        """The wait for the header is over (one way or another)."""
        if self.timer is not None:
            self.proxy_factory.waiting -= 1
            if self.timer.active():
                self.timer.cancel()
        self.timer = None


class ProxyHeaderFactory(WrappingFactory):
    """Wraps the pipe factory: a connection becomes a pipe only once its
    header has named the peer; with ``tls``, a TLS server connection around
    the pipe."""

    protocol = ProxyHeaderProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        wrapped: IProtocolFactory,
        reactor: Any,
        tls: Any = None,
        timeout: float = HEADER_TIMEOUT,
        max_waiting: int = MAX_WAITING,
    ) -> None:
        super().__init__(wrapped)
        self.reactor = reactor
        self.timeout = timeout
        self.max_waiting = max_waiting
        self.waiting = 0  # connections whose header has not come yet
        self.tls = None if tls is None else TLSMemoryBIOFactory(tls, False, wrapped)

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol:  # type: ignore[override]
        return ProxyHeaderProtocol(self)

    def build(self, addr: IAddress) -> IProtocol | None:
        protocol: IProtocol | None = self.wrappedFactory.buildProtocol(addr)
        if protocol is None or self.tls is None:
            return protocol
        wrapped: IProtocol = self.tls.protocol(self.tls, protocol)
        return wrapped


@implementer(IStreamServerEndpoint)
class ProxiedEndpoint:
    """``endpoint`` with the PROXY header read first on every connection."""

    def __init__(self, reactor: Any, endpoint: IStreamServerEndpoint, tls: Any = None) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.tls = tls

    def listen(self, protocolFactory: IProtocolFactory) -> Any:
        return self.endpoint.listen(ProxyHeaderFactory(protocolFactory, self.reactor, self.tls))


def proxied(reactor: Any, endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """``haproxy:`` around ``endpoint``; around TLS (``ssl:``, ``tls:``), the
    header is read on the TCP beneath it."""
    if isinstance(endpoint, SSL4ServerEndpoint):
        # The endpoint's parts are private, but have not changed since the
        # endpoints began; tests/test_scaleout_haproxy.py runs TLS through HAProxy.
        tcp = TCP4ServerEndpoint(reactor, endpoint._port, endpoint._backlog, endpoint._interface)
        return ProxiedEndpoint(reactor, tcp, endpoint._sslContextFactory)
    return ProxiedEndpoint(reactor, endpoint)
