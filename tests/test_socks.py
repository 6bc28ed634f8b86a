"""Tests for :mod:`tm3.lp.socks`: the pure SOCKS5 handshake, the Twisted glue
on a ``StringTransport``, and the glue end to end over real loopback sockets
(curl and a raw socket client) through ``DirectSocks5``, a minimal
direct-connecting subclass that exists only here.
"""

# Twisted's test helpers and pytest-twisted's decorators are untyped; the
# rest is checked as strictly as tm3 itself.
# mypy: disable-error-code="no-untyped-call,untyped-decorator"

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    NoRouteError,
    TCPTimedOutError,
)
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IListeningPort,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from tests.support import processes
from tests.support.ports import free_port
from tests.support.waiting import until
from tm3.lp import socks
from tm3.lp.socks import (
    ADDRESS_TYPE_NOT_SUPPORTED,
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    COMMAND_NOT_SUPPORTED,
    CONNECTION_REFUSED,
    GENERAL_FAILURE,
    HOST_UNREACHABLE,
    NETWORK_UNREACHABLE,
    NOT_ALLOWED,
    SUCCEEDED,
    TTL_EXPIRED,
    ConnectRequest,
    Event,
    HandshakeFailed,
    HandshakeFinishedError,
    SendBytes,
    Socks5Handshake,
    Socks5Protocol,
    SocksError,
    reply,
)

reactor: Any = _reactor  # the global reactor, untyped as in Twisted itself

LOOPBACK = "127.0.0.1"
STEP_TIMEOUT = 15.0

# RFC 1928 messages, spelled out byte by byte.
GREETING = bytes([0x05, 0x01, 0x00])  # VER 5, NMETHODS 1, METHOD 00
METHOD_NO_AUTH_SELECTED = bytes([0x05, 0x00])
NO_ACCEPTABLE = bytes([0x05, 0xFF])
# VER 5, CMD CONNECT, RSV 0, ATYP IPv4, 127.0.0.1, port 80
CONNECT_IPV4 = bytes([0x05, 0x01, 0x00, 0x01, 127, 0, 0, 1, 0x00, 0x50])
# VER 5, CMD CONNECT, RSV 0, ATYP DOMAINNAME, len 11, "example.com", port 443
CONNECT_DOMAIN = bytes([0x05, 0x01, 0x00, 0x03, 11]) + b"example.com" + b"\x01\xbb"
# VER 5, CMD CONNECT, RSV 0, ATYP IPv6, ::1, port 8080
CONNECT_IPV6 = bytes([0x05, 0x01, 0x00, 0x04]) + bytes(15) + b"\x01" + b"\x1f\x90"


def request(cmd: int, atyp: int, address: bytes, port: int, rsv: int = 0) -> bytes:
    return bytes([0x05, cmd, rsv, atyp]) + address + struct.pack("!H", port)


def domain_request(name: bytes, port: int = 80, cmd: int = 0x01) -> bytes:
    return request(cmd, ATYP_DOMAIN, bytes([len(name)]) + name, port)


def feed_all(data: bytes) -> tuple[Socks5Handshake, list[Event]]:
    handshake = Socks5Handshake()
    return handshake, handshake.feed(data)


def single_failure(data: bytes) -> HandshakeFailed:
    handshake, events = feed_all(data)
    assert len(events) <= 2
    failure = events[-1]
    assert isinstance(failure, HandshakeFailed)
    assert handshake.finished
    with pytest.raises(HandshakeFinishedError):
        handshake.feed(b"more")
    return failure


# ---------------------------------------------------------------------------
# The pure handshake: RFC 1928 byte sequences
# ---------------------------------------------------------------------------


def test_reply_codes_are_rfc_1928() -> None:
    assert [
        socks.SUCCEEDED,
        socks.GENERAL_FAILURE,
        socks.NOT_ALLOWED,
        socks.NETWORK_UNREACHABLE,
        socks.HOST_UNREACHABLE,
        socks.CONNECTION_REFUSED,
        socks.TTL_EXPIRED,
        socks.COMMAND_NOT_SUPPORTED,
        socks.ADDRESS_TYPE_NOT_SUPPORTED,
    ] == list(range(9))
    assert set(socks.REPLY_MESSAGES) == set(range(9))


def test_greeting_selects_no_authentication() -> None:
    handshake, events = feed_all(GREETING)
    assert events == [SendBytes(METHOD_NO_AUTH_SELECTED)]
    assert not handshake.finished


def test_greeting_with_several_methods_selects_no_authentication() -> None:
    # GSSAPI, USERNAME/PASSWORD and NO AUTHENTICATION REQUIRED, in that order.
    _, events = feed_all(bytes([0x05, 0x03, 0x01, 0x02, 0x00]))
    assert events == [SendBytes(METHOD_NO_AUTH_SELECTED)]


def test_connect_ipv4() -> None:
    handshake, events = feed_all(GREETING + CONNECT_IPV4)
    assert events == [
        SendBytes(METHOD_NO_AUTH_SELECTED),
        ConnectRequest(ATYP_IPV4, "127.0.0.1", 80),
    ]
    assert handshake.finished
    assert handshake.leftover() == b""


def test_connect_domain() -> None:
    handshake = Socks5Handshake()
    assert handshake.feed(GREETING) == [SendBytes(METHOD_NO_AUTH_SELECTED)]
    assert handshake.feed(CONNECT_DOMAIN) == [ConnectRequest(ATYP_DOMAIN, "example.com", 443)]


def test_connect_ipv6_is_left_to_the_caller() -> None:
    _, events = feed_all(GREETING + CONNECT_IPV6)
    assert events[-1] == ConnectRequest(ATYP_IPV6, "::1", 8080)


def test_connect_ipv6_full_address() -> None:
    address = ipaddress.IPv6Address("2001:db8::8:800:200c:417a")
    _, events = feed_all(GREETING + request(1, ATYP_IPV6, address.packed, 1))
    assert events[-1] == ConnectRequest(ATYP_IPV6, "2001:db8::8:800:200c:417a", 1)


def test_reserved_byte_is_tolerated() -> None:
    _, events = feed_all(GREETING + request(1, ATYP_IPV4, bytes([10, 0, 0, 1]), 22, 0x5A))
    assert events[-1] == ConnectRequest(ATYP_IPV4, "10.0.0.1", 22)


def test_early_data_in_the_same_chunk_is_leftover() -> None:
    handshake, events = feed_all(GREETING + CONNECT_IPV4 + b"GET / HTTP/1.0\r\n\r\n")
    assert events[-1] == ConnectRequest(ATYP_IPV4, "127.0.0.1", 80)
    assert handshake.leftover() == b"GET / HTTP/1.0\r\n\r\n"


def test_large_early_data_is_handed_over_whole() -> None:
    early = os.urandom(1 << 20)
    handshake, _ = feed_all(GREETING + CONNECT_IPV4 + early)
    assert handshake.leftover() == early


def test_one_byte_at_a_time() -> None:
    handshake = Socks5Handshake()
    events: list[Event] = []
    for byte in GREETING + CONNECT_DOMAIN:
        events += handshake.feed(bytes([byte]))
    assert events == [
        SendBytes(METHOD_NO_AUTH_SELECTED),
        ConnectRequest(ATYP_DOMAIN, "example.com", 443),
    ]
    assert handshake.leftover() == b""


def test_empty_feeds_change_nothing() -> None:
    handshake = Socks5Handshake()
    assert handshake.feed(b"") == []
    assert handshake.feed(GREETING) == [SendBytes(METHOD_NO_AUTH_SELECTED)]
    assert handshake.feed(b"") == []
    assert handshake.feed(CONNECT_IPV4)[-1].port == 80  # type: ignore[union-attr]


def test_largest_messages_are_accepted() -> None:
    greeting = bytes([0x05, 0xFF]) + bytes(range(1, 255)) + b"\x00"
    assert len(greeting) == socks.MAX_GREETING_SIZE
    name = b".".join([b"a" * 63] * 3 + [b"b" * 63])  # 255 bytes, labels <= 63
    assert len(name) == 255
    connect = domain_request(name, 65535)
    assert len(connect) == socks.MAX_REQUEST_SIZE
    handshake = Socks5Handshake()
    events: list[Event] = []
    for byte in greeting + connect:
        events += handshake.feed(bytes([byte]))
    assert events == [
        SendBytes(METHOD_NO_AUTH_SELECTED),
        ConnectRequest(ATYP_DOMAIN, name.decode(), 65535),
    ]


def test_domain_with_trailing_dot() -> None:
    _, events = feed_all(GREETING + domain_request(b"localhost."))
    assert events[-1] == ConnectRequest(ATYP_DOMAIN, "localhost.", 80)


def test_feed_after_connect_request_raises() -> None:
    handshake, _ = feed_all(GREETING + CONNECT_IPV4 + b"early")
    with pytest.raises(HandshakeFinishedError):
        handshake.feed(b"late")
    with pytest.raises(HandshakeFinishedError):
        handshake.feed(b"")
    assert handshake.leftover() == b"early"


def test_leftover_before_the_request_raises() -> None:
    handshake, _ = feed_all(GREETING + CONNECT_IPV4[:-1])
    with pytest.raises(RuntimeError):
        handshake.leftover()


# ---------------------------------------------------------------------------
# The pure handshake: failures
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [0x00, 0x01, 0x06, 0x47, 0xFF])
def test_wrong_version_fails_without_reply(version: int) -> None:
    failure = single_failure(bytes([version]))  # decided on the first byte
    assert failure.reply == b""
    assert f"{version:#04x}" in failure.reason
    assert "SOCKS4" not in failure.reason


def test_socks4_request_is_named_as_such() -> None:
    # SOCKS4 CONNECT to 127.0.0.1:80 for user "u".
    failure = single_failure(bytes([0x04, 0x01, 0x00, 0x50, 127, 0, 0, 1]) + b"u\x00")
    assert failure.reply == b""
    assert "0x04" in failure.reason
    assert "SOCKS4" in failure.reason


def test_http_request_to_the_socks_port_fails_without_reply() -> None:
    failure = single_failure(b"GET / HTTP/1.1\r\n\r\n")
    assert failure.reply == b""
    assert "0x47" in failure.reason


@pytest.mark.parametrize(
    "greeting",
    [
        bytes([0x05, 0x01, 0x02]),  # USERNAME/PASSWORD only
        bytes([0x05, 0x02, 0x01, 0x02]),  # GSSAPI, USERNAME/PASSWORD
        bytes([0x05, 0x01, 0x80]),  # private method
        bytes([0x05, 0x00]),  # no methods at all
    ],
)
def test_no_acceptable_method(greeting: bytes) -> None:
    failure = single_failure(greeting + CONNECT_IPV4)
    assert failure.reply == NO_ACCEPTABLE


def test_wrong_version_in_request_fails_without_reply() -> None:
    handshake, events = feed_all(GREETING + b"\x04" + CONNECT_IPV4[1:])
    assert events[0] == SendBytes(METHOD_NO_AUTH_SELECTED)
    failure = events[1]
    assert isinstance(failure, HandshakeFailed)
    assert failure.reply == b"" and "request" in failure.reason
    assert "SOCKS4" in failure.reason


@pytest.mark.parametrize(("cmd", "name"), [(0x02, "BIND"), (0x03, "UDP ASSOCIATE"), (0x09, "0x09")])
def test_commands_other_than_connect_are_not_supported(cmd: int, name: str) -> None:
    failure = single_failure(GREETING + request(cmd, ATYP_IPV4, bytes(4), 0))
    assert failure.reply == bytes.fromhex("05 07 00 01 00000000 0000")
    assert name in failure.reason


def test_bind_is_refused_only_once_the_request_is_complete() -> None:
    # The reply comes after the whole request has been read, so closing does
    # not leave unread bytes that would turn the FIN into a RST.
    handshake = Socks5Handshake()
    bind = domain_request(b"example.com", 21, cmd=0x02)
    assert handshake.feed(GREETING + bind[:-1]) == [SendBytes(METHOD_NO_AUTH_SELECTED)]
    [failure] = handshake.feed(bind[-1:])
    assert isinstance(failure, HandshakeFailed)
    assert failure.reply == reply(COMMAND_NOT_SUPPORTED)
    assert "'example.com':21" in failure.reason


@pytest.mark.parametrize("atyp", [0x00, 0x02, 0x05, 0xFF])
def test_unknown_address_type(atyp: int) -> None:
    # Decided on the ATYP byte: the rest of the request has no known length.
    handshake = Socks5Handshake()
    handshake.feed(GREETING)
    [failure] = handshake.feed(bytes([0x05, 0x01, 0x00, atyp]))
    assert isinstance(failure, HandshakeFailed)
    assert failure.reply == bytes.fromhex("05 08 00 01 00000000 0000")
    assert f"{atyp:#04x}" in failure.reason


@pytest.mark.parametrize(
    ("name", "why"),
    [
        (b"", "empty"),
        (b"a" * 64 + b".com", "label of 64"),
        (b"exa\x00mple.com", "0x00"),
        (b"example.com\x00", "0x00"),
        (b"exa mple.com", "0x20"),
        (b"line\nbreak", "0x0a"),
        ("bücher.example".encode(), "0xc3"),
        (b"a..b", "empty label"),
        (b".", "empty label"),
        (b".example.com", "empty label"),
    ],
)
def test_invalid_domain_names(name: bytes, why: str) -> None:
    failure = single_failure(GREETING + domain_request(name))
    assert failure.reply == reply(HOST_UNREACHABLE)
    assert why in failure.reason


def test_failure_drops_the_rest_of_the_chunk() -> None:
    handshake, events = feed_all(bytes([0x05, 0x01, 0x02]) + CONNECT_IPV4 + b"data")
    assert events == [HandshakeFailed(NO_ACCEPTABLE, events[0].reason)]  # type: ignore[union-attr]
    with pytest.raises(RuntimeError):
        handshake.leftover()


# ---------------------------------------------------------------------------
# reply()
# ---------------------------------------------------------------------------


def test_reply_bytes() -> None:
    # VER 5, REP, RSV 0, ATYP IPv4, BND.ADDR, BND.PORT (network order).
    assert reply(SUCCEEDED) == bytes([5, 0, 0, 1, 0, 0, 0, 0, 0, 0])
    assert reply(CONNECTION_REFUSED, "10.0.0.1", 1080) == bytes([5, 5, 0, 1, 10, 0, 0, 1, 0x04, 0x38])
    assert reply(SUCCEEDED, "::1", 443) == (bytes([5, 0, 0, 4]) + bytes(15) + b"\x01" + b"\x01\xbb")


@pytest.mark.parametrize(("args"), [(-1,), (256,), (0, "0.0.0.0", -1), (0, "0.0.0.0", 65536), (0, "localhost")])
def test_reply_rejects_bad_arguments(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        reply(*args)


def test_socks_error() -> None:
    error = SocksError(CONNECTION_REFUSED)
    assert error.rep_code == CONNECTION_REFUSED
    assert error.message == "connection refused"
    assert "0x05" in str(error)
    with pytest.raises(ValueError):
        SocksError(SUCCEEDED)
    with pytest.raises(ValueError):
        SocksError(256)


# ---------------------------------------------------------------------------
# Fragmentation properties
# ---------------------------------------------------------------------------


def run_chunks(chunks: list[bytes]) -> tuple[list[Event], bytes | None]:
    """Feed ``chunks`` until the handshake ends; return its events and, after
    a ConnectRequest, everything the relay gets (leftover plus unfed chunks)."""
    handshake = Socks5Handshake()
    events: list[Event] = []
    for index, chunk in enumerate(chunks):
        events += handshake.feed(chunk)
        if handshake.finished:
            if isinstance(events[-1], ConnectRequest):
                return events, handshake.leftover() + b"".join(chunks[index + 1 :])
            return events, None
    return events, None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


labels = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=63)


@st.composite
def valid_sessions(draw: st.DrawFn) -> tuple[bytes, ConnectRequest, bytes]:
    methods = draw(st.lists(st.integers(1, 255), max_size=254))
    methods.insert(draw(st.integers(0, len(methods))), 0x00)
    greeting = bytes([0x05, len(methods), *methods])
    atyp = draw(st.sampled_from([ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6]))
    port = draw(st.integers(0, 65535))
    if atyp == ATYP_IPV4:
        address4 = draw(st.ip_addresses(v=4))
        raw, host = address4.packed, str(address4)
    elif atyp == ATYP_IPV6:
        address6 = draw(st.ip_addresses(v=6))
        raw = address6.packed
        host = socket.inet_ntop(socket.AF_INET6, raw)
    else:
        host = ".".join(draw(st.lists(labels, min_size=1, max_size=4)))[:255].strip(".")
        if not host or ".." in host:
            host = "localhost"
        raw = bytes([len(host)]) + host.encode()
    rsv = draw(st.integers(0, 255))
    data = greeting + request(0x01, atyp, raw, port, rsv)
    early = draw(st.binary(max_size=300))
    return data, ConnectRequest(atyp, host, port), early


@settings(max_examples=300, deadline=None)
@given(valid_sessions(), st.lists(st.integers(0, 1 << 16), max_size=40))
def test_any_split_of_a_valid_session(session: tuple[bytes, ConnectRequest, bytes], cuts: list[int]) -> None:
    handshake_bytes, expected, early = session
    data = handshake_bytes + early
    events, relayed = run_chunks(split(data, cuts))
    assert events == [SendBytes(METHOD_NO_AUTH_SELECTED), expected]
    assert relayed == early


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=600),
        # Start like SOCKS5 so the fuzzing gets past the first byte.
        st.binary(max_size=600).map(lambda b: b"\x05" + b),
        st.binary(max_size=600).map(lambda b: GREETING + b"\x05" + b),
    ),
    st.lists(st.integers(0, 1 << 16), max_size=40),
)
def test_any_input_any_split_same_outcome(data: bytes, cuts: list[int]) -> None:
    whole = run_chunks([data])
    assert run_chunks(split(data, cuts)) == whole
    assert run_chunks([bytes([b]) for b in data]) == whole
    events, _ = whole
    assert all(not isinstance(e, (ConnectRequest, HandshakeFailed)) for e in events[:-1])
    # Nothing is ever sent but RFC 1928 replies.
    for event in events:
        if isinstance(event, SendBytes):
            assert event.data == METHOD_NO_AUTH_SELECTED
        elif isinstance(event, HandshakeFailed):
            assert event.reply in (b"", NO_ACCEPTABLE) or (
                len(event.reply) == 10 and event.reply[:2] in (b"\x05\x01", b"\x05\x04", b"\x05\x07", b"\x05\x08")
            )


# ---------------------------------------------------------------------------
# The glue on a StringTransport
# ---------------------------------------------------------------------------


class Recording(Socks5Protocol):
    """Records the hooks. ``socks_connect`` returns ``outcome()`` if given,
    else a new pending Deferred (in ``pending``) whose canceller counts."""

    def __init__(
        self,
        outcome: Callable[[], Deferred[None]] | None = None,
        clock: Clock | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(clock, timeout)
        self.outcome = outcome
        self.connects: list[tuple[str, int, int]] = []
        self.pending: list[Deferred[None]] = []
        self.cancelled = 0
        self.established: list[bytes] = []
        self.relayed: list[bytes] = []
        self.eofs = 0
        self.aborted = 0

    def socks_connect(self, host: str, port: int, atyp: int) -> Deferred[None]:
        self.connects.append((host, port, atyp))
        if self.outcome is not None:
            return self.outcome()

        def cancel(_: Deferred[None]) -> None:
            self.cancelled += 1

        d: Deferred[None] = Deferred(cancel)
        self.pending.append(d)
        return d

    def socks_established(self, leftover: bytes) -> None:
        self.established.append(leftover)

    def relay_data(self, data: bytes) -> None:
        self.relayed.append(data)

    def relay_eof(self) -> None:
        self.eofs += 1

    def socks_aborted(self) -> None:
        self.aborted += 1


def connected(protocol: Socks5Protocol | None = None) -> tuple[Any, StringTransport]:
    proto = protocol if protocol is not None else Recording()
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


# -- the handshake timeout (--socks-timeout) ----------------------------------


def timed(timeout: float = 10.0) -> tuple[Any, StringTransport, Clock]:
    clock = Clock()
    proto, transport = connected(Recording(clock=clock, timeout=timeout))
    return proto, transport, clock


@pytest.mark.parametrize("said", [b"", b"\x05", GREETING, GREETING + CONNECT_IPV4[:5]])
def test_a_client_that_does_not_finish_its_handshake_is_closed_at_the_timeout(said: bytes) -> None:
    proto, transport, clock = timed(10.0)
    proto.dataReceived(said)
    clock.advance(9.9)
    assert not transport.disconnecting
    with capturedLogs() as events:
        clock.advance(0.1)
    assert transport.disconnecting
    assert transport.value() == (METHOD_NO_AUTH_SELECTED if said.startswith(GREETING) else b"")
    assert proto.connects == []
    assert any("did not finish its handshake in 10 s; closing" in formatEvent(e) for e in events)
    proto.connectionLost(connectionDone)
    assert not clock.getDelayedCalls()


def test_a_connect_still_pending_at_the_timeout_is_cancelled_and_answered() -> None:
    proto, transport, clock = timed(5.0)
    proto.dataReceived(GREETING + CONNECT_IPV4)
    transport.clear()
    clock.advance(5.0)
    assert proto.cancelled == 1 and proto.aborted == 1
    assert transport.value() == reply(TTL_EXPIRED)  # Socks5Protocol.socks_timed_out's default
    assert transport.disconnecting
    proto.connectionLost(connectionDone)
    assert proto.aborted == 1 and not clock.getDelayedCalls()


def test_the_timeout_ends_with_the_reply() -> None:
    proto, transport, clock = timed(5.0)
    proto.dataReceived(GREETING + CONNECT_IPV4)
    clock.advance(4.0)
    proto.pending[0].callback(None)
    assert transport.value().endswith(reply(SUCCEEDED))
    assert not clock.getDelayedCalls()
    clock.advance(60)
    assert not transport.disconnecting


def test_the_timeout_is_cancelled_by_a_refusal_and_by_a_lost_client() -> None:
    proto, transport, clock = timed()
    proto.dataReceived(b"\x04")  # SOCKS4: refused at once
    assert transport.disconnecting and not clock.getDelayedCalls()
    proto, transport, clock = timed()
    proto.dataReceived(GREETING)
    proto.connectionLost(connectionDone)
    assert not clock.getDelayedCalls()


def test_a_timeout_needs_a_clock() -> None:
    with pytest.raises(ValueError, match="needs a clock"):
        Socks5Protocol(timeout=1.0)


def test_glue_success_path() -> None:
    proto, transport = connected()
    proto.dataReceived(GREETING)
    assert transport.value() == METHOD_NO_AUTH_SELECTED
    transport.clear()
    proto.dataReceived(CONNECT_DOMAIN + b"early")
    assert proto.connects == [("example.com", 443, ATYP_DOMAIN)]
    assert transport.producerState == "paused"
    assert transport.value() == b""
    proto.pending[0].callback(None)
    assert transport.value() == reply(SUCCEEDED)
    assert transport.producerState == "producing"
    assert proto.established == [b"early"]
    proto.dataReceived(b"more")
    assert proto.relayed == [b"more"]
    assert not transport.disconnecting


def test_glue_synchronous_connect() -> None:
    proto = Recording(outcome=lambda: succeed(None))
    proto, transport = connected(proto)
    proto.dataReceived(GREETING + CONNECT_IPV4 + b"GET")
    assert transport.value() == METHOD_NO_AUTH_SELECTED + reply(SUCCEEDED)
    assert proto.established == [b"GET"]
    assert transport.producerState == "producing"


def test_glue_data_while_connecting_is_kept_in_order() -> None:
    # A transport that could not pause (or bytes read just before) still
    # delivers; they must reach the relay after the leftover, in order.
    proto, transport = connected()
    proto.dataReceived(GREETING + CONNECT_IPV4 + b"one ")
    proto.dataReceived(b"two ")
    proto.dataReceived(b"three")
    proto.pending[0].callback(None)
    assert proto.established == [b"one two three"]


def test_glue_eof_while_connecting_is_delivered_after_establishment() -> None:
    proto, transport = connected()
    proto.dataReceived(GREETING + CONNECT_IPV4 + b"request")
    proto.readConnectionLost()
    assert proto.eofs == 0 and not transport.disconnecting
    proto.pending[0].callback(None)
    assert proto.established == [b"request"]
    assert proto.eofs == 1


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (SocksError(NOT_ALLOWED, "policy"), NOT_ALLOWED),
        (SocksError(ADDRESS_TYPE_NOT_SUPPORTED), ADDRESS_TYPE_NOT_SUPPORTED),
        (ConnectionRefusedError(), CONNECTION_REFUSED),
        (DNSLookupError("nx"), HOST_UNREACHABLE),
        (NoRouteError(), NETWORK_UNREACHABLE),
        (ConnectError(113, "No route to host"), HOST_UNREACHABLE),  # EHOSTUNREACH
        (TCPTimedOutError(), TTL_EXPIRED),
        (ConnectError(), GENERAL_FAILURE),
    ],
)
def test_glue_connect_failure_replies(error: Exception, code: int) -> None:
    proto, transport = connected()
    proto.dataReceived(GREETING + CONNECT_IPV4)
    transport.clear()
    proto.pending[0].errback(Failure(error))
    assert transport.value() == reply(code)
    assert transport.disconnecting
    assert proto.established == [] and proto.aborted == 0


def test_glue_unexpected_exception_is_logged_and_general_failure() -> None:
    def boom() -> Deferred[None]:
        raise ZeroDivisionError("bug")

    proto, transport = connected(Recording(outcome=boom))
    with capturedLogs() as events:
        proto.dataReceived(GREETING + CONNECT_IPV4)
    assert transport.value() == METHOD_NO_AUTH_SELECTED + reply(GENERAL_FAILURE)
    assert transport.disconnecting
    assert any("log_failure" in e for e in events)


def test_glue_established_hook_crash_aborts() -> None:
    class Crashing(Recording):
        def socks_established(self, leftover: bytes) -> None:
            raise RuntimeError("relay setup bug")

    proto, transport = connected(Crashing(outcome=lambda: succeed(None)))
    with capturedLogs() as events:
        proto.dataReceived(GREETING + CONNECT_IPV4)
    assert transport.disconnecting
    assert any("log_failure" in e for e in events)


def test_glue_client_lost_while_connecting() -> None:
    proto, transport = connected()
    proto.dataReceived(GREETING + CONNECT_IPV4 + b"early")
    proto.connectionLost(Failure(ConnectionError("reset")))
    assert proto.cancelled == 1
    assert proto.aborted == 1
    # cancel() errbacked with CancelledError, which was swallowed quietly.
    assert proto.pending[0].called
    assert transport.value() == METHOD_NO_AUTH_SELECTED
    assert proto.established == []


def test_glue_client_lost_while_connecting_uncancellable() -> None:
    late: Deferred[None] = Deferred()
    proto, transport = connected(Recording(outcome=lambda: late))
    proto.dataReceived(GREETING + CONNECT_IPV4)
    proto.connectionLost(connectionDone)
    assert proto.aborted == 1
    late.callback(None)  # suppressed by Deferred after cancel(): no error
    assert proto.established == []
    assert transport.value() == METHOD_NO_AUTH_SELECTED


@pytest.mark.parametrize(
    ("data", "written"),
    [
        (bytes([0x04, 0x01, 0x00, 0x50, 127, 0, 0, 1, 0]), b""),
        (bytes([0x05, 0x01, 0x02]), NO_ACCEPTABLE),
        (GREETING + request(0x02, ATYP_IPV4, bytes(4), 0), reply(COMMAND_NOT_SUPPORTED)),
        (GREETING + request(0x03, ATYP_IPV4, bytes(4), 0), reply(COMMAND_NOT_SUPPORTED)),
        (GREETING + bytes([5, 1, 0, 7]), reply(ADDRESS_TYPE_NOT_SUPPORTED)),
        (GREETING + domain_request(b""), reply(HOST_UNREACHABLE)),
    ],
)
def test_glue_handshake_failures(data: bytes, written: bytes) -> None:
    proto, transport = connected()
    proto.dataReceived(data)
    expected = written if data[:1] == b"\x04" or data[2:3] != b"\x00" else (METHOD_NO_AUTH_SELECTED + written)
    assert transport.value() == expected
    assert transport.disconnecting
    assert proto.connects == []
    proto.dataReceived(b"ignored after failure")
    assert proto.relayed == []


def test_glue_eof_during_handshake_closes() -> None:
    proto, transport = connected()
    proto.dataReceived(GREETING)
    proto.readConnectionLost()
    assert transport.disconnecting
    assert proto.connects == []


def test_glue_half_close_after_establishment() -> None:
    proto, transport = connected(Recording(outcome=lambda: succeed(None)))
    proto.dataReceived(GREETING + CONNECT_IPV4)
    proto.readConnectionLost()
    assert proto.eofs == 1
    assert not transport.disconnecting  # the other direction still flows
    proto.writeConnectionLost()
    assert transport.disconnecting  # both halves shut down: close


def test_glue_default_relay_eof_closes() -> None:
    class Minimal(Socks5Protocol):
        def socks_connect(self, host: str, port: int, atyp: int) -> Deferred[None]:
            return succeed(None)

    proto, transport = connected(Minimal())
    proto.dataReceived(GREETING + CONNECT_IPV4)
    proto.readConnectionLost()
    assert transport.disconnecting


def test_glue_default_socks_connect_refuses() -> None:
    proto, transport = connected(Socks5Protocol())
    proto.dataReceived(GREETING + CONNECT_IPV4)
    assert transport.value() == METHOD_NO_AUTH_SELECTED + reply(NOT_ALLOWED)


# ---------------------------------------------------------------------------
# End to end with real sockets: DirectSocks5, an HTTP server, curl
# ---------------------------------------------------------------------------


def tcp(transport: object) -> Any:
    """``transport`` as what it is, a TCP connection: ITCPTransport, IConsumer
    and IPushProducer at once, which no single interface spells for mypy."""
    assert ITCPTransport.providedBy(transport), transport
    return transport


def port_number(port: IListeningPort) -> int:
    number: int = port.getHost().port  # type: ignore[attr-defined]
    return number


def _nodelay(protocol: Protocol) -> None:
    transport = ITCPTransport(protocol.transport, None)
    if transport is not None:
        transport.setTcpNoDelay(True)


class Tracker:
    """Every connection the test opened, so teardown can wait for all of
    them to close: a test that leaks a socket fails."""

    def __init__(self) -> None:
        self.open: dict[int, Deferred[None]] = {}
        self.requests: list[tuple[str, int, int]] = []

    def opened(self, protocol: Protocol) -> None:
        self.open[id(protocol)] = Deferred()

    def closed(self, protocol: Protocol) -> None:
        d = self.open.pop(id(protocol), None)
        if d is not None:
            d.callback(None)

    async def all_closed(self) -> None:
        waiting = list(self.open.values())
        if waiting:
            await DeferredList(waiting).addTimeout(STEP_TIMEOUT, reactor)


@implementer(IHalfCloseableProtocol)
class _Upstream(Protocol):
    """DirectSocks5's server-side connection."""

    def __init__(self, client: DirectSocks5) -> None:
        self.client = client
        self.read_closed = False
        self.write_closed = False

    def connectionMade(self) -> None:
        _nodelay(self)
        self.client.tracker.opened(self)

    def dataReceived(self, data: bytes) -> None:
        assert self.client.transport is not None
        self.client.transport.write(data)

    def readConnectionLost(self) -> None:
        # The server is done sending: pass its FIN on to the client.
        self.read_closed = True
        client = tcp(self.client.transport)
        client.unregisterProducer()
        client.loseWriteConnection()
        self._close_if_shut_down()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        self._close_if_shut_down()

    def _close_if_shut_down(self) -> None:
        if self.read_closed and self.write_closed:
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.client.tracker.closed(self)
        self.client.upstream_lost()


class DirectSocks5(Socks5Protocol):
    """The reference subclass: resolve (``localhost`` only), connect directly
    over TCP to a loopback address, relay both ways with backpressure (each
    transport the streaming producer of the other) and half-close."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.upstream: _Upstream | None = None
        self.aborted = False

    def connectionMade(self) -> None:
        _nodelay(self)
        self.tracker.opened(self)

    def socks_connect(self, host: str, port: int, atyp: int) -> Deferred[None]:
        self.tracker.requests.append((host, port, atyp))
        return Deferred.fromCoroutine(self._connect(host, port, atyp))

    async def _connect(self, host: str, port: int, atyp: int) -> None:
        if atyp == ATYP_IPV6:
            # Like TM3's pipes, which carry IPv4 destinations only.
            raise SocksError(ADDRESS_TYPE_NOT_SUPPORTED, "IPv4 only")
        if atyp == ATYP_DOMAIN:
            if host != "localhost":
                # These tests must not send a single packet off this host.
                raise SocksError(NOT_ALLOWED, f"test proxy resolves localhost only, not {host}")
            host = await reactor.resolve(host)
        if not ipaddress.IPv4Address(host).is_loopback:
            raise SocksError(NOT_ALLOWED, f"test proxy connects to loopback only, not {host}")
        upstream = await connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=5), _Upstream(self))
        # Cancelling fromCoroutine's Deferred cancels the awaited connect, so
        # an abort cannot leave a connected upstream behind.
        self.upstream = upstream

    def socks_established(self, leftover: bytes) -> None:
        assert self.upstream is not None and self.upstream.transport is not None
        client = tcp(self.transport)
        server = tcp(self.upstream.transport)
        server.registerProducer(client, True)
        client.registerProducer(server, True)
        if leftover:
            server.write(leftover)

    def relay_data(self, data: bytes) -> None:
        assert self.upstream is not None and self.upstream.transport is not None
        self.upstream.transport.write(data)

    def relay_eof(self) -> None:
        assert self.upstream is not None
        server = tcp(self.upstream.transport)
        server.unregisterProducer()
        server.loseWriteConnection()

    def socks_aborted(self) -> None:
        self.aborted = True

    def upstream_lost(self) -> None:
        transport = self.transport
        if transport is not None:
            tcp(transport).unregisterProducer()
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self.tracker.closed(self)
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            tcp(upstream.transport).unregisterProducer()
            upstream.transport.loseConnection()


BIG_BODY = hashlib.sha256(b"tm3").digest() * (4 * 1024 * 1024 // 32)  # 4 MiB


class HTTPServer(Protocol):
    """A raw HTTP/1.0-style server: one request, then close.

    ``GET /`` says hello and echoes the Host header; ``GET /big`` sends 4 MiB;
    ``POST /upload`` answers with the body's length and SHA-256.
    """

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.buffer = b""

    def connectionMade(self) -> None:
        self.tracker.opened(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        lines = head.split(b"\r\n")
        method, path, _ = lines[0].split(b" ")
        headers = dict((k.strip().lower(), v.strip()) for k, _, v in (line.partition(b":") for line in lines[1:]))
        length = int(headers.get(b"content-length", b"0"))
        if len(body) < length:
            return
        if method == b"POST" and path == b"/upload":
            payload = b"%d %s\n" % (length, hashlib.sha256(body).hexdigest().encode())
        elif path == b"/big":
            payload = BIG_BODY
        else:
            payload = b"hello via socks, host=" + headers.get(b"host", b"?") + b"\n"
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload)
        )
        self.transport.write(payload)
        self.transport.loseConnection()
        self.buffer = b""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.tracker.closed(self)


@implementer(IHalfCloseableProtocol)
class EchoServer(Protocol):
    """Echoes, and closes once the client has half-closed and all is sent."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def connectionMade(self) -> None:
        self.tracker.opened(self)

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def readConnectionLost(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.tracker.closed(self)


@attrs.define
class Rig:
    tracker: Tracker
    proxy_port: int
    http_port: int
    echo_port: int


def _listen(factory: Factory) -> IListeningPort:
    port: IListeningPort = reactor.listenTCP(0, factory, interface=LOOPBACK)
    return port


@pytest.fixture
def rig() -> Iterator[Rig]:
    tracker = Tracker()
    ports = [
        _listen(Factory.forProtocol(lambda: DirectSocks5(tracker))),
        _listen(Factory.forProtocol(lambda: HTTPServer(tracker))),
        _listen(Factory.forProtocol(lambda: EchoServer(tracker))),
    ]
    yield Rig(tracker, *(port_number(p) for p in ports))
    for port in ports:
        pytest_twisted.blockon(maybeDeferred(port.stopListening))
    assert tracker.open == {}, "connections leaked"
    leftover_calls = [c for c in reactor.getDelayedCalls() if c.active()]
    assert leftover_calls == [], "delayed calls leaked"


async def curl(*args: str) -> tuple[bytes, bytes, int]:
    """:func:`tests.support.processes.curl`, quiet, bounded by the step timeout."""
    result: tuple[bytes, bytes, int] = await processes.curl(
        "--silent", "--show-error", "--max-time", "10", *args
    ).addTimeout(STEP_TIMEOUT, reactor)
    return result


@pytest_twisted.ensureDeferred
async def test_curl_socks5_ipv4(rig: Rig) -> None:
    out, err, code = await curl("--socks5", f"{LOOPBACK}:{rig.proxy_port}", f"http://{LOOPBACK}:{rig.http_port}/")
    assert (code, err) == (0, b"")
    assert out == b"hello via socks, host=%s:%d\n" % (LOOPBACK.encode(), rig.http_port)
    assert rig.tracker.requests == [(LOOPBACK, rig.http_port, ATYP_IPV4)]
    await rig.tracker.all_closed()


@pytest_twisted.ensureDeferred
async def test_curl_socks5_hostname(rig: Rig) -> None:
    out, err, code = await curl(
        "--socks5-hostname",
        f"{LOOPBACK}:{rig.proxy_port}",
        f"http://localhost:{rig.http_port}/",
    )
    assert (code, err) == (0, b"")
    assert out == b"hello via socks, host=localhost:%d\n" % rig.http_port
    assert rig.tracker.requests == [("localhost", rig.http_port, ATYP_DOMAIN)]
    await rig.tracker.all_closed()


@pytest_twisted.ensureDeferred
async def test_curl_large_download_and_upload(rig: Rig) -> None:
    proxy = f"{LOOPBACK}:{rig.proxy_port}"
    out, err, code = await curl("--socks5", proxy, f"http://{LOOPBACK}:{rig.http_port}/big")
    assert (code, err) == (0, b"")
    assert out == BIG_BODY
    upload = os.urandom(3 * 1024 * 1024)
    path = f"/tmp/tm3-socks-upload-{os.getpid()}"
    with open(path, "wb") as f:
        f.write(upload)
    try:
        out, err, code = await curl(
            "--socks5-hostname",
            proxy,
            "-H",
            "Expect:",
            "--data-binary",
            f"@{path}",
            f"http://localhost:{rig.http_port}/upload",
        )
    finally:
        os.unlink(path)
    assert (code, err) == (0, b"")
    assert out == b"%d %s\n" % (len(upload), hashlib.sha256(upload).hexdigest().encode())
    await rig.tracker.all_closed()


@pytest_twisted.ensureDeferred
async def test_curl_connection_refused(rig: Rig) -> None:
    closed = free_port()
    out, err, code = await curl("--socks5", f"{LOOPBACK}:{rig.proxy_port}", f"http://{LOOPBACK}:{closed}/")
    assert code != 0 and out == b""
    assert b"SOCKS5 connection to 127.0.0.1. (5)" in err, err  # REP 5: refused
    await rig.tracker.all_closed()


@pytest_twisted.ensureDeferred
async def test_curl_hostname_not_allowed(rig: Rig) -> None:
    # The reply's code reaches the user; no name other than localhost is
    # resolved or connected to by the test proxy.
    out, err, code = await curl("--socks5-hostname", f"{LOOPBACK}:{rig.proxy_port}", "http://example.invalid/")
    assert code != 0 and out == b""
    assert b"SOCKS5 connection to example.invalid. (2)" in err, err  # REP 2
    assert rig.tracker.requests == [("example.invalid", 80, ATYP_DOMAIN)]
    await rig.tracker.all_closed()


def raw_session(
    proxy_port: int, *, one_byte_at_a_time: bool, payload: bytes, request_bytes: bytes
) -> tuple[bytes, bytes, bytes]:
    """A blocking SOCKS5 client (run in a thread): greeting, request and the
    first part of the payload optimistically, then the rest; half-close;
    read until EOF. Returns (method reply, CONNECT reply, relayed bytes)."""
    with socket.create_connection((LOOPBACK, proxy_port), timeout=STEP_TIMEOUT) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        opening = GREETING + request_bytes + payload[:1000]
        if one_byte_at_a_time:
            for byte in opening:
                s.sendall(bytes([byte]))
        else:
            s.sendall(opening)
        s.sendall(payload[1000:])
        s.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := s.recv(1 << 16):
            received += chunk
    return bytes(received[:2]), bytes(received[2:12]), bytes(received[12:])


@pytest.mark.parametrize("one_byte_at_a_time", [False, True])
@pytest_twisted.ensureDeferred
async def test_raw_client_echo_with_early_data_and_half_close(rig: Rig, one_byte_at_a_time: bool) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    target = request(0x01, ATYP_IPV4, socket.inet_aton(LOOPBACK), rig.echo_port)
    method, connect, echoed = await deferToThread(
        raw_session,
        rig.proxy_port,
        one_byte_at_a_time=one_byte_at_a_time,
        payload=payload,
        request_bytes=target,
    ).addTimeout(STEP_TIMEOUT, reactor)
    assert method == METHOD_NO_AUTH_SELECTED
    assert connect == reply(SUCCEEDED)
    assert echoed == payload  # the FIN went through, the echo came back whole
    await rig.tracker.all_closed()


def raw_exchange(proxy_port: int, data: bytes) -> bytes:
    """Send ``data`` and read what the proxy says until it closes."""
    with socket.create_connection((LOOPBACK, proxy_port), timeout=STEP_TIMEOUT) as s:
        s.sendall(data)
        received = bytearray()
        while chunk := s.recv(4096):
            received += chunk
    return bytes(received)


@pytest_twisted.ensureDeferred
async def test_raw_client_failures(rig: Rig) -> None:
    cases = [
        (bytes([0x04, 0x01, 0x00, 0x50, 127, 0, 0, 1]) + b"u\x00", b""),
        (bytes([0x05, 0x01, 0x02]), NO_ACCEPTABLE),
        (GREETING + request(0x02, ATYP_IPV4, bytes(4), 0), METHOD_NO_AUTH_SELECTED + reply(COMMAND_NOT_SUPPORTED)),
        (GREETING + request(0x03, ATYP_IPV4, bytes(4), 0), METHOD_NO_AUTH_SELECTED + reply(COMMAND_NOT_SUPPORTED)),
        (GREETING + bytes([5, 1, 0, 2]), METHOD_NO_AUTH_SELECTED + reply(ADDRESS_TYPE_NOT_SUPPORTED)),
        (GREETING + CONNECT_IPV6, METHOD_NO_AUTH_SELECTED + reply(ADDRESS_TYPE_NOT_SUPPORTED)),
        (GREETING + domain_request(b"a" * 64), METHOD_NO_AUTH_SELECTED + reply(HOST_UNREACHABLE)),
        (
            GREETING + request(1, ATYP_IPV4, socket.inet_aton(LOOPBACK), free_port()),
            METHOD_NO_AUTH_SELECTED + reply(CONNECTION_REFUSED),
        ),
    ]
    for data, expected in cases:
        got = await deferToThread(raw_exchange, rig.proxy_port, data).addTimeout(STEP_TIMEOUT, reactor)
        assert got == expected, data
    await rig.tracker.all_closed()


@pytest_twisted.ensureDeferred
async def test_client_abort_while_connecting_cancels_the_connect(rig: Rig) -> None:
    # A connect that never completes: socks_connect waits on a Deferred we
    # hold. Close the client connection from the server's end (as a timeout
    # would) and check the hook's Deferred was cancelled and socks_aborted ran.
    cancelled: list[bool] = []
    hung: list[Socks5Protocol] = []

    class Hanging(DirectSocks5):
        def socks_connect(self, host: str, port: int, atyp: int) -> Deferred[None]:
            hung.append(self)
            return Deferred(lambda d: cancelled.append(True))

    port = _listen(Factory.forProtocol(lambda: Hanging(rig.tracker)))
    try:
        client: Deferred[Any] = deferToThread(raw_exchange, port_number(port), GREETING + CONNECT_IPV4)
        await until(lambda: bool(hung), STEP_TIMEOUT, "the connect to hang")
        proto = hung[0]
        assert tcp(proto.transport).getPeer().host == LOOPBACK
        tcp(proto.transport).loseConnection()
        got = await client.addTimeout(STEP_TIMEOUT, reactor)
        assert got == METHOD_NO_AUTH_SELECTED
        assert cancelled == [True]
        assert isinstance(proto, Hanging) and proto.aborted
        await rig.tracker.all_closed()
    finally:
        await maybeDeferred(port.stopListening)


@pytest_twisted.ensureDeferred
async def test_client_gone_during_connect_is_cleaned_up_when_it_settles(rig: Rig) -> None:
    # Reading is paused while connecting, so a client's FIN is not seen
    # then; it must be seen once the connect completes, and every socket
    # (client side and the new upstream) must still be closed.
    gate: Deferred[None] = Deferred()
    gated: list[DirectSocks5] = []

    class Gated(DirectSocks5):
        def socks_connect(self, host: str, port: int, atyp: int) -> Deferred[None]:
            gated.append(self)

            def go(_: None) -> Deferred[None]:
                return DirectSocks5.socks_connect(self, host, port, atyp)

            return gate.addCallback(go)

    port = _listen(Factory.forProtocol(lambda: Gated(rig.tracker)))
    try:
        target = request(0x01, ATYP_IPV4, socket.inet_aton(LOOPBACK), rig.echo_port)

        def client_gives_up() -> bytes:
            with socket.create_connection((LOOPBACK, port_number(port))) as s:
                s.sendall(GREETING + target)
                return s.recv(2)  # the method reply, then close at once

        got = await deferToThread(client_gives_up).addTimeout(STEP_TIMEOUT, reactor)
        assert got == METHOD_NO_AUTH_SELECTED
        await until(lambda: bool(gated), STEP_TIMEOUT, "the connect to reach the gate")
        assert rig.tracker.open  # the proxy has not noticed yet
        gate.callback(None)
        await rig.tracker.all_closed()
        assert rig.tracker.requests == [(LOOPBACK, rig.echo_port, ATYP_IPV4)]
    finally:
        await maybeDeferred(port.stopListening)
