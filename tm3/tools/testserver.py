"""``tm3-testserver``: the request/response end of the TM3 experiment tools.

This module owns the server (the Python equivalent of the original TM3
``server.cpp``); it writes its responses with
:class:`~tm3.tools.streaming.PatternWriter`, as ``tm3-testclient`` writes its
request bodies.

Per connection the server reads any number of requests (header and body, see
:mod:`tm3.tools.testproto`), verifies every body byte as it arrives (the body is
never buffered), and answers each with exactly the requested number of
pattern bytes.  A corrupt request (bad magic or a wrong body byte) is logged
and the connection is aborted (RST), so the client sees an error rather than a
clean close.  When the client half-closes, the server finishes the responses
it owes and then closes; that orderly close is how a client learns that its
final requests were accepted too.  One log line per connection summarises it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import cast

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IListeningPort,
    IPushProducer,
    IReactorCore,
    IReactorTCP,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure
from zope.interface import implementer

from tm3.cli import version_line
from tm3.tools.streaming import PatternWriter, react_exit_code
from tm3.tools.testproto import (
    HEADER_SIZE,
    HeaderError,
    PatternChecker,
    RequestHeader,
    Stream,
    decode_header,
)

__all__ = [
    "TestServerFactory",
    "TestServerProtocol",
    "build_parser",
    "describe_address",
    "listen_testserver",
    "main",
]

log = Logger()

#: Responses owed on one connection before the server stops reading from it.
#: Only a pipelining client gets here (ours is sequential); without the limit
#: a client that sends requests but never reads would grow the queue forever.
MAX_QUEUED_RESPONSES = 64


def describe_address(address: IAddress) -> str:
    """``host:port`` (``[host]:port`` for IPv6) for TCP addresses, else ``str``."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@implementer(IHalfCloseableProtocol)
class TestServerProtocol(Protocol):
    """One client connection: verify requests as they stream in, answer each."""

    log = Logger()
    factory: TestServerFactory

    def __init__(self) -> None:
        self.peer = "?"
        self.requests = 0
        self.bytes_in = 0
        self.mismatches = 0
        self._header = bytearray()
        self._request: RequestHeader | None = None
        self._checker: PatternChecker | None = None
        self._writer: PatternWriter | None = None
        self._reading_paused = False
        self._eof = False
        self._rejected = False

    @property
    def bytes_out(self) -> int:
        return 0 if self._writer is None else self._writer.bytes_written

    @property
    def writer(self) -> PatternWriter:
        assert self._writer is not None, "not connected yet"
        return self._writer

    def connectionMade(self) -> None:
        assert self.transport is not None
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self.peer = describe_address(self.transport.getPeer())
        self._writer = PatternWriter(
            IConsumer(self.transport),
            on_sent=self._response_sent,
            on_idle=self._writer_idle,
        )
        self.factory.active.add(self)
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        if self._rejected:
            return
        self.bytes_in += len(data)
        self.factory.bytes_in += len(data)
        view = memoryview(data)
        pos, end = 0, len(view)
        while True:
            if self._checker is None:
                take = min(HEADER_SIZE - len(self._header), end - pos)
                self._header += view[pos : pos + take]
                pos += take
                if len(self._header) < HEADER_SIZE:
                    return
                try:
                    request = decode_header(self._header)
                except HeaderError as e:
                    self._reject(
                        "{peer}: bad request header {header}: {error}; aborting connection",
                        header=bytes(self._header).hex(),
                        error=str(e),
                    )
                    return
                self._header.clear()
                self._request = request
                self._checker = PatternChecker(request.index, Stream.REQUEST, request.request_length)
            take = min(self._checker.remaining, end - pos)
            if take:
                mismatch = self._checker.feed(view[pos : pos + take])
                pos += take
                if mismatch is not None:
                    self._reject(
                        "{peer}: request {index} body corrupt: {what}; aborting connection",
                        index=self._checker.index,
                        what=mismatch.describe(),
                    )
                    return
            if not self._checker.complete:
                return
            self._request_complete()

    def _request_complete(self) -> None:
        request = self._request
        assert request is not None
        self._request = None
        self._checker = None
        self.requests += 1
        self.factory.requests += 1
        self.writer.send(b"", request.index, Stream.RESPONSE, request.response_length)
        if self.writer.queued >= MAX_QUEUED_RESPONSES and not self._reading_paused:
            self._reading_paused = True
            IPushProducer(self.transport).pauseProducing()

    def _response_sent(self, index: int) -> None:
        if self._reading_paused and self.writer.queued <= MAX_QUEUED_RESPONSES // 2:
            self._reading_paused = False
            IPushProducer(self.transport).resumeProducing()

    def _writer_idle(self) -> None:
        if self._eof and self.transport is not None:
            self.transport.loseConnection()

    def _reject(self, format: str, **fields: object) -> None:
        self._rejected = True
        self.mismatches += 1
        self.factory.mismatches += 1
        self.log.error(format, peer=self.peer, **fields)
        self.writer.cancel()
        # An abort (RST) rather than a FIN, so that a client which has
        # already half-closed cannot mistake this for "all accepted".
        cast(ITCPTransport, self.transport).abortConnection()

    def readConnectionLost(self) -> None:
        self._eof = True
        assert self.transport is not None
        if self._checker is not None or self._header:
            received = len(self._header) if self._checker is None else self._checker.received
            self.log.warn(  # twisted.logger has no .warning
                "{peer}: client closed mid-request ({what}, {received} bytes of it received)",
                peer=self.peer,
                what="header" if self._checker is None else f"request {self._checker.index}",
                received=received,
            )
            self.writer.cancel()
            self.transport.loseConnection()
        elif self.writer.idle:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        # We never half-close our side, so this only happens as the
        # connection goes away; connectionLost follows.
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.active.discard(self)
        self.factory.bytes_out += self.bytes_out
        self.log.info(
            "{peer}: {requests} requests, {bytes_in} bytes in, {bytes_out} bytes out, {mismatches} corrupt; {how}",
            peer=self.peer,
            requests=self.requests,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            mismatches=self.mismatches,
            how="closed" if isinstance(reason.value, ConnectionDone) else reason.getErrorMessage(),
        )


class TestServerFactory(Factory[TestServerProtocol]):
    """Builds :class:`TestServerProtocol` and keeps totals across connections."""

    protocol = TestServerProtocol
    # Twisted's "Starting factory" lines are noise next to our own per-connection line.
    noisy = False

    def __init__(self) -> None:
        self.active: set[TestServerProtocol] = set()
        self.connections = 0
        self.requests = 0
        self.mismatches = 0
        self.bytes_in = 0
        self.bytes_out = 0


def listen_testserver(
    reactor: IReactorTCP,
    endpoint_or_port: IStreamServerEndpoint | int | str,
    *,
    interface: str = "",
    factory: TestServerFactory | None = None,
) -> Deferred[IListeningPort]:
    """Start serving; stop with the returned port's ``stopListening()``.

    ``endpoint_or_port`` is a TCP port number (0 picks a free one, bound on
    ``interface``, "" meaning all IPv4 addresses and "::" all IPv6 ones), an
    endpoint description string such as ``"tcp:6001:interface=127.0.0.1"``,
    or an endpoint.  Pass ``factory`` to inspect connections and totals.
    """
    if factory is None:
        factory = TestServerFactory()
    endpoint: IStreamServerEndpoint
    if isinstance(endpoint_or_port, int):
        endpoint = TCP4ServerEndpoint(  # type: ignore[no-untyped-call]  # untyped in Twisted
            reactor, endpoint_or_port, interface=interface
        )
    elif isinstance(endpoint_or_port, str):
        endpoint = serverFromString(reactor, endpoint_or_port)  # type: ignore[no-untyped-call]
    else:
        endpoint = endpoint_or_port
    return endpoint.listen(factory)


def _port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in 0..65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tm3-testserver",
        description=(
            "Serve TM3 test requests over TCP: verify every request body byte against"
            " the deterministic pattern and answer each request with exactly the"
            " requested number of pattern bytes. Logs one line per connection to"
            " stdout. Runs until interrupted (Ctrl-C or SIGTERM)."
        ),
    )
    parser.add_argument("--version", action="version", version=version_line("tm3-testserver"))
    parser.add_argument(
        "port",
        metavar="PORT",
        type=_port_number,
        help="TCP port to listen on, 1..65535; 0 picks a free port (logged at startup)",
    )
    parser.add_argument(
        "--interface",
        metavar="ADDR",
        default="",
        help=("local address to bind, e.g. 127.0.0.1 or :: for all IPv6 addresses (default: all IPv4 addresses)"),
    )
    return parser


async def _serve(reactor: IReactorCore, args: argparse.Namespace) -> None:
    try:
        port = await listen_testserver(
            reactor,  # type: ignore[arg-type]  # the global reactor is every IReactor*
            args.port,
            interface=args.interface,
        )
    except CannotListenError as e:
        log.error("cannot listen on port {port}: {error}", port=args.port, error=str(e))
        raise SystemExit(1) from None
    log.info("listening on {address}", address=describe_address(port.getHost()))
    # Serve until the reactor is stopped by a signal; react then exits 0.
    await Deferred()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    return react_exit_code(_serve, args)


if __name__ == "__main__":
    sys.exit(main())
