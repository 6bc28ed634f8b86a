"""``tm3-testclient``: the measuring end of the TM3 experiment tools.

This module owns the client (the Python equivalent of the original TM3
``client.cpp``): it sends COUNT requests of REQ_SIZE pattern bytes, verifies
every byte of the COUNT responses of RESP_SIZE bytes, and reports timing.

How COUNT is split over ``--parallel K`` connections: connection ``c`` (0-based)
sends the requests with indices ``c, c + K, c + 2K, ...`` below COUNT, so it
gets ``COUNT // K`` requests plus one more if ``c < COUNT % K``.  When K exceeds
COUNT only COUNT connections are opened (each with one request).  Request
indices are global, so every response in the run has its own pattern.

Requests on one connection are strictly sequential: send request ``i``, read
all of response ``i``, then send the next.  With RESP_SIZE 0 there is nothing
to wait for, so a request counts as answered once it has been handed to the
transport.  After its last response a connection half-closes; the test server
then closes cleanly once it has verified every request, or resets the
connection if one was corrupt, so even the final requests (and 0-byte
responses) are confirmed.  The run fails fast: the first error aborts every
connection.  ``--timeout`` is a deadline for the whole run, connecting included.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import cast

from attrs import define, field, frozen
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableDescriptor,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from tm3.cli import version_line
from tm3.tools.streaming import PatternWriter, react_exit_code
from tm3.tools.testproto import MAX_U32, PatternChecker, Stream, encode_header

__all__ = [
    "ClientError",
    "ClientResult",
    "TestClientProtocol",
    "build_parser",
    "main",
    "run_client",
    "split_requests",
]


def split_requests(count: int, parallel: int) -> list[range]:
    """The request indices each connection sends (see the module docstring)."""
    if count < 1 or parallel < 1:
        raise ValueError(f"count and parallel must be >= 1, got {count}, {parallel}")
    return [range(c, count, parallel) for c in range(min(count, parallel))]


@frozen
class ClientError:
    """What went wrong; ``kind`` is one of the ``KINDS``."""

    KINDS = ("refused", "connect", "reset", "closed", "mismatch", "extra", "timeout")

    kind: str
    message: str
    #: The request index whose response was being received, if any.
    response_index: int | None = None
    #: For "mismatch": the offset of the first wrong byte in that response.
    offset: int | None = None


@frozen
class ClientResult:
    """The outcome of one run; :attr:`ok` is the verdict."""

    host: str
    port: int
    count: int
    request_size: int
    response_size: int
    connections: int
    completed: int
    #: Seconds from starting to connect until the last response was verified
    #: (until the failure, for a failed run).
    elapsed: float
    #: Per request, seconds from starting to send it to its last response byte.
    latencies: tuple[float, ...]
    error: ClientError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.completed == self.count

    def report(self) -> str:
        """The human-readable timing summary that the CLI prints."""
        mb = 1e6
        lines = [
            (
                f"tm3-testclient: {self.count} requests of {self.request_size} bytes,"
                f" responses of {self.response_size} bytes, to {self.host}:{self.port}"
                f" over {self.connections} connection{'s' if self.connections != 1 else ''}"
            ),
            f"completed: {self.completed} of {self.count} requests",
            f"total time: {self.elapsed:.6f} s (connection setup included)",
        ]
        if self.completed and self.elapsed > 0:
            up = self.completed * self.request_size / self.elapsed / mb
            down = self.completed * self.response_size / self.elapsed / mb
            lines += [
                f"requests/s: {self.completed / self.elapsed:.1f}",
                (
                    f"throughput: {up + down:.3f} MB/s ({up:.3f} MB/s requests,"
                    f" {down:.3f} MB/s responses; payload only, 1 MB = 10^6 bytes)"
                ),
            ]
        if self.latencies:
            ms = sorted(x * 1e3 for x in self.latencies)
            p99 = ms[max(0, math.ceil(0.99 * len(ms)) - 1)]
            lines.append(
                f"latency ms: min {ms[0]:.3f}  median {statistics.median(ms):.3f}  p99 {p99:.3f}  max {ms[-1]:.3f}"
            )
        if self.ok:
            lines.append(f"OK: all {self.count} responses verified")
        else:
            lines.append(f"FAILED: {self.failure_message()}")
        return "\n".join(lines)

    def failure_message(self) -> str:
        if self.error is not None:
            return self.error.message
        if self.completed != self.count:
            return f"only {self.completed} of {self.count} requests completed"
        return ""


@define(eq=False)
class _Run:
    """State shared by the connections of one run."""

    reactor: IReactorTime
    host: str
    port: int
    count: int
    request_size: int
    response_size: int
    timeout: float
    started: float = field(factory=time.perf_counter)
    ended: float | None = None
    completed: int = 0
    latencies: list[float] = field(factory=list)
    error: ClientError | None = None
    protocols: set[TestClientProtocol] = field(factory=set)
    connecting: set[Deferred[TestClientProtocol]] = field(factory=set)

    def completed_one(self, latency: float) -> None:
        self.completed += 1
        self.latencies.append(latency)
        if self.completed == self.count:
            self.ended = time.perf_counter()

    def fail(self, error: ClientError) -> None:
        """Record the first error and tear everything down."""
        if self.error is not None:
            return
        self.error = error
        self.ended = time.perf_counter()
        for d in list(self.connecting):
            d.cancel()
        for p in list(self.protocols):
            p.abort()

    def time_out(self) -> None:
        in_flight = [p.progress() for p in self.protocols if p.progress()]
        detail = f"; {', '.join(in_flight)}" if in_flight else ""
        self.fail(
            ClientError(
                "timeout",
                f"timed out after {self.timeout:g} s with {self.completed} of {self.count} requests completed{detail}",
            )
        )


class TestClientProtocol(Protocol):
    """One connection: its share of the requests, one at a time."""

    def __init__(self, run: _Run, connection: int, indices: range) -> None:
        self._run = run
        self._connection = connection
        self._indices = indices
        self._next = 0
        self._checker: PatternChecker | None = None
        self._sent_at = 0.0
        self._writer: PatternWriter | None = None
        self._all_answered = False
        self._half_close_pending = False
        #: Fires (never fails) once the connection is closed, for whatever reason.
        self.finished: Deferred[None] = Deferred()

    def progress(self) -> str:
        """Where this connection is, for timeout messages; "" if nowhere special."""
        c = self._checker
        if c is None:
            return ""
        return (
            f"connection {self._connection} waiting for response {c.index} ({c.received} of {c.length} bytes received)"
        )

    def connectionMade(self) -> None:
        assert self.transport is not None
        if ITCPTransport.providedBy(self.transport):
            self.transport.setTcpNoDelay(True)
        self._run.protocols.add(self)
        self._writer = PatternWriter(
            IConsumer(self.transport),
            on_sent=self._request_sent,
            on_idle=self._writer_idle,
        )
        if self._run.error is not None:
            self.abort()
            return
        self._send_next()

    def abort(self) -> None:
        """Drop the connection at once (RST); connectionLost follows."""
        if self.transport is not None:
            cast(ITCPTransport, self.transport).abortConnection()

    def _send_next(self) -> None:
        assert self._writer is not None
        if self._next == len(self._indices):
            self._all_answered = True
            self._half_close_pending = True
            if self._writer.idle:
                self._half_close()
            return
        index = self._indices[self._next]
        self._next += 1
        run = self._run
        self._checker = PatternChecker(index, Stream.RESPONSE, run.response_size)
        self._sent_at = time.perf_counter()
        header = encode_header(index, run.request_size, run.response_size)
        # May call _request_sent before returning; see PatternWriter._pump.
        self._writer.send(header, index, Stream.REQUEST, run.request_size)

    def _request_sent(self, index: int) -> None:
        c = self._checker
        if c is not None and c.index == index and c.length == 0:
            self._response_complete()

    def _writer_idle(self) -> None:
        if self._half_close_pending:
            self._half_close()

    def _half_close(self) -> None:
        # Our FIN tells the server we are done; it closes once it has checked
        # everything, and resets instead if something was corrupt.
        self._half_close_pending = False
        assert self.transport is not None
        if IHalfCloseableDescriptor.providedBy(self.transport):
            cast(ITCPTransport, self.transport).loseWriteConnection()
        else:
            self.transport.loseConnection()

    def _response_complete(self) -> None:
        self._checker = None
        self._run.completed_one(time.perf_counter() - self._sent_at)
        self._send_next()

    def dataReceived(self, data: bytes) -> None:
        run = self._run
        if run.error is not None:
            return
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            c = self._checker
            if c is None or c.complete:
                self._fail_extra(end - pos)
                return
            take = min(c.remaining, end - pos)
            mismatch = c.feed(view[pos : pos + take])
            pos += take
            if mismatch is not None:
                run.fail(
                    ClientError(
                        "mismatch",
                        f"{mismatch.describe()} of response {c.index} (connection {self._connection})",
                        response_index=c.index,
                        offset=mismatch.position,
                    )
                )
                return
            if c.complete:
                if pos < end:
                    # Our next request is not sent yet, so nothing may follow.
                    self._fail_extra(end - pos, after=c.index)
                    return
                self._response_complete()

    def _fail_extra(self, n: int, after: int | None = None) -> None:
        where = (
            f"after the {self._run.response_size}-byte response {after}"
            if after is not None
            else "while no response was expected"
        )
        self._run.fail(
            ClientError(
                "extra",
                f"server sent {n} unexpected bytes {where} (connection {self._connection})",
                response_index=after,
            )
        )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        run = self._run
        run.protocols.discard(self)
        if run.error is None:
            clean = isinstance(reason.value, ConnectionDone)
            c = self._checker
            if self._all_answered and not clean:
                run.fail(
                    ClientError(
                        "reset",
                        f"connection {self._connection} to {run.host}:{run.port} was"
                        f" reset after all its responses arrived (the server rejected"
                        f" a request?): {reason.getErrorMessage()}",
                    )
                )
            elif not self._all_answered:
                where = (
                    f"after {c.received} of {c.length} bytes of response {c.index}"
                    if c is not None
                    else "before its first request"
                )
                if clean:
                    run.fail(
                        ClientError(
                            "closed",
                            f"short response: server closed connection {self._connection} {where}",
                            response_index=None if c is None else c.index,
                        )
                    )
                else:
                    run.fail(
                        ClientError(
                            "reset",
                            f"connection {self._connection} reset or lost {where}: {reason.getErrorMessage()}",
                            response_index=None if c is None else c.index,
                        )
                    )
        self.finished.callback(None)


def _endpoint(reactor: IReactorTCP, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    # Literal addresses skip HostnameEndpoint's resolver, which would run
    # getaddrinfo in the reactor's thread pool for nothing.
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(  # type: ignore[no-untyped-call]  # untyped in Twisted
            reactor, host, port, timeout=timeout
        )
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def _connect_error(e: BaseException, host: str, port: int) -> ClientError:
    if isinstance(e, ConnectionRefusedError):
        return ClientError("refused", f"connection refused by {host}:{port}")
    if isinstance(e, DNSLookupError):
        return ClientError("connect", f"cannot resolve {host!r}: {e}")
    if isinstance(e, ConnectTimeoutError):
        return ClientError("connect", f"connecting to {host}:{port} timed out")
    if isinstance(e, ConnectError):
        return ClientError("connect", f"cannot connect to {host}:{port}: {e}")
    return ClientError("connect", f"cannot connect to {host}:{port}: {e!r}")


async def _run_connection(run: _Run, connection: int, indices: range) -> None:
    protocol = TestClientProtocol(run, connection, indices)
    # run_client is typed for the timer it needs; every real reactor is also
    # an IReactorTCP, which the endpoints need.
    reactor = cast(IReactorTCP, run.reactor)
    # The run's deadline covers connecting; this is just a backstop.
    endpoint = _endpoint(reactor, run.host, run.port, max(1, math.ceil(run.timeout)))
    d: Deferred[TestClientProtocol] = connectProtocol(  # type: ignore[no-untyped-call]
        endpoint, protocol
    )
    run.connecting.add(d)
    try:
        await d
    except Exception as e:  # every connect failure is a verdict, not a crash
        # After a failure or the deadline, fail() cancelled this attempt
        # (CancelledError or ConnectingCancelledError): nothing new to report.
        if run.error is None:
            run.fail(_connect_error(e, run.host, run.port))
        return
    finally:
        run.connecting.discard(d)
    await protocol.finished


def _validate(port: int, count: int, req_size: int, resp_size: int, parallel: int, timeout: float) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if not 1 <= count <= MAX_U32 + 1:
        raise ValueError(f"count must be in 1..{MAX_U32 + 1}, got {count}")
    for name, size in (("req_size", req_size), ("resp_size", resp_size)):
        if not 0 <= size <= MAX_U32:
            raise ValueError(f"{name} must be in 0..{MAX_U32}, got {size}")
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")


def run_client(
    reactor: IReactorTime,
    host: str,
    port: int,
    count: int,
    req_size: int,
    resp_size: int,
    parallel: int = 1,
    timeout: float = 30.0,
) -> Deferred[ClientResult]:
    """Run one experiment; the Deferred fires with the result, never fails.

    Failures (refused, reset, short or corrupt responses, timeout) are in
    ``result.error``.  By the time it fires every connection is closed and the
    deadline timer cancelled.  ``ValueError`` for out-of-range arguments.
    """
    _validate(port, count, req_size, resp_size, parallel, timeout)
    run = _Run(reactor, host, port, count, req_size, resp_size, timeout)
    return Deferred.fromCoroutine(_run_client(run, parallel))


async def _run_client(run: _Run, parallel: int) -> ClientResult:
    shares = split_requests(run.count, parallel)
    deadline: IDelayedCall = run.reactor.callLater(run.timeout, run.time_out)
    try:
        # Wait for every connection even if one of them crashed, so that none
        # is left open; then let a crash (a bug, never a verdict) propagate.
        outcomes = await DeferredList(
            [Deferred.fromCoroutine(_run_connection(run, c, indices)) for c, indices in enumerate(shares)],
            consumeErrors=True,
        )
        for _, outcome in outcomes:
            if isinstance(outcome, Failure):
                outcome.raiseException()
    finally:
        if deadline.active():
            deadline.cancel()
    ended = run.ended if run.ended is not None else time.perf_counter()
    return ClientResult(
        host=run.host,
        port=run.port,
        count=run.count,
        request_size=run.request_size,
        response_size=run.response_size,
        connections=len(shares),
        completed=run.completed,
        elapsed=ended - run.started,
        latencies=tuple(run.latencies),
        error=run.error,
    )


def _int_in(name: str, low: int, high: int | None) -> Callable[[str], int]:
    # argparse prefixes "argument NAME: ", so the message says only the range.
    accepted = f"in {low}..{high}" if high is not None else f">= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {accepted}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tm3-testclient",
        description=(
            "Send COUNT requests of REQ_SIZE pattern bytes to a tm3-testserver,"
            " verify every byte of the COUNT responses of RESP_SIZE bytes, and print"
            " the timing: total seconds, requests/s, throughput in MB/s (10^6 bytes,"
            " payload only) and per-request latency min/median/p99/max in ms."
            " Exit status 0 iff all COUNT responses arrived complete and correct,"
            " 1 otherwise (with the reason on stderr), 2 for bad arguments."
        ),
        epilog=(
            "Requests on one connection are sequential: send one, read its whole"
            " response, send the next. With --parallel K, connection c (0-based)"
            " sends requests c, c+K, c+2K, ... below COUNT, i.e. COUNT // K requests"
            " plus one more for the first COUNT %% K connections; at most COUNT"
            " connections are opened. Example: tm3-testclient 10.0.0.1 6001 10 4096 4096"
        ),
    )
    parser.add_argument("--version", action="version", version=version_line("tm3-testclient"))
    parser.add_argument("host", metavar="HOST", help="server host name or IP address")
    parser.add_argument(
        "port",
        metavar="PORT",
        type=_int_in("PORT", 1, 65535),
        help="server TCP port, 1..65535",
    )
    parser.add_argument(
        "count",
        metavar="COUNT",
        type=_int_in("COUNT", 1, MAX_U32 + 1),
        help="number of requests in total, over all connections (>= 1)",
    )
    parser.add_argument(
        "req_size",
        metavar="REQ_SIZE",
        type=_int_in("REQ_SIZE", 0, MAX_U32),
        help=f"request body size in bytes, 0..{MAX_U32} (a 16-byte header comes on top)",
    )
    parser.add_argument(
        "resp_size",
        metavar="RESP_SIZE",
        type=_int_in("RESP_SIZE", 0, MAX_U32),
        help=f"response size in bytes, 0..{MAX_U32}",
    )
    parser.add_argument(
        "--parallel",
        metavar="K",
        type=_int_in("K", 1, None),
        default=1,
        help="number of concurrent connections sharing the COUNT requests (>= 1, default 1)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=30.0,
        help=(
            "deadline for the whole run, connecting included; when it passes all"
            " connections are aborted and the run fails (> 0, default 30)"
        ),
    )
    return parser


async def _cli(reactor: IReactorTime, args: argparse.Namespace) -> None:
    result = await run_client(
        reactor,
        args.host,
        args.port,
        args.count,
        args.req_size,
        args.resp_size,
        parallel=args.parallel,
        timeout=args.timeout,
    )
    print(result.report(), flush=True)
    if not result.ok:
        print(f"tm3-testclient: FAILED: {result.failure_message()}", file=sys.stderr)
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Only warnings and errors (say, an unexpected exception in a callback):
    # the report is the client's real output.
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        # print() is the report; it must not turn into filtered log events.
        redirectStandardIO=False,
    )
    return react_exit_code(_cli, args)


if __name__ == "__main__":
    sys.exit(main())
