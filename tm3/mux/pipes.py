"""Pipes: the long-lived TCP connections between LP and RP, how a set of
them is gathered, and how messages are spread over them.

- :class:`PipeProtocol` is one pipe. Until it belongs to a session it
  reports to the :class:`PipeGathering` that is collecting it and keeps what
  it receives (bounded) for the session; then it hands every byte to the
  session, and takes what the session writes a batch at a time (one
  ``writeSequence`` call).
- :class:`PipeGathering` collects exactly ``n`` pipes for one session, for
  both roles: the RP's pending set of accepted pipes, the LP's dial attempt.
- :class:`PipeSet` knows which of a session's ``n`` pipes can send now
  (late binding: a pipe can take a batch only when its transport and the
  kernel have little left unsent) and ranks them for a batch, by expected
  delivery time from ``TCP_INFO`` or in rotation; the session's outbound
  half (tm3/mux/outbound.py) decides what goes in the batch.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Sequence
from typing import Protocol as TypingProtocol

from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionAborted, ConnectionLost
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tm3.core.schedule import TCP_INFO_SIZE, TcpInfo, expected_delivery
from tm3.core.wire import Decoder
from tm3.logs import plural
from tm3.mux.flow import WriteGate, abort_transport, register_producer

# Late binding (PipeSet): the kernel's TCP_NOTSENT_LOWAT on every pipe, and
# the size of the batch a pipe is given when it can send.
DEFAULT_PIPE_LOWAT = 32 * 1024
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
# A pipe's expected delivery time (TCP_INFO) is read again after this long.
ESTIMATE_TTL = 0.005
# How a batch chooses among the pipes that can take it.
DELIVERY_TIME = "delivery"
ROTATION = "rotation"
PIPE_ORDERS = (DELIVERY_TIME, ROTATION)
# A pending pipe may receive bytes before the set is complete (a fast LP);
# they are kept for the session. Past EARLY_READ_LIMIT the pipe is not read
# until the set is complete (the kernel holds the rest, and a TCP transport
# brings at most one more read of 64 KiB); a transport that delivers past
# MAX_EARLY_BYTES all the same is closed.
# The RP closes a pipe set still incomplete this long after its first pipe
# (docs/protocol.md, "How a session forms").
PENDING_TIMEOUT = 30.0
EARLY_READ_LIMIT = 64 * 1024
# A pipe closed with a FIN (a proxy that stops) is reset if still open this long after.
FINISH_TIMEOUT = 2.0
MAX_EARLY_BYTES = 256 * 1024
# TCP keepalive on every pipe: first probe after 30 s idle, then every 10 s;
# 3 unanswered probes close the pipe (and end its session), so a peer that
# vanished is noticed within about 60 s.
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
# While the pipes are not read (upload ceilings), the reactor cannot see an
# EOF or a reset on them; ask the kernel this often instead.
PAUSED_CHECK_INTERVAL = 1.0
# struct tcp_info (include/uapi/linux/tcp.h): tcpi_rtt, in microseconds, after
# 8 bytes of u8 fields and 15 u32 fields.
_TCPI_RTT = struct.Struct("=I")
_TCPI_RTT_OFFSET = 68
# Linux TCP states (include/net/tcp_states.h) that mean the peer is gone.
_PEER_GONE_STATES = frozenset({7, 8, 9, 11})  # CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING


class PipeOwner(TypingProtocol):
    """What a pipe reports to: a session."""

    def pipe_data(self, pipe: PipeProtocol, data: bytes) -> None: ...

    def pipe_lost(self, pipe: PipeProtocol, reason: Failure) -> None: ...


class Greeter(TypingProtocol):
    """What a pipe reports to while it greets its peer (the v2 handshake, or
    the RP's wait to learn which version a pipe speaks), before it joins a
    :class:`PipeGathering` with :meth:`PipeProtocol.join`."""

    def pipe_made(self, pipe: PipeProtocol) -> None: ...

    def pipe_data(self, pipe: PipeProtocol, data: bytes) -> None: ...

    def pipe_gone(self, pipe: PipeProtocol, reason: Failure) -> None: ...

    def pipe_secured(self, pipe: PipeProtocol) -> None: ...


@implementer(IHandshakeListener)
class PipeProtocol(Protocol):
    log = Logger()

    def __init__(self, group: PipeGathering | None = None, greeter: Greeter | None = None) -> None:
        self.greeter = greeter  # greeting the peer, before it joins a group
        self.group = group  # collecting this pipe, until a session owns it
        self.peer_window = 0  # v2: the initial window the peer gives each connection
        self.index = 0  # v2: its place in the set, from the handshake
        self.peer_host = ""
        self.owner: PipeOwner | None = None
        self.name = "pipe"
        self.decoder = Decoder()
        self.gate = WriteGate(self._paused, self._resumed)
        self.pipe_set: PipeSet | None = None
        self.early: list[bytes] = []
        self.early_bytes = 0
        self.early_paused = False
        self.connected_ = False
        # For --metrics (tm3/metrics.py): what went each way, framed.
        self.bytes_sent = 0
        self.bytes_received = 0
        self._finishing: IDelayedCall | None = None  # the reset after a FIN that did not close it

    # -- Twisted callbacks -------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_ = True
        transport = self.transport
        assert transport is not None
        peer = transport.getPeer()
        self.peer_host = str(getattr(peer, "host", ""))
        self.name = f"pipe {getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        if ITCPTransport.providedBy(transport):
            # Nagle would add up to 40 ms to every small exchange (Twisted #12311).
            transport.setTcpNoDelay(True)
        sock = self.socket()
        if sock is not None:
            _keepalive(sock)
        register_producer(transport, self.gate)
        if self.greeter is not None:
            self.greeter.pipe_made(self)
        elif self.group is not None:
            self.group.pipe_made(self)

    def handshakeCompleted(self) -> None:
        """The TLS handshake is over (IHandshakeListener; TLS pipes only)."""
        if self.greeter is not None:
            self.greeter.pipe_secured(self)

    def socket(self) -> socket.socket | None:
        """The TCP socket under the transport (under TLS, too), if any."""
        transport: object = self.transport
        for _ in range(3):
            get_handle = getattr(transport, "getHandle", None)
            if get_handle is not None:
                try:
                    handle = get_handle()
                except (AttributeError, OSError):
                    handle = None
                if isinstance(handle, socket.socket):
                    return handle
            transport = getattr(transport, "transport", None)  # TLS: the TCP transport it wraps
            if transport is None:
                break
        return None

    def join(self, group: PipeGathering, rest: bytes = b"") -> None:
        """The greeting is over: join ``group``; ``rest`` came after it."""
        self.greeter = None
        self.group = group
        group.pipe_made(self)
        if rest and self.connected_:
            self.bytes_received -= len(rest)  # counted as it came, for the greeter
            self.dataReceived(rest)

    def dataReceived(self, data: bytes) -> None:
        self.bytes_received += len(data)
        owner = self.owner
        if owner is not None:
            owner.pipe_data(self, data)
            return
        if self.greeter is not None:
            self.greeter.pipe_data(self, data)
            return
        self.early.append(data)
        self.early_bytes += len(data)
        if self.early_bytes > MAX_EARLY_BYTES:
            self.log.warn(
                "{pipe} sent {n} bytes before its pipe set was complete; closing it",
                pipe=self.name,
                n=self.early_bytes,
            )
            self.early, self.early_bytes = [], 0
            # Leave the pending set now: a TCP transport reports the abort
            # only in a later turn, and a set completed meanwhile must not
            # take this pipe.
            self._leave_group(Failure(ConnectionAborted()))
            self.abort()
        elif self.early_bytes >= EARLY_READ_LIMIT and not self.early_paused:
            self.early_paused = True
            self.pause_reading()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected_ = False
        if self._finishing is not None and self._finishing.active():
            self._finishing.cancel()
        self._finishing = None
        owner = self.owner
        if owner is not None:
            owner.pipe_lost(self, reason)
        elif self.greeter is not None:
            greeter, self.greeter = self.greeter, None
            greeter.pipe_gone(self, reason)
        else:
            self._leave_group(reason)

    def _leave_group(self, reason: Failure) -> None:
        group, self.group = self.group, None
        if group is not None:
            group.pipe_gone(self, reason)

    # -- attaching to a session --------------------------------------------

    def attach(self, owner: PipeOwner) -> None:
        """Hand the pipe to a session, replaying bytes that came early."""
        self.group = None
        self.owner = owner
        if self.early_paused:
            # Before the replay: resuming delivers nothing at once, and the
            # session may pause the pipe itself while it replays.
            self.early_paused = False
            self.resume_reading()
        early, self.early, self.early_bytes = self.early, [], 0
        for chunk in early:
            if self.owner is not owner:
                break  # the session ended while replaying
            owner.pipe_data(self, chunk)

    # -- writing -----------------------------------------------------------

    @property
    def blocked(self) -> bool:
        return self.gate.is_blocked

    def write_batch(self, batch: list[bytes]) -> None:
        """Write one batch of encoded messages (one ``writeSequence``)."""
        if self.connected_ and self.transport is not None:
            self.bytes_sent += sum(map(len, batch))
            self.transport.writeSequence(batch)

    def late_binding(self, lowat: int, congestion: str = "") -> None:
        """Tune the pipe for late binding: the kernel keeps at most about
        ``lowat`` unsent bytes (``TCP_NOTSENT_LOWAT``), and the transport
        closes the write gate on every write until it has drained. And, if
        named, the pipe's congestion control (``TCP_CONGESTION``)."""
        sock = self.socket()
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, lowat)
            except OSError:
                pass  # not Linux: the kernel buffer stays as it autotunes
            if congestion:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
                except OSError as e:
                    self.log.warn(
                        "{pipe}: cannot use congestion control {cc!r} ({why}); the system's default stays",
                        pipe=self.name,
                        cc=congestion,
                        why=e.strerror,
                    )
        transport: object = self.transport
        for _ in range(3):  # under TLS, the TCP transport is the one that buffers
            # (isinstance, not hasattr: a TLS wrapper forwards attribute reads
            # to the transport it wraps)
            if isinstance(transport, FileDescriptor):
                # Twisted pauses a transport's producer once its buffer holds
                # more than ``bufferSize``, which is also its read size and so
                # cannot be 0 (twisted.internet.abstract.FileDescriptor): make
                # every write pause it, so the gate reopens exactly when the
                # buffer has gone to the kernel.
                transport._isSendBufferFull = _always  # type: ignore[method-assign]
                break
            transport = getattr(transport, "transport", None)
            if transport is None:
                break

    def tcp_info(self) -> TcpInfo | None:
        sock = self.socket() if self.connected_ else None
        if sock is None:
            return None
        try:
            return TcpInfo.parse(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE))
        except (OSError, TypeError):
            return None

    def expected_delivery(self) -> float:
        """When a byte handed to this pipe now should reach the peer (seconds;
        0 without TCP_INFO, so such pipes rank by rotation alone)."""
        info = self.tcp_info()
        return 0.0 if info is None else expected_delivery(info, 0)

    def pause_reading(self) -> None:
        if self.connected_ and self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        if self.connected_ and self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def peer_gone(self) -> bool:
        """Whether the kernel says the peer closed or reset this pipe (for
        when reading is paused and the reactor cannot notice)."""
        sock = self.socket() if self.connected_ else None
        if sock is None:
            return False
        try:
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        except (OSError, IndexError, TypeError):
            return False
        return state in _PEER_GONE_STATES

    def rtt(self) -> float:
        """The kernel's smoothed RTT of this pipe in seconds (0 when unknown)."""
        sock = self.socket() if self.connected_ else None
        if sock is None:
            return 0.0
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_RTT.size + _TCPI_RTT_OFFSET)
        except (OSError, TypeError):
            return 0.0
        if len(info) < _TCPI_RTT_OFFSET + _TCPI_RTT.size:
            return 0.0
        return float(_TCPI_RTT.unpack_from(info, _TCPI_RTT_OFFSET)[0]) / 1e6

    def finish(self, clock: IReactorTime) -> None:
        """Close the pipe with a FIN once Twisted has written what it holds:
        a proxy that stops, with nothing left to carry. Reset after
        FINISH_TIMEOUT if it is still open (a TLS pipe waits for the peer's
        close_notify, which a peer that does not read never sends)."""
        self.owner = None
        self.group = None
        self.greeter = None
        transport = self.transport
        if transport is not None and self.connected_:
            transport.loseConnection()
            self._finishing = clock.callLater(FINISH_TIMEOUT, self._finish_expired)

    def _finish_expired(self) -> None:
        self._finishing = None
        if self.transport is not None and self.connected_:
            abort_transport(self.transport)

    def abort(self) -> None:
        """Close the pipe now: a dead session's backlog is worth nothing."""
        self.owner = None
        self.group = None
        self.greeter = None
        transport = self.transport
        if transport is not None and self.connected_:
            abort_transport(transport)

    def _paused(self) -> None:
        if self.pipe_set is not None:
            self.pipe_set.pipe_paused(self)

    def _resumed(self) -> None:
        if self.pipe_set is not None:
            self.pipe_set.pipe_resumed(self)


def _always() -> bool:
    return True


def _keepalive(sock: socket.socket) -> None:
    """Probe an idle pipe so a peer that vanished (a crash, a NAT that
    forgot the mapping) ends the session within about a minute."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except (OSError, AttributeError):
        pass  # not Linux, or not TCP


class PipeSet:
    """A session's pipes: which can take a batch now, and in what order.

    A pipe can take a batch when its write gate is open: the transport has
    handed everything to the kernel (any write closes the gate until the
    transport's buffer has drained: :meth:`PipeProtocol.late_binding`), and, with
    ``TCP_NOTSENT_LOWAT``, the kernel reports the socket writable only once
    less than half of ``lowat`` bytes are still unsent. When a pipe's gate
    opens, ``fill`` is called with it at once; :meth:`takers` lists the open
    pipes, best first, for data that arrives while some are open.
    """

    def __init__(
        self,
        pipes: Sequence[PipeProtocol],
        reactor: IReactorTime,
        fill: Callable[[PipeProtocol], None],
        order: str = DELIVERY_TIME,
        lowat: int = DEFAULT_PIPE_LOWAT,
        congestion: str = "",
    ) -> None:
        if order not in PIPE_ORDERS:
            raise ValueError(f"unknown pipe order {order!r}")
        self.pipes = list(pipes)
        self._reactor = reactor
        self._fill = fill
        self._by_delivery = order == DELIVERY_TIME
        self.batch = lowat
        self._next = 0
        self.reading_paused = False
        self._watch: LoopingCall | None = None
        self._estimates: dict[PipeProtocol, float] = {}  # expected delivery, as of _estimated
        self._estimated = -1.0
        self.open = 0  # pipes whose gate is open
        for index, pipe in enumerate(self.pipes):
            pipe.pipe_set = self
            pipe.name = f"{pipe.name} (#{index})"
            pipe.late_binding(lowat, congestion)
            if not pipe.gate.is_blocked:
                self.open += 1

    @property
    def can_take(self) -> bool:
        """Whether some pipe can take a batch now."""
        return self.open > 0

    def takers(self, waiting: int = 0) -> list[PipeProtocol]:
        """The pipes that can take a batch now, the best first: by expected
        delivery time (ties, and pipes without TCP_INFO, in rotation), or in
        rotation only. When ``waiting`` bytes fill a batch for every one of
        them anyway, the order hardly matters and TCP_INFO is not read."""
        pipes = self.pipes
        n = len(pipes)
        start = self._next
        self._next = start + 1 if start + 1 < n else 0
        open_ = [pipes[(start + i) % n] for i in range(n) if not pipes[(start + i) % n].gate.is_blocked]
        if self._by_delivery and len(open_) > 1 and waiting < len(open_) * self.batch:
            now = self._reactor.seconds()
            estimates = self._estimates
            if now - self._estimated >= ESTIMATE_TTL:
                estimates.clear()
                self._estimated = now
            for pipe in open_:
                if pipe not in estimates:
                    estimates[pipe] = pipe.expected_delivery()
            open_.sort(key=estimates.__getitem__)  # stable: rotation breaks ties
        return open_

    def pipe_paused(self, pipe: PipeProtocol) -> None:
        self.open -= 1

    def pipe_resumed(self, pipe: PipeProtocol) -> None:
        self.open += 1
        self._fill(pipe)

    def pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            for pipe in self.pipes:
                pipe.pause_reading()
            self._watch = LoopingCall(self._check_peers)
            self._watch.clock = self._reactor
            self._watch.start(PAUSED_CHECK_INTERVAL, now=False)

    def resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            self._stop_watch()
            for pipe in self.pipes:
                pipe.resume_reading()

    def _stop_watch(self) -> None:
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None

    def _check_peers(self) -> None:
        for pipe in self.pipes:
            if pipe.peer_gone() and pipe.owner is not None:
                pipe.owner.pipe_lost(
                    pipe, Failure(ConnectionLost("the peer closed the pipe while it was not being read"))
                )
                return

    def close(self, clean: bool = False) -> None:
        self._stop_watch()
        for pipe in self.pipes:
            pipe.pipe_set = None
            if clean:
                pipe.finish(self._reactor)
            else:
                pipe.abort()


class PipeGathering(Factory):
    """Collects exactly ``n`` pipes for one session; a factory of the pipes
    it collects (the LP connects with it; the RP's listening factory hands
    each accepted pipe to its pending one).

    ``on_complete`` gets the pipes once there are ``n``; they are the
    session's from then on, and the gathering starts over empty. A pipe
    that closes before leaves the set (``on_lost`` is told: the LP gives up
    the whole attempt). A set still incomplete ``timeout`` seconds after its
    first pipe is closed (the RP's rule: docs/protocol.md, "Pipes and sessions").
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        n: int,
        reactor: IReactorTime,
        on_complete: Callable[[list[PipeProtocol]], object],
        on_lost: Callable[[PipeProtocol, Failure], object] | None = None,
        timeout: float | None = None,
        hint: str = "",
    ) -> None:
        if n < 1:
            raise ValueError("a session needs at least one pipe")
        self.n = n
        self.reactor = reactor
        self.on_complete = on_complete
        self.on_lost = on_lost
        self.timeout = timeout
        self.hint = hint  # appended to the line that closes an incomplete set
        self.pipes: list[PipeProtocol] = []
        self.closed = False
        self._timer: IDelayedCall | None = None
        # Greets each new pipe first (the LP's v2 handshake); the pipe joins
        # this gathering when the greeting is over.
        self.greeter: Greeter | None = None

    def __len__(self) -> int:
        return len(self.pipes)

    def buildProtocol(self, addr: object) -> PipeProtocol:
        """A new pipe that reports to this gathering (to its greeter first, if any)."""
        pipe = PipeProtocol(self, None) if self.greeter is None else PipeProtocol(None, self.greeter)
        pipe.factory = self
        return pipe

    def pipe_made(self, pipe: PipeProtocol) -> None:
        if self.closed:
            pipe.abort()
            return
        self.pipes.append(pipe)
        if len(self.pipes) == 1 and self.timeout is not None:
            self._timer = self.reactor.callLater(self.timeout, self._expire)
        if len(self.pipes) < self.n:
            self.log.info(
                "{pipe} connected; {have} of {n} pipes pending", pipe=pipe.name, have=len(self.pipes), n=self.n
            )
            return
        complete, self.pipes = self.pipes, []
        self._cancel_timer()
        self.on_complete(complete)

    def pipe_gone(self, pipe: PipeProtocol, reason: Failure) -> None:
        if pipe not in self.pipes:
            return
        self.pipes.remove(pipe)
        if not self.pipes:
            self._cancel_timer()
        if self.on_lost is not None:
            self.on_lost(pipe, reason)
        else:
            self.log.info(
                "pending {pipe} closed; {have} of {pipes} pending",
                pipe=pipe.name,
                have=len(self.pipes),
                n=self.n,
                pipes=plural(self.n, "pipe"),
            )

    def _expire(self) -> None:
        self._timer = None
        stale, self.pipes = self.pipes, []
        self.log.warn(
            "pipe set incomplete after {t:.0f} s ({have} of {n}); closing those pipes{hint}",
            t=self.timeout,
            have=len(stale),
            n=self.n,
            hint=f": {self.hint}" if self.hint else "",
        )
        for pipe in stale:
            pipe.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def close(self) -> None:
        """Close every pipe gathered so far, and any that connects later."""
        self.closed = True
        self._cancel_timer()
        stale, self.pipes = self.pipes, []
        for pipe in stale:
            pipe.abort()
