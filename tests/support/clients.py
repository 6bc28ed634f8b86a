"""A test client for our LP: :class:`Client`, a Twisted protocol that can
speak the client side of SOCKS5 first, and the SOCKS5 request tuples it takes.

The SOCKS5 constants are spelled out here rather than imported from
:mod:`tm3.lp.socks`, so the client does not share the LP's mistakes.
"""

from __future__ import annotations

import hashlib
import socket
import struct

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.support.waiting import Event

ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04
REP_SUCCEEDED, REP_NETWORK_UNREACHABLE, REP_HOST_UNREACHABLE, REP_ATYP_NOT_SUPPORTED = 0x00, 0x03, 0x04, 0x08


def socks_ipv4(host: str, port: int) -> tuple[int, bytes, int]:
    return ATYP_IPV4, socket.inet_aton(host), port


def socks_name(name: str, port: int) -> tuple[int, bytes, int]:
    raw = name.encode()
    return ATYP_DOMAIN, bytes((len(raw),)) + raw, port


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """A test client: keeps (or only hashes) what it receives, can half-close
    and reset, and can first ask a SOCKS5 server for ``socks`` = (ATYP,
    address bytes as in the request, port).

    ``lost`` fires with the exception that ended the connection (a result to
    check, not an error); ``eof`` with the server's FIN. After our own
    half-close, the server's FIN closes the socket; without it the socket
    stays half-open (the test may still send) unless ``close_on_eof``.
    """

    def __init__(
        self,
        keep: bool = True,
        socks: tuple[int, bytes, int] | None = None,
        close_on_eof: bool = False,
        optimistic: bytes | None = None,
    ) -> None:
        """``optimistic``: send the SOCKS5 greeting, the request and these
        bytes at once, without waiting for the replies."""
        self.keep = keep
        self.optimistic = optimistic
        self.close_on_eof = close_on_eof
        self.data = bytearray()
        self.hash = hashlib.sha256()
        self.received = 0
        self.eof = Event()
        self.lost = Event()
        self.write_closed = False
        self.socks = socks
        self.socks_reply = Event()  # fires with the REP code
        self.socks_method: bytes | None = None
        self._socks_buf = bytearray()
        self._socks_stage = 0 if socks is not None else 2
        self._waiting: list[tuple[int, defer.Deferred[int]]] = []

    # -- Twisted callbacks ----------------------------------------------------------

    def connectionMade(self) -> None:
        if self.socks is not None:
            self.transport.write(b"\x05\x01\x00")  # VER, one method: no authentication
            if self.optimistic is not None:
                self.transport.write(self._socks_request() + self.optimistic)

    def dataReceived(self, data: bytes) -> None:
        if self._socks_stage < 2:
            self._socks_buf += data
            data = self._socks_step()
            if not data:
                return
        self.received += len(data)
        self.hash.update(data)
        if self.keep:
            self.data += data
        if self._waiting:
            ready = [w for w in self._waiting if self.received >= w[0]]
            self._waiting = [w for w in self._waiting if self.received < w[0]]
            for _, d in ready:
                d.callback(self.received)

    def _socks_step(self) -> bytes:
        buf = self._socks_buf
        if self._socks_stage == 0:
            if len(buf) < 2:
                return b""
            self.socks_method = bytes(buf[:2])
            del buf[:2]
            if self.optimistic is None:
                self.transport.write(self._socks_request())
            self._socks_stage = 1
        if len(buf) < 5:
            return b""
        atyp = buf[3]
        size = 4 + {ATYP_IPV4: 4, ATYP_IPV6: 16, ATYP_DOMAIN: 1 + buf[4]}.get(atyp, 0) + 2
        if len(buf) < size:
            return b""
        self._socks_stage = 2
        rest = bytes(buf[size:])
        self.socks_reply.fire(buf[1] if buf[0] == 5 else -1)
        buf.clear()
        return rest

    def _socks_request(self) -> bytes:
        assert self.socks is not None
        atyp, addr, port = self.socks
        return bytes((5, 1, 0, atyp)) + addr + struct.pack("!H", port)

    def readConnectionLost(self) -> None:
        self.eof.fire()
        if self.write_closed or self.close_on_eof:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.eof.fired:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.fire(reason.value)
        self.socks_reply.fire(None)
        waiting, self._waiting = self._waiting, []
        for n, d in waiting:
            d.errback(AssertionError(f"connection lost ({reason.value!r}) after {self.received} of {n} bytes"))

    # -- for tests ------------------------------------------------------------------

    def use_socks(self, request: tuple[int, bytes, int]) -> None:
        """Ask for ``request`` with SOCKS5 first (before connecting)."""
        self.socks = request
        self._socks_stage = 0

    def when_received(self, n: int) -> defer.Deferred[int]:
        if self.received >= n:
            return defer.succeed(self.received)
        d: defer.Deferred[int] = defer.Deferred(lambda d: self._waiting.remove((n, d)))
        self._waiting.append((n, d))
        return d

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def shutdown_write(self) -> None:
        self.transport.loseWriteConnection()

    def reset(self) -> None:
        """Close with SO_LINGER 0: the peer gets a RST, not a FIN."""
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abortConnection()

    @property
    def digest(self) -> str:
        return self.hash.hexdigest()
