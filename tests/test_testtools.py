"""Tests for the experiment tools: tm3.tools.testproto, tm3.tools.testserver, tm3.tools.testclient.

Pure tests of the codec and pattern first, then real sockets on 127.0.0.1
(port 0) with client and server in this process, then the console entry
points as subprocesses.  Reactor tests take the ``tidy`` fixture, which fails
the test if it leaves a socket open or a delayed call pending.
"""

from __future__ import annotations

import hashlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import IO, Any, cast

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IListeningPort, ITCPTransport, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from tests.support.ports import free_port
from tests.support.processes import python_env
from tm3.tools import testclient, testserver
from tm3.tools.testclient import ClientResult, run_client, split_requests
from tm3.tools.testproto import (
    CHUNK_SIZE,
    HEADER_SIZE,
    MAGIC,
    MAX_U32,
    PATTERN_PERIOD,
    PATTERN_SEED,
    HeaderError,
    PatternChecker,
    RequestHeader,
    Stream,
    decode_header,
    encode_header,
    find_mismatch,
    pattern_byte,
    pattern_bytes,
    pattern_chunks,
)
from tm3.tools.testserver import listen_testserver

reactor: Any = _global_reactor
MiB = 1024 * 1024
u32 = st.integers(0, MAX_U32)


# --- testproto: header -------------------------------------------------------


@given(u32, u32, u32)
def test_header_round_trip(index: int, request_length: int, response_length: int) -> None:
    data = encode_header(index, request_length, response_length)
    assert len(data) == HEADER_SIZE == 16
    assert decode_header(data) == RequestHeader(index, request_length, response_length)
    assert decode_header(b"xx" + data, offset=2).index == index


def test_header_layout_is_big_endian_with_magic() -> None:
    assert encode_header(1, 0x0203, 0x04050607) == (b"TM3T" + bytes([0, 0, 0, 1, 0, 0, 2, 3, 4, 5, 6, 7]))
    assert MAGIC == b"TM3T"


def test_header_errors() -> None:
    with pytest.raises(HeaderError, match="bad magic"):
        decode_header(b"HTTP" + bytes(12))
    with pytest.raises(ValueError, match="16 header bytes"):
        decode_header(encode_header(1, 2, 3)[:15])
    with pytest.raises(ValueError, match="index"):
        encode_header(MAX_U32 + 1, 0, 0)
    with pytest.raises(ValueError, match="response_length"):
        encode_header(0, 0, -1)


# --- testproto: pattern ------------------------------------------------------


def test_pattern_is_pinned() -> None:
    # Other implementations (the C++ originals, a capture dissector) can
    # regenerate the pattern from this definition; a change breaks them.
    assert pattern_bytes(0, Stream.REQUEST, 0, 32) == hashlib.shake_256(PATTERN_SEED).digest(32)
    period = hashlib.shake_256(PATTERN_SEED).digest(PATTERN_PERIOD)
    assert pattern_bytes(0, Stream.REQUEST, 0, 2 * PATTERN_PERIOD) == period * 2


def test_pattern_depends_on_index_and_direction() -> None:
    a = pattern_bytes(5, Stream.REQUEST, 0, 4096)
    assert a == pattern_bytes(5, Stream.REQUEST, 0, 4096)
    assert a != pattern_bytes(5, Stream.RESPONSE, 0, 4096)
    assert a != pattern_bytes(6, Stream.REQUEST, 0, 4096)
    assert a[1:] != a[:-1]  # a shifted stream does not verify


@given(
    st.integers(0, MAX_U32),
    st.sampled_from(Stream),
    st.integers(0, 3 * PATTERN_PERIOD),
    st.integers(0, 300_000),
    st.integers(0, 300_000),
)
def test_pattern_slices_compose(index: int, stream: Stream, offset: int, a: int, b: int) -> None:
    whole = pattern_bytes(index, stream, offset, a + b)
    assert len(whole) == a + b
    assert whole == pattern_bytes(index, stream, offset, a) + pattern_bytes(index, stream, offset + a, b)
    chunks = list(pattern_chunks(index, stream, a + b, CHUNK_SIZE, offset))
    assert b"".join(chunks) == whole
    assert all(0 < len(c) <= CHUNK_SIZE for c in chunks)
    if a + b:
        assert whole[-1] == pattern_byte(index, stream, offset + a + b - 1)


@given(
    st.integers(0, 1000),
    st.integers(1, 600_000).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))),
    st.integers(1, 255),
)
def test_find_mismatch_reports_first_wrong_offset(index: int, size_and_position: tuple[int, int], flip: int) -> None:
    size, position = size_and_position
    data = bytearray(pattern_bytes(index, Stream.RESPONSE, 0, size))
    assert find_mismatch(index, Stream.RESPONSE, 0, data) is None
    expected = data[position]
    data[position] ^= flip
    mismatch = find_mismatch(index, Stream.RESPONSE, 0, data)
    assert mismatch is not None
    assert (mismatch.position, mismatch.expected, mismatch.actual) == (
        position,
        expected,
        expected ^ flip,
    )
    assert f"byte mismatch at offset {position} " in mismatch.describe()


@given(st.lists(st.integers(0, 70_000), max_size=8), st.integers(0, 255))
def test_checker_positions_are_absolute_across_pieces(splits: list[int], seed: int) -> None:
    total = sum(splits)
    data = bytearray(pattern_bytes(7, Stream.REQUEST, 0, total))
    bad = seed * 997 % total if total else None
    if bad is not None:
        data[bad] ^= 0x5A
    checker = PatternChecker(7, Stream.REQUEST, total)
    found = []
    pos = 0
    for n in splits:
        m = checker.feed(memoryview(data)[pos : pos + n])
        pos += n
        if m is not None:
            found.append(m.position)
    assert checker.complete and checker.remaining == 0
    assert found == ([] if bad is None else [bad])


def test_checker_refuses_more_than_expected() -> None:
    checker = PatternChecker(0, Stream.REQUEST, 3)
    with pytest.raises(ValueError, match="only 3 expected"):
        checker.feed(pattern_bytes(0, Stream.REQUEST, 0, 4))


# --- testclient: pure parts --------------------------------------------------


@given(st.integers(1, 500), st.integers(1, 40))
def test_split_requests(count: int, parallel: int) -> None:
    shares = split_requests(count, parallel)
    assert len(shares) == min(count, parallel)
    assert sorted(i for share in shares for i in share) == list(range(count))
    for c, share in enumerate(shares):
        assert len(share) == count // parallel + (1 if c < count % parallel else 0)


def test_split_requests_documented_example() -> None:
    assert [list(r) for r in split_requests(10, 4)] == [
        [0, 4, 8],
        [1, 5, 9],
        [2, 6],
        [3, 7],
    ]


def test_report_statistics() -> None:
    result = ClientResult(
        host="h",
        port=1,
        count=100,
        request_size=1000,
        response_size=3000,
        connections=1,
        completed=100,
        elapsed=2.0,
        latencies=tuple((i + 1) / 1000 for i in range(100)),
    )
    text = result.report()
    assert result.ok
    assert "total time: 2.000000 s" in text
    assert "requests/s: 50.0" in text
    assert "throughput: 0.200 MB/s (0.050 MB/s requests, 0.150 MB/s responses" in text
    assert "latency ms: min 1.000  median 50.500  p99 99.000  max 100.000" in text
    assert text.endswith("OK: all 100 responses verified")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["h", "0", "1", "1", "1"], "argument PORT: must be in 1..65535, got 0"),
        (["h", "65536", "1", "1", "1"], "argument PORT: must be in 1..65535"),
        (["h", "x", "1", "1", "1"], "argument PORT: must be an integer in 1..65535"),
        (["h", "1", "0", "1", "1"], "argument COUNT: must be in 1..4294967296"),
        (["h", "1", "1", "-1", "1"], "argument REQ_SIZE: must be in 0..4294967295"),
        (
            ["h", "1", "1", "1", "4294967296"],
            "argument RESP_SIZE: must be in 0..4294967295",
        ),
        (
            ["h", "1", "1", "1", "1", "--parallel", "0"],
            "argument --parallel: must be >= 1",
        ),
        (
            ["h", "1", "1", "1", "1", "--timeout", "0"],
            "argument --timeout: must be a number > 0",
        ),
    ],
)
def test_client_usage_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        testclient.main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_server_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        testserver.main(["65536"])
    assert e.value.code == 2
    assert "argument PORT: must be in 0..65535, got 65536" in capsys.readouterr().err


def test_help_explains_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        testclient.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for word in (
        "HOST",
        "PORT",
        "COUNT",
        "REQ_SIZE",
        "RESP_SIZE",
        "--parallel",
        "--timeout",
    ):
        assert word in text
    assert "connection c (0-based) sends requests c, c+K, c+2K" in text
    assert "COUNT // K" in text
    with pytest.raises(SystemExit):
        testserver.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--interface ADDR" in text and "0 picks a free port" in text


def test_run_client_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="count"):
        run_client(reactor, "127.0.0.1", 1, 0, 1, 1)
    with pytest.raises(ValueError, match="parallel"):
        run_client(reactor, "127.0.0.1", 1, 1, 1, 1, parallel=0)


# --- real sockets --------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def tidy() -> AsyncIterator[None]:
    """Fail the test if it leaves sockets or delayed calls behind."""
    readers, writers = set(reactor.getReaders()), set(reactor.getWriters())
    yield
    leaks: list[object] = []
    for _ in range(300):
        leaks = [
            *(set(reactor.getReaders()) - readers),
            *(set(reactor.getWriters()) - writers),
            *(c for c in reactor.getDelayedCalls() if c.active()),
        ]
        if not leaks:
            return
        await deferLater(reactor, 0.01)
    pytest.fail(f"test leaked {leaks}")


@asynccontextmanager
async def serving(
    factory: Factory[Any] | None = None,
) -> AsyncIterator[tuple[int, Any]]:
    """A server on 127.0.0.1 (the real one unless ``factory`` is given)."""
    if factory is None:
        factory = testserver.TestServerFactory()
    port: IListeningPort
    if isinstance(factory, testserver.TestServerFactory):
        port = await listen_testserver(reactor, 0, interface="127.0.0.1", factory=factory)
    else:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    try:
        yield port.getHost().port, factory
    finally:
        await port.stopListening()


class FakeServer(Protocol):
    """Parses requests like the real server, answers with ``respond``."""

    def __init__(self, respond: Callable[[ITransport, RequestHeader], None]) -> None:
        self.respond = respond
        self.buffer = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= HEADER_SIZE:
            header = decode_header(self.buffer)
            if len(self.buffer) < HEADER_SIZE + header.request_length:
                return
            del self.buffer[: HEADER_SIZE + header.request_length]
            assert self.transport is not None
            self.respond(self.transport, header)


def fake_factory(respond: Callable[[ITransport, RequestHeader], None]) -> Factory[Any]:
    factory: Factory[Any] = Factory.forProtocol(lambda: FakeServer(respond))
    factory.noisy = False
    return factory


class RawClient(Protocol):
    """Collects whatever arrives; ``closed`` fires with the close reason's exception."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: Deferred[BaseException] = Deferred()
        self._want: tuple[int, Deferred[None]] | None = None

    def wait_for(self, n: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._want = (n, d)
        self._check()
        return d

    def _check(self) -> None:
        if self._want is not None and len(self.received) >= self._want[0]:
            d = self._want[1]
            self._want = None
            d.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The exception, not the Failure: a Failure would errback the Deferred.
        assert reason.value is not None
        self.closed.callback(reason.value)

    @property
    def tcp(self) -> ITCPTransport:
        return cast(ITCPTransport, self.transport)


async def raw_connect(port: int) -> RawClient:
    client: RawClient = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), RawClient())
    return client


@asynccontextmanager
async def captured_log() -> AsyncIterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


@pytest.mark.parametrize(
    ("count", "req_size", "resp_size"),
    [
        (1, 0, 0),
        (3, 0, 4096),
        (3, 4096, 0),
        (5, 1, 1),
        (10, 4096, 4096),
        (3, 200_000, 65_537),
        (4, 1, MiB),
        (2, MiB, MiB),
    ],
)
@pytest_twisted.ensureDeferred
async def test_client_and_server(tidy: None, count: int, req_size: int, resp_size: int) -> None:
    async with serving() as (port, factory):
        result = await run_client(reactor, "127.0.0.1", port, count, req_size, resp_size)
    assert result.ok, result.report()
    assert result.error is None
    assert result.completed == count == len(result.latencies)
    assert result.connections == 1
    assert factory.requests == count and factory.mismatches == 0
    assert factory.bytes_in == count * (HEADER_SIZE + req_size)
    assert "OK: all" in result.report()


@pytest_twisted.ensureDeferred
async def test_parallel_connections_share_the_requests(tidy: None) -> None:
    async with serving() as (port, factory):
        result = await run_client(reactor, "127.0.0.1", port, 50, 1000, 20_000, parallel=8)
        assert result.ok, result.report()
        assert (result.connections, factory.connections, factory.requests) == (8, 8, 50)
        # More connections asked for than requests: one request each.
        result = await run_client(reactor, "127.0.0.1", port, 3, 10, 10, parallel=8)
        assert result.ok, result.report()
        assert (result.connections, factory.connections) == (3, 11)
    # The server counts outgoing bytes as each connection closes; all have.
    assert factory.bytes_out == 50 * 20_000 + 3 * 10


@pytest_twisted.ensureDeferred
async def test_corrupt_response_reports_offset(tidy: None) -> None:
    bad_index, bad_offset = 3, 131_073

    def respond(transport: ITransport, h: RequestHeader) -> None:
        body = bytearray(pattern_bytes(h.index, Stream.RESPONSE, 0, h.response_length))
        if h.index == bad_index:
            body[bad_offset] ^= 0x01
        transport.write(bytes(body))

    async with serving(fake_factory(respond)) as (port, _):
        result = await run_client(reactor, "127.0.0.1", port, 6, 100, 200_000, timeout=10)
    assert not result.ok
    assert result.error is not None
    assert result.error.kind == "mismatch"
    assert (result.error.response_index, result.error.offset) == (bad_index, bad_offset)
    assert f"byte mismatch at offset {bad_offset} " in result.error.message
    assert f"of response {bad_index}" in result.error.message
    assert result.completed == bad_index
    assert "FAILED: byte mismatch" in result.report()


@pytest_twisted.ensureDeferred
async def test_short_response_is_reported(tidy: None) -> None:
    def respond(transport: ITransport, h: RequestHeader) -> None:
        transport.write(pattern_bytes(h.index, Stream.RESPONSE, 0, 1000))
        transport.loseConnection()

    async with serving(fake_factory(respond)) as (port, _):
        result = await run_client(reactor, "127.0.0.1", port, 2, 10, 4096, timeout=10)
    assert result.error is not None and result.error.kind == "closed"
    assert "short response" in result.error.message
    assert "after 1000 of 4096 bytes of response 0" in result.error.message


@pytest_twisted.ensureDeferred
async def test_extra_bytes_are_reported(tidy: None) -> None:
    def respond(transport: ITransport, h: RequestHeader) -> None:
        transport.write(pattern_bytes(h.index, Stream.RESPONSE, 0, h.response_length + 1))

    async with serving(fake_factory(respond)) as (port, _):
        result = await run_client(reactor, "127.0.0.1", port, 2, 10, 100, timeout=10)
    assert result.error is not None and result.error.kind == "extra"
    assert "1 unexpected bytes after the 100-byte response 0" in result.error.message


@pytest_twisted.ensureDeferred
async def test_connection_refused_is_a_failure_not_a_hang(tidy: None) -> None:
    port = free_port()
    started = time.monotonic()
    result = await run_client(reactor, "127.0.0.1", port, 10, 4096, 4096, parallel=4)
    assert time.monotonic() - started < 5
    assert not result.ok
    assert result.error is not None and result.error.kind == "refused"
    assert result.error.message == f"connection refused by 127.0.0.1:{port}"
    assert result.completed == 0


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out(tidy: None) -> None:
    async with serving(fake_factory(lambda transport, h: None)) as (port, _):
        started = time.monotonic()
        result = await run_client(reactor, "127.0.0.1", port, 4, 10, 10, parallel=2, timeout=0.3)
    assert 0.25 < time.monotonic() - started < 5
    assert result.error is not None and result.error.kind == "timeout"
    assert "timed out after 0.3 s with 0 of 4 requests completed" in result.error.message
    assert "waiting for response 0 (0 of 10 bytes received)" in result.error.message


@pytest_twisted.ensureDeferred
async def test_server_aborts_on_corrupt_request_body(tidy: None) -> None:
    body = bytearray(pattern_bytes(9, Stream.REQUEST, 0, 1000))
    body[500] ^= 0xFF
    async with captured_log() as events, serving() as (port, factory):
        client = await raw_connect(port)
        assert client.transport is not None
        client.transport.write(encode_header(9, 1000, 10) + bytes(body))
        reason = await client.closed
    assert not isinstance(reason, ConnectionDone)  # a reset, not an orderly close
    assert client.received == b""
    assert factory.mismatches == 1 and factory.requests == 0
    errors = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
    assert len(errors) == 1
    assert "request 9 body corrupt: byte mismatch at offset 500" in errors[0]
    infos = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.info]
    assert any("0 requests, 1016 bytes in, 0 bytes out, 1 corrupt" in s for s in infos)


@pytest_twisted.ensureDeferred
async def test_server_aborts_on_bad_magic(tidy: None) -> None:
    async with captured_log() as events, serving() as (port, factory):
        client = await raw_connect(port)
        assert client.transport is not None
        client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        reason = await client.closed
    assert not isinstance(reason, ConnectionDone)
    assert factory.mismatches == 1
    errors = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
    assert len(errors) == 1 and "bad request header" in errors[0]


@pytest_twisted.ensureDeferred
async def test_server_answers_pipelined_requests_in_order(tidy: None) -> None:
    # More than the server's queue limit, so it has to pause reading and resume.
    n = 3 * testserver.MAX_QUEUED_RESPONSES
    requests = b"".join(encode_header(i, 10, 1000) + pattern_bytes(i, Stream.REQUEST, 0, 10) for i in range(n))
    async with serving() as (port, factory):
        client = await raw_connect(port)
        assert client.transport is not None
        client.transport.write(requests)
        await client.wait_for(n * 1000)
        client.transport.loseConnection()
        await client.closed
    expected = b"".join(pattern_bytes(i, Stream.RESPONSE, 0, 1000) for i in range(n))
    assert bytes(client.received) == expected
    assert factory.requests == n


@pytest_twisted.ensureDeferred
async def test_server_does_not_buffer_for_a_client_that_does_not_read(
    tidy: None,
) -> None:
    async with serving() as (port, factory):
        client = await raw_connect(port)
        assert client.transport is not None
        client.tcp.pauseProducing()  # stop reading: the socket buffers fill up
        client.transport.write(encode_header(0, 0, MAX_U32))  # ask for 4 GiB
        await deferLater(reactor, 0.5)
        [server] = factory.active
        written = server.writer.bytes_written
        assert server.writer.paused
        # Kernel socket buffers on loopback take a few MiB; the rest must
        # stay ungenerated rather than pile up in the transport.
        assert 0 < written < 32 * MiB
        await deferLater(reactor, 0.2)
        assert server.writer.bytes_written == written
        # The bytes that did arrive are right.
        client.tcp.resumeProducing()
        await client.wait_for(MiB)
        assert find_mismatch(0, Stream.RESPONSE, 0, client.received) is None
        client.tcp.abortConnection()
        await client.closed


# --- console entry points -------------------------------------------------------


class LineReader:
    """Reads a subprocess's output in a thread, so waiting for a line can time out.

    (select() on a buffered pipe misses lines already in the buffer.)
    """

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r} in {self.seen!r}")


def test_console_entry_points() -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "tm3.tools.testserver", "0", "--interface", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=python_env(),
    )
    try:
        assert server.stdout is not None
        output = LineReader(server.stdout)
        port = int(output.wait_for(r"listening on 127\.0\.0\.1:(\d+)", 20)[1])
        client = subprocess.run(
            [
                sys.executable,
                "-m",
                "tm3.tools.testclient",
                "127.0.0.1",
                str(port),
                "10",
                "4096",
                "4096",
            ],
            check=False,
            capture_output=True,
            text=True,
            env=python_env(),
            timeout=60,
        )
        assert client.returncode == 0, client.stdout + client.stderr
        out = client.stdout
        assert "completed: 10 of 10 requests" in out
        assert re.search(r"total time: \d+\.\d+ s", out)
        assert re.search(r"requests/s: \d+\.\d", out)
        assert re.search(r"throughput: \d+\.\d+ MB/s", out)
        assert re.search(
            r"latency ms: min \d+\.\d+  median \d+\.\d+  p99 \d+\.\d+  max \d+\.\d+",
            out,
        )
        assert "OK: all 10 responses verified" in out
        assert client.stderr == ""
        # The per-connection line for that client.
        output.wait_for(r"10 requests, 41120 bytes in, 40960 bytes out, 0 corrupt; closed", 20)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.communicate(timeout=20)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
    assert server.returncode == 0

    # Nothing listens there any more: exit status 1 and a clear reason.
    refused = subprocess.run(
        [sys.executable, "-m", "tm3.tools.testclient", "127.0.0.1", str(port), "1", "1", "1"],
        check=False,
        capture_output=True,
        text=True,
        env=python_env(),
        timeout=60,
    )
    assert refused.returncode == 1
    assert f"FAILED: connection refused by 127.0.0.1:{port}" in refused.stderr
