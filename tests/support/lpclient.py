"""A test LP: speaks the TM3 pipe protocol to an RP over real sockets.

Deliberately not our LP: it encodes and cuts messages with :mod:`tm3.core.wire`'s
codec, but everything else is its own small code, so that a bug shared by the
RP and our LP cannot hide. It gives a test full control over what goes where:

- :meth:`LPClient.open`, :meth:`LPClient.send`, :meth:`LPClient.fin` use the
  connection's next sequence number and a pipe chosen round robin, or the pipe
  given;
- :meth:`LPClient.send_raw` writes any bytes on one pipe, and
  :meth:`syn_msg`, :meth:`data_msg`, :meth:`fin_msg` build messages with
  explicit seqs, so a test can send them in any order on any pipe
  (:meth:`LPClient.take_seq` hands out the numbers);
- :meth:`LPClient.upload` streams a large upload with backpressure (a producer
  on every pipe transport; it waits while all pipes are paused);
- :func:`echo_over_pipes` is the round trip to an echo server that many
  tests use to show a session works.

What the RP sends is reassembled per connection by seq (a dict of early
messages, nothing more) into an :class:`RxConn`, which keeps the payload or,
in streaming mode, only its sha256 and length; it exposes awaitables for
"n bytes received" and "the FIN arrived". Anything the RP does that the
protocol forbids (a SYN, a duplicate seq, a message after the FIN, a payload
larger than expected) is recorded in :attr:`LPClient.errors`.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure

from tests.support.producers import Pausable
from tests.support.waiting import Event, with_timeout
from tm3.core import wire


class RxConn:
    """What the RP sent for one connection, reassembled by seq."""

    def __init__(self, client: LPClient, conn_id: int, streaming: bool = False) -> None:
        self.client = client
        self.conn_id = conn_id
        self.streaming = streaming
        self.next_seq = 0
        self.early: dict[int, Any] = {}
        self.data = bytearray()
        self.hash = hashlib.sha256()
        self.received = 0
        self.messages = 0
        self.fin_reason: int | None = None
        self.fin_seq: int | None = None
        self.fin_event = Event()
        self._thresholds: list[tuple[int, Event]] = []

    # -- receiving ------------------------------------------------------------

    def message(self, msg: Any) -> None:
        seq = msg.seq
        if self.fin_seq is not None and seq >= self.fin_seq:
            self.client.error(f"conn {self.conn_id}: seq {seq} after the FIN (seq {self.fin_seq})")
            return
        if seq < self.next_seq or seq in self.early:
            self.client.error(f"conn {self.conn_id}: duplicate seq {seq}")
            return
        if seq != self.next_seq:
            self.early[seq] = msg
            return
        self._take(msg)
        early = self.early
        while early and self.next_seq in early:
            self._take(early.pop(self.next_seq))

    def _take(self, msg: Any) -> None:
        self.next_seq += 1
        self.messages += 1
        if type(msg) is wire.Data:
            payload = msg.payload
            if len(payload) > self.client.max_rx_payload:
                self.client.error(f"conn {self.conn_id}: payload of {len(payload)} bytes at seq {msg.seq}")
            if self.streaming:
                self.hash.update(payload)
            else:
                self.data += payload
            self.received += len(payload)
            if self._thresholds:
                self._check_thresholds()
        elif type(msg) is wire.Fin:
            self.fin_reason = msg.reason
            self.fin_seq = msg.seq
            if self.early:
                self.client.error(f"conn {self.conn_id}: messages numbered past the FIN: {sorted(self.early)}")
            self.fin_event.fire((msg.reason, msg.seq))
            for _, ev in self._thresholds:
                ev.fire(self.received)  # wake waiters: nothing more will come
            self._thresholds = []
        else:
            self.client.error(f"conn {self.conn_id}: the RP sent a SYN: {msg}")

    def _check_thresholds(self) -> None:
        keep = []
        for n, ev in self._thresholds:
            if self.received >= n:
                ev.fire(self.received)
            else:
                keep.append((n, ev))
        self._thresholds = keep

    # -- awaitables -----------------------------------------------------------

    def when_received(self, n: int) -> defer.Deferred[int]:
        """Fires with the byte count once at least ``n`` bytes (or the FIN) arrived."""
        if self.received >= n or self.fin_event.fired:
            return defer.succeed(self.received)
        ev = Event()
        self._thresholds.append((n, ev))
        return ev.wait()

    def when_fin(self) -> defer.Deferred[tuple[int, int]]:
        """Fires with ``(reason, seq)`` of the RP's FIN, once everything before it arrived."""
        return self.fin_event.wait()

    @property
    def digest(self) -> str:
        return self.hash.hexdigest() if self.streaming else hashlib.sha256(self.data).hexdigest()


class _Gate(Pausable):
    """The producer registered on a pipe's transport: records whether the
    transport wants us to stop writing, and wakes writers when it resumes."""

    def __init__(self, pipe: LPPipe) -> None:
        super().__init__()
        self.pipe = pipe

    def on_resume(self) -> None:
        self.pipe.client._writable()


class LPPipe(Protocol):
    def __init__(self, client: LPClient, index: int, rcvbuf: int | None) -> None:
        self.client = client
        self.index = index
        self.rcvbuf = rcvbuf
        self.decoder = wire.Decoder()
        self.gate = _Gate(self)
        self.closed = Event()
        self.connected_ = False
        self.bytes_received = 0
        self.bytes_sent = 0

    def connectionMade(self) -> None:
        self.connected_ = True
        handle = self.transport.getHandle()
        handle.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.rcvbuf is not None:
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        self.transport.registerProducer(self.gate, True)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_received += len(data)
        client = self.client
        try:
            for msg in self.decoder.feed(data):
                client.message(self.index, msg)
        except wire.ProtocolError as e:
            client.error(f"pipe {self.index}: undecodable bytes from the RP: {e}")
            self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ = False
        self.closed.fire(reason.value)
        self.client._writable()  # wake writers so they see the pipe is gone

    def write(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        self.transport.write(data)

    def write_sequence(self, parts: list[bytes], size: int) -> None:
        self.bytes_sent += size
        self.transport.writeSequence(parts)


class LPClient:
    """A test LP with ``pipes`` pipes to the RP at ``host:port``."""

    def __init__(
        self,
        reactor: Any,
        port: int,
        pipes: int = 1,
        host: str = "127.0.0.1",
        max_payload: int = wire.DEFAULT_PAYLOAD,
        max_rx_payload: int = wire.DEFAULT_PAYLOAD,
        rcvbuf: int | None = None,
        source: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.source = source  # the local address its pipes come from (another LP host)
        self.port = port
        self.npipes = pipes
        self.max_payload = max_payload
        self.max_rx_payload = max_rx_payload
        self.rcvbuf = rcvbuf
        self.pipes: list[LPPipe] = []
        self.conns: dict[int, RxConn] = {}
        self.tx_seq: dict[int, int] = {}
        self.errors: list[str] = []
        self.unknown: list[Any] = []  # messages for ids we never opened
        self._rr = 0
        self._write_waiters: list[defer.Deferred[None]] = []

    async def connect(self) -> LPClient:
        """Connect the pipes not yet connected, one after the other (so the
        RP numbers them in this order)."""
        while len(self.pipes) < self.npipes:
            await self.connect_pipe()
        return self

    async def connect_pipe(self) -> LPPipe:
        """Connect one more pipe (a test may send on the first ones before
        the set is complete)."""
        bind = (self.source, 0) if self.source is not None else None
        endpoint = endpoints.TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=5, bindAddress=bind)
        pipe = LPPipe(self, len(self.pipes), self.rcvbuf)
        self.pipes.append(pipe)
        try:
            await endpoints.connectProtocol(endpoint, pipe)
        except BaseException:
            self.pipes.remove(pipe)
            raise
        return pipe

    # -- building messages (explicit seqs) --------------------------------------

    @staticmethod
    def syn_msg(conn_id: int, host: str, port: int, seq: int = 0) -> bytes:
        return wire.encode_syn(conn_id, host, port, seq)

    @staticmethod
    def data_msg(conn_id: int, seq: int, payload: bytes) -> bytes:
        return wire.encode_data(conn_id, seq, payload)

    @staticmethod
    def fin_msg(conn_id: int, seq: int, reason: int = wire.REASON_FIN) -> bytes:
        return wire.encode_fin(conn_id, seq, reason)

    def take_seq(self, conn_id: int, n: int = 1) -> range:
        """Reserve the next ``n`` sequence numbers of ``conn_id`` (LP -> RP)."""
        first = self.tx_seq.get(conn_id, 0)
        self.tx_seq[conn_id] = first + n
        return range(first, first + n)

    def split(self, conn_id: int, data: bytes, size: int | None = None) -> list[bytes]:
        """``data`` as DATA messages with the next seqs (not sent)."""
        size = size or self.max_payload
        return [
            self.data_msg(conn_id, self.take_seq(conn_id)[0], data[off : off + size])
            for off in range(0, len(data), size)
        ]

    # -- sending ------------------------------------------------------------------

    def _pipe(self, pipe: int | None) -> LPPipe:
        if pipe is None:
            pipe = self._rr
            self._rr = (self._rr + 1) % len(self.pipes)
        return self.pipes[pipe]

    def send_raw(self, pipe: int, data: bytes) -> None:
        self.pipes[pipe].write(data)

    def rx(self, conn_id: int, streaming: bool | None = None) -> RxConn:
        conn = self.conns.get(conn_id)
        if conn is None:
            conn = self.conns[conn_id] = RxConn(self, conn_id, bool(streaming))
        elif streaming is not None:
            conn.streaming = streaming
        return conn

    def open(self, conn_id: int, host: str, port: int, pipe: int | None = None, streaming: bool = False) -> RxConn:
        """Send the SYN (seq 0) and return the connection's receive side."""
        self.tx_seq[conn_id] = 0
        self.conns[conn_id] = RxConn(self, conn_id, streaming)
        self._pipe(pipe).write(self.syn_msg(conn_id, host, port, self.take_seq(conn_id)[0]))
        return self.conns[conn_id]

    def send(self, conn_id: int, data: bytes, pipe: int | None = None) -> int:
        """Cut ``data`` into DATA messages with the next seqs; returns how many."""
        messages = self.split(conn_id, data)
        for m in messages:
            self._pipe(pipe).write(m)
        return len(messages)

    def fin(self, conn_id: int, reason: int = wire.REASON_FIN, pipe: int | None = None) -> int:
        seq = self.take_seq(conn_id)[0]
        self._pipe(pipe).write(self.fin_msg(conn_id, seq, reason))
        return seq

    # -- upload with backpressure -----------------------------------------------

    def _writable(self) -> None:
        waiters, self._write_waiters = self._write_waiters, []
        for d in waiters:
            d.callback(None)

    async def _writable_pipe(self) -> LPPipe:
        while True:
            live = [p for p in self.pipes if p.connected_]
            if not live:
                raise ConnectionError("every pipe is closed")
            for _ in range(len(self.pipes)):
                p = self._pipe(None)
                if p.connected_ and not p.gate.paused:
                    return p
            d: defer.Deferred[None] = defer.Deferred()
            self._write_waiters.append(d)
            await d

    async def upload(self, conn_id: int, chunks: Iterable[bytes], batch: int = 65536) -> int:
        """Send every chunk (each at most ``batch`` bytes is best) as DATA
        messages, one batch per pipe at a time, never to a pipe whose
        transport has paused us: memory stays at a few batches per pipe
        however long the upload. Returns the bytes sent."""
        size = self.max_payload
        header = wire.data_header
        total = 0
        since_yield = 0
        for chunk in chunks:
            pipe = await self._writable_pipe()
            parts: list[bytes] = []
            view = memoryview(chunk)
            for off in range(0, len(chunk), size):
                piece = bytes(view[off : off + size])
                seq = self.tx_seq.get(conn_id, 0)
                self.tx_seq[conn_id] = seq + 1
                parts.append(header(conn_id, seq, len(piece)))
                parts.append(piece)
            n = len(chunk)
            pipe.write_sequence(parts, n + 8 * (len(parts) // 2))
            total += n
            if pipe.gate.paused:
                since_yield = 0
            else:
                since_yield += 1
                if since_yield >= 16:  # never starve the reactor
                    since_yield = 0
                    await deferLater(self.reactor, 0, lambda: None)
        return total

    # -- receiving ----------------------------------------------------------------

    def error(self, text: str) -> None:
        self.errors.append(text)

    def message(self, pipe: int, msg: Any) -> None:
        conn = self.conns.get(msg.conn_id)
        if conn is None:
            self.unknown.append(msg)
            return
        conn.message(msg)

    def pause_reading(self) -> None:
        for p in self.pipes:
            if p.connected_:
                p.transport.pauseProducing()

    def resume_reading(self) -> None:
        for p in self.pipes:
            if p.connected_:
                p.transport.resumeProducing()

    @property
    def write_paused(self) -> bool:
        return all(p.gate.paused for p in self.pipes if p.connected_)

    def pipe_closed(self, index: int) -> defer.Deferred[Failure]:
        """Fires with the exception once pipe ``index`` is closed (by either side)."""
        return self.pipes[index].closed.wait()

    def all_closed(self) -> defer.Deferred[Any]:
        return defer.DeferredList([p.closed.wait() for p in self.pipes])

    def close_pipe(self, index: int, abort: bool = False) -> defer.Deferred[Failure]:
        pipe = self.pipes[index]
        if pipe.connected_:
            pipe.transport.unregisterProducer()
            if abort:
                pipe.transport.abortConnection()
            else:
                pipe.transport.loseConnection()
        return pipe.closed.wait()

    async def close(self) -> None:
        """Abort every pipe and wait until all are gone."""
        for i in range(len(self.pipes)):
            self.close_pipe(i, abort=True)
        await self.all_closed()


async def echo_over_pipes(lp: LPClient, conn_id: int, port: int, data: bytes, timeout: float = 10) -> RxConn:
    """The test LP's echo round trip to the echo server at 127.0.0.1:``port``:
    SYN, DATA and FIN on ``conn_id``; checks that the echo came back whole,
    then the RP's FIN 0x88."""
    rx = lp.open(conn_id, "127.0.0.1", port)
    lp.send(conn_id, data)
    lp.fin(conn_id)
    reason, seq = await with_timeout(rx.when_fin(), timeout)
    assert bytes(rx.data) == data
    assert (reason, seq) == (wire.REASON_FIN, rx.messages - 1)
    return rx
