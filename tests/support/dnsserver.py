"""A DNS server on loopback for tests of the LP's resolver: real UDP and TCP
sockets in the test's reactor, answers chosen per name.

- ``fast.test`` (any case): an A record, 127.0.0.1, at once.
- ``alias.test``: a CNAME to ``fast.test`` and its A record (what a
  recursive server sends); ``lame.test``: a CNAME to ``fast.test`` alone.
- ``dead*.test``: never answered (a server that drops the query).
- anything else: NXDOMAIN.

:attr:`Names.asked` lists the names queried, in order, so a test can wait
until the server has seen a query instead of sleeping.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.names import dns, error, server
from twisted.names.common import ResolverBase

from tests.support.ports import HOST

FAST_ADDRESS = "127.0.0.1"


def _a(name: bytes) -> dns.RRHeader:
    return dns.RRHeader(name, dns.A, dns.IN, 0, dns.Record_A(FAST_ADDRESS, 0))


def _cname(name: bytes, target: bytes) -> dns.RRHeader:
    return dns.RRHeader(name, dns.CNAME, dns.IN, 0, dns.Record_CNAME(target, 0))


class Names(ResolverBase):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any) -> defer.Deferred[Any]:
        text = name.decode().lower()
        self.asked.append(text)
        if text.startswith("dead") and text.endswith(".test"):
            return defer.Deferred()  # never answered
        if type == dns.A and text == "fast.test":
            return defer.succeed(([_a(name)], [], []))
        if type == dns.A and text == "alias.test":
            return defer.succeed(([_cname(name, b"fast.test"), _a(b"fast.test")], [], []))
        if type == dns.A and text == "lame.test":
            return defer.succeed(([_cname(name, b"fast.test")], [], []))
        return defer.fail(error.AuthoritativeDomainError(text))


class DnsServer:
    """:class:`Names` served on ``HOST``, UDP and TCP on the same port
    (``listening``: the two ports, for the test's ``env.ports``)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.names = Names()
        self.port = 0
        self.listening: list[Any] = []

    def start(self) -> DnsServer:
        factory = server.DNSServerFactory(clients=[self.names], verbose=0)
        for _ in range(20):  # the UDP port's number may be taken for TCP
            udp = self.reactor.listenUDP(0, dns.DNSDatagramProtocol(controller=factory), interface=HOST)
            try:
                tcp = self.reactor.listenTCP(udp.getHost().port, factory, interface=HOST)
            except CannotListenError:
                udp.stopListening()
                continue
            self.listening = [udp, tcp]
            self.port = udp.getHost().port
            return self
        raise AssertionError("no port free for both UDP and TCP")
