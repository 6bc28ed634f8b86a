"""The front of a ``--workers N`` RP: one process that accepts every pipe
and hands it to one of N worker processes, each a whole RP without a port
(tm3/rp/worker.py), so the sessions of many LPs use N cores.

Every pipe of a set must reach the same worker, so the front routes a pipe
by what its first bytes say (tm3/rp/routing.py), read with ``MSG_PEEK``,
which leaves them in the socket for the worker: a v2 pipe by the session id
in its HELLO, anything else (a v1 message, or silence for the hello wait)
by its source address. It then passes the socket with ``SCM_RIGHTS`` and its
verdict (``quiet``: the worker need not wait again), and closes its copy.

The front never wraps an accepted socket in a Twisted transport: closing
one shuts the connection down (``shutdown(2)``), for the worker too. It
listens through Twisted (the ``--listen`` endpoint, its errors and the
``listening on`` line), then accepts on that socket itself.

Bounds, as a single RP has them: ``--allow-from`` at accept; at most
``--max-pending-pipes`` pipes being peeked at, and of those
``--max-pending-per-address`` from one address; a pipe silent for
``--hello-wait`` is routed by address where v1 is served (else it waits for
its hello up to ``--handshake-timeout``, then is closed); one that began a
hello (sent the magic) and no more within ``--handshake-timeout`` of it, or
part of the magic within the hello wait, is closed, as a single RP closes
them. A routed pipe that finds its worker's socket full waits in that
worker's queue: at most ``WORKER_QUEUE`` pipes, each for at most
``--handshake-timeout``, so a worker that stops reading costs only its own
pipes.

A worker tells the front, on the same socket, how many pipes it has taken
so far (a decimal count, after each batch): what the front passed and the
worker had not taken when it died is lost with its socket, and the front
says how many at most. The exit line counts those, and the pipes the front
closed after routing them (their worker was down, full or failing), as lost.

Workers: started at start, each with a socketpair; one that ends while the
front runs is started again after a delay that doubles from 0.5 s up to
30 s while it keeps dying young (or cannot be started: a failed fork or exec
is tried again the same way), each time one line in the log; the pipes
routed to it meanwhile are closed (the LP redials). On stop (SIGTERM) the
front stops accepting, sends SIGTERM to every worker (each drains its
connections for up to ``--drain-timeout``), and ends once they have, or
kills them ``STOP_MARGIN`` seconds after the drain timeout.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorCore,
    IReactorFDSet,
    IReactorProcess,
    IReactorTCP,
    IReactorTime,
    IReadDescriptor,
    IWriteDescriptor,
)
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tm3.cli import cannot_start, os_reason
from tm3.core.handshake import MAGIC
from tm3.fdlimit import raise_soft_limit
from tm3.listening import ListeningService
from tm3.logs import RateLimit, plural
from tm3.rp.routing import PEEK_SIZE, QUIET, V1, Route, route, worker_for
from tm3.rp.service import within
from tm3.rp.worker import WORKER_ENV, StopOnce
from tm3.tls import server_from_string

#: How a worker is started: twistd, by the Python running the front, in a
#: process group of its own: a terminal's ^C (SIGINT to its group) or a
#: signal to the front's group reaches the front, which stops the workers,
#: and not each worker a second time.
TWISTD = "import os; os.setpgid(0, 0); from twisted.scripts.twistd import run; run()"
#: The descriptor the worker finds the front's socket on.
CHILD_FD = 3
#: Restart delays: doubled from FIRST up to MOST while a worker keeps
#: ending within YOUNG seconds of its start.
RESTART_FIRST = 0.5
RESTART_MOST = 30.0
RESTART_YOUNG = 30.0
#: On stop: how long past --drain-timeout the workers have to end.
STOP_MARGIN = 10.0
#: Accepts per reactor turn.
ACCEPT_BATCH = 64
#: After accept() failed (EMFILE): how long to leave the listening socket alone.
ACCEPT_PAUSE = 1.0
#: What accept() fails with for one connection (accept(2): Linux passes a new
#: connection's pending network error on) rather than for the listening
#: socket: skip that connection and take the next one.
ONE_CONNECTION = frozenset(
    {
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENOPROTOOPT,
        errno.EHOSTDOWN,
        errno.ENONET,
        errno.EHOSTUNREACH,
        errno.EOPNOTSUPP,
        errno.ENETUNREACH,
        errno.EINTR,
    }
)
#: What passing a pipe fails with when the worker is gone (processEnded follows).
WORKER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED})
#: ... and when the kernel is short of something for now (memory, or room for
#: descriptors in flight): the pipe stays queued and is passed SEND_AGAIN later.
NOT_NOW = frozenset({errno.ENOBUFS, errno.ENOMEM, errno.ETOOMANYREFS})
SEND_AGAIN = 0.1
#: Pipes that may wait for room on one worker's socket; more are closed. A
#: worker that stops reading holds at most these (and what its socket holds)
#: and never the slots of --max-pending-pipes the other workers' pipes need.
WORKER_QUEUE = 64


class IFrontReactor(IReactorTime, IReactorCore, IReactorTCP, IReactorFDSet, IReactorProcess):
    pass


class FrontService(MultiService):
    """Accepts pipes on ``listen`` and routes each to one of ``workers``
    worker processes, started with ``worker_argv`` (tm3rp options) each."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        listen: str,
        workers: int,
        worker_argv: Sequence[str],
        worker_metrics: Sequence[str] = (),
        allow_from: Sequence[Any] = (),
        max_pending: int = 256,
        max_per_address: int = 0,
        hello_wait: float = 1.0,
        handshake_timeout: float = 10.0,
        v1_only: bool = True,
        serves_v1: bool = True,
        drain_timeout: float = 10.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.setName("tm3rp front")
        self.reactor = cast(IFrontReactor, reactor)
        self.listen = listen
        self.allow_from = tuple(allow_from)
        self.max_pending = max_pending
        self.max_per_address = max_per_address  # 0: no cap of its own
        self.hello_wait = hello_wait
        self.handshake_timeout = handshake_timeout
        self.v1_only = v1_only  # no key: a v1 message routes its silent siblings too
        self.serves_v1 = serves_v1  # no key, or --allow-v1: silence is an idle v1 LP
        self.drain_timeout = drain_timeout
        unused = Factory()  # Twisted only listens; _Acceptor accepts
        unused.noisy = False
        self.listener = ListeningService(
            server_from_string(reactor, listen), unused, f"TM3 pipes, routed to {plural(workers, 'worker')}"
        )
        self.listener.setServiceParent(self)
        environ = os.environ if environ is None else environ
        metrics = [["--metrics", m] for m in worker_metrics] or [[]] * workers
        self.workers = [
            WorkerProcess(self, i + 1, [*worker_argv, *metrics[i]], environ, handshake_timeout) for i in range(workers)
        ]
        self.peeking: dict[int, _Peek] = {}  # by file descriptor
        self.peeking_from: dict[str, int] = {}  # how many of them from each address
        self.routed = [0] * workers
        self.lost = 0  # of the routed: closed by the front, or unread by a worker that died
        self.refused = 0
        self._acceptor: _Acceptor | None = None
        self._refusals = RateLimit()
        self.stopping = False
        # A second SIGTERM (or ^C) while the workers drain must not stop the reactor twice.
        self.reactor.callWhenRunning(StopOnce(self.reactor).install)

    # -- start and stop -------------------------------------------------------------------

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as e:
            cannot_start("tm3rp", f"cannot listen on {self.listen}: {os_reason(e.socketError)}")
        port = self.listener.port
        listening = getattr(port, "socket", None)
        if not isinstance(listening, socket.socket):
            raise RuntimeError(f"--workers: {self.listen} is not a TCP port")
        # Twisted listened; from here on we accept, and Twisted does not.
        port.stopReading()  # type: ignore[union-attr]
        self._acceptor = _Acceptor(self, listening)
        self.reactor.addReader(self._acceptor)
        raise_soft_limit()  # as a single RP does (tm3/fdlimit.py); the workers inherit it
        for worker in self.workers:
            worker.start()

    def stopService(self) -> Deferred[None]:
        self.stopping = True
        if self._acceptor is not None:
            self.reactor.removeReader(self._acceptor)
            self._acceptor = None
        for peek in list(self.peeking.values()):
            self._drop(peek)
        listening = super().stopService()
        ended = [w.stop(self.drain_timeout + STOP_MARGIN) for w in self.workers]
        done = DeferredList([listening, *ended], consumeErrors=True)
        return done.addCallback(lambda _: self._said_at_exit())

    def _said_at_exit(self) -> None:
        self.log.info(
            "front at exit: {routed} routed ({each}), {refused} refused, {lost} lost after routing",
            routed=plural(sum(self.routed), "pipe"),
            each=", ".join(f"worker {i + 1}: {n}" for i, n in enumerate(self.routed)),
            refused=self.refused,
            lost=self.lost,
            routed_by_worker=self.routed,
        )

    # -- pipes ----------------------------------------------------------------------------

    def accept_failed(self, error: OSError) -> None:
        """The listening socket stays readable while accept() fails (out of
        descriptors or memory: EMFILE, ENFILE, ENOBUFS, ENOMEM, or anything
        else not about one connection): leave it alone for a second rather
        than spin."""
        if self._acceptor is None:
            return
        if self._refusals.allow():
            self.log.warn(
                "accept failed: {why}; not accepting for {t:g} s",
                why=os_reason(error),
                t=ACCEPT_PAUSE,
                suppressed=self._refusals.take_suppressed(),
            )
        self.reactor.removeReader(self._acceptor)
        self.reactor.callLater(ACCEPT_PAUSE, self._accept_again, self._acceptor)

    def _accept_again(self, acceptor: _Acceptor) -> None:
        if self._acceptor is acceptor:
            self.reactor.addReader(acceptor)

    def acceptor_lost(self, acceptor: _Acceptor, reason: Failure) -> None:
        """The reactor dropped the acceptor (its doRead raised): accepting
        must not stop for good, and not without a word."""
        if self._acceptor is not acceptor:
            return  # stopped
        self.log.failure("accepting failed; accepting again in {t:g} s", failure=reason, t=ACCEPT_PAUSE)
        self.reactor.callLater(ACCEPT_PAUSE, self._accept_again, acceptor)

    def held(self) -> int:
        # Not the pipes queued for a worker: each worker's queue has its own
        # bound (WORKER_QUEUE), so one stuck worker cannot refuse the rest.
        return len(self.peeking)

    def accepted(self, sock: socket.socket, host: str) -> None:
        if self.allow_from and not within(host, self.allow_from):
            self._refuse(sock, "pipe from {host} refused: not in --allow-from", host=host)
            return
        if self.max_per_address and self.peeking_from.get(host, 0) >= self.max_per_address:
            self._refuse(
                sock,
                "pipe from {host} refused: {n} pipes from it already wait to be routed (--max-pending-per-address)",
                host=host,
                n=self.max_per_address,
            )
            return
        if self.held() >= self.max_pending:
            self._refuse(
                sock,
                "pipe from {host} refused: {n} pipes already wait for their sets (--max-pending-pipes)",
                host=host,
                n=self.max_pending,
            )
            return
        # Where v1 is not served, silence is no route: a late hello must still
        # reach the worker its session id names, as late as the handshake timeout.
        peek = _Peek(self, sock, host, self.hello_wait if self.serves_v1 else self.handshake_timeout)
        self.peeking[peek.fd] = peek
        self.peeking_from[host] = self.peeking_from.get(host, 0) + 1
        peek.timer = self.reactor.callLater(peek.wait, self._waited, peek)
        self.reactor.addReader(peek)

    def _refuse(self, sock: socket.socket, text: str, **fields: object) -> None:
        sock.close()
        self.refused += 1
        if self._refusals.allow():
            self.log.warn(text, suppressed=self._refusals.take_suppressed(), **fields)

    def peeked(self, peek: _Peek, data: bytes) -> None:
        if not data or data == peek.peeked:  # closed (or reset) before it said enough
            self._drop(peek)
            return
        peek.peeked = data
        decided = route(data, peek.host)
        if decided is None:
            # The peeked bytes stay readable: be woken by the next byte, not every turn.
            peek.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, len(data) + 1)
            peek.lowered = True
            if not peek.in_hello and len(data) >= len(MAGIC):
                # A hello has begun: as in a single RP (tm3/rp/admission.py),
                # it has the handshake timeout from here, whatever the hello wait.
                peek.in_hello = True
                peek.wait = self.handshake_timeout
                if peek.timer is not None:
                    peek.timer.reset(self.handshake_timeout)
            return
        self._route(peek, decided)
        if decided.verdict == V1 and self.v1_only and self.peeking_from.get(peek.host):
            # As a single RP does (tm3/rp/admission.py): the silent pipes from
            # the same address are the same v1 LP's idle ones.
            for other in [p for p in self.peeking.values() if p.host == peek.host and not p.peeked]:
                self._route(other, Route(QUIET, decided.key))

    def _waited(self, peek: _Peek) -> None:
        peek.timer = None
        decided = route(peek.peeked, peek.host, waited=True) if self.serves_v1 else None
        if decided is not None:
            self._route(peek, decided)
            return
        self._drop(peek)
        self.refused += 1
        self.log.warn(
            "pipe from {host} refused: it sent {what} within {t:g} s",
            host=peek.host,
            what="part of a v2 hello and no more" if peek.peeked else "no v2 hello",
            t=peek.wait,
        )

    def _route(self, peek: _Peek, decided: Route) -> None:
        self._forget(peek)
        if peek.lowered:
            peek.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        index = worker_for(decided.key, len(self.workers))
        self.routed[index] += 1
        self.workers[index].send(decided.verdict, peek.sock)

    def _forget(self, peek: _Peek) -> None:
        if self.peeking.pop(peek.fd, None) is not None:
            left = self.peeking_from[peek.host] - 1
            if left:
                self.peeking_from[peek.host] = left
            else:
                del self.peeking_from[peek.host]
        self.reactor.removeReader(peek)
        if peek.timer is not None and peek.timer.active():
            peek.timer.cancel()
        peek.timer = None

    def _drop(self, peek: _Peek) -> None:
        self._forget(peek)
        peek.sock.close()


@implementer(IReadDescriptor)
class _Acceptor:
    """Accepts on the listening socket Twisted bound."""

    log = Logger()

    def __init__(self, front: FrontService, listening: socket.socket) -> None:
        self.front = front
        self.listening = listening

    def fileno(self) -> int:
        return self.listening.fileno()

    def doRead(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, address = self.listening.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno not in ONE_CONNECTION:  # EMFILE and the like
                    self.front.accept_failed(e)
                    return
                continue  # that connection is gone; the next may be fine
            host = str(address[0])
            try:
                sock.setblocking(False)
                self.front.accepted(sock, host)
            except Exception:  # a bug: it costs this pipe, not every pipe after it
                self.log.failure("pipe from {host}: accepting it failed; closed", host=host)
                sock.close()

    def connectionLost(self, reason: Failure) -> None:
        self.front.acceptor_lost(self, reason)

    def logPrefix(self) -> str:
        return "front"


@implementer(IReadDescriptor)
class _Peek:
    """An accepted pipe whose first bytes the front waits for."""

    def __init__(self, front: FrontService, sock: socket.socket, host: str, wait: float) -> None:
        self.front = front
        self.sock = sock
        self.fd = sock.fileno()
        self.host = host
        self.wait = wait  # what its timer was set to last
        self.peeked = b""
        self.lowered = False  # SO_RCVLOWAT raised
        self.in_hello = False  # its first bytes are the magic: the handshake timeout runs
        self.timer: IDelayedCall | None = None

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        try:
            data = self.sock.recv(PEEK_SIZE, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self.front.peeked(self, data)

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "front"


class WorkerProcess(ProcessProtocol):
    """Worker ``index`` (1..N): its process, restarted when it ends while
    the front runs, and the socket the front passes its pipes on."""

    log = Logger()

    def __init__(
        self, front: FrontService, index: int, argv: Sequence[str], environ: Mapping[str, str], deadline: float = 10.0
    ) -> None:
        self.front = front
        self.reactor = front.reactor
        self.index = index
        self.argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "tm3rp", *argv]
        self.environ = dict(environ)
        self.channel: socket.socket | None = None
        # Waiting for room on the channel: (verdict, pipe, when queued), at
        # most WORKER_QUEUE, each for at most ``deadline`` seconds.
        self.queue: deque[tuple[str, socket.socket, float]] = deque()
        self.deadline = deadline
        self._expiry: IDelayedCall | None = None
        self._resend: IDelayedCall | None = None  # after a NOT_NOW error
        self._send_errors = RateLimit()
        self._channel = _Channel(self)
        self._writing = False
        self.passed = 0  # pipes sent on this channel
        self.taken = 0  # of them, the worker says it has taken
        self.pid: int | None = None
        self.started_at = 0.0
        self.delay = RESTART_FIRST
        self._restart: IDelayedCall | None = None
        self._ended: Deferred[None] | None = None
        self.stopping = False
        self.restarts = 0
        self._closed_pipes = RateLimit()

    @property
    def name(self) -> str:
        return f"worker {self.index}"

    def start(self) -> None:
        self._restart = None
        if self.stopping or self.front.stopping:
            return
        env = {**self.environ, WORKER_ENV: f"{self.index}:{CHILD_FD}"}
        try:
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as e:
            self._start_again(f"could not be started: {os_reason(e)}")
            return
        try:
            transport = self.reactor.spawnProcess(
                self, self.argv[0], self.argv, env=env, childFDs={0: 0, 1: 1, 2: 2, CHILD_FD: theirs.fileno()}
            )
        except Exception as e:  # OSError (no executable, ENOMEM, EAGAIN) or worse: it must not stay down
            mine.close()
            self._start_again(f"could not be started: {os_reason(e) or repr(e)}")
            return
        finally:
            theirs.close()
        mine.setblocking(False)
        self.channel = mine
        self.passed = self.taken = 0
        self.reactor.addReader(self._channel)
        self.pid = transport.pid
        self.started_at = self.reactor.seconds()
        self._ended = Deferred()
        self.log.info("{worker} started (pid {pid})", worker=self.name, pid=self.pid)

    def send(self, verdict: str, sock: socket.socket) -> None:
        if self.channel is None:
            self._closed(sock, "is not running")
            return
        if len(self.queue) >= WORKER_QUEUE:
            self._closed(sock, f"is not taking its pipes ({WORKER_QUEUE} wait for it already)")
            return
        self.queue.append((verdict, sock, self.reactor.seconds()))
        self.flush()
        if self.queue and self._expiry is None:
            self._expiry = self.reactor.callLater(self.deadline, self._expire)

    def _expire(self) -> None:
        """Close the queued pipes that have waited ``deadline`` seconds: their LPs gave up on them by now."""
        self._expiry = None
        now = self.reactor.seconds()
        while self.queue and self.queue[0][2] + self.deadline <= now:
            self._closed(self.queue.popleft()[1], f"did not take it within {self.deadline:g} s")
        if self.queue:
            self._expiry = self.reactor.callLater(self.queue[0][2] + self.deadline - now, self._expire)
        else:
            self._flushed()

    def flush(self) -> None:
        while self.queue and self.channel is not None and self._resend is None:
            verdict, sock, _ = self.queue[0]
            try:
                socket.send_fds(self.channel, [verdict.encode()], [sock.fileno()])
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in WORKER_GONE:
                    self._close_channel()
                    return
                if e.errno in NOT_NOW:
                    # Not on writable: the socket has room, and would wake us every turn.
                    self._resend = self.reactor.callLater(SEND_AGAIN, self._send_again)
                    if self._send_errors.allow():
                        self.log.warn(
                            "{worker}: cannot pass a pipe now ({why}): trying again in {t:g} s",
                            worker=self.name,
                            why=os_reason(e),
                            t=SEND_AGAIN,
                            suppressed=self._send_errors.take_suppressed(),
                        )
                    break
                self.queue.popleft()
                self._closed(sock, f"could not be passed it: {os_reason(e)}")
                continue
            self.queue.popleft()
            sock.close()  # the worker has its own now
            self.passed += 1
        self._flushed()

    def read_taken(self) -> None:
        """The worker's count of pipes taken, the latest of what it sent."""
        while self.channel is not None:
            try:
                data = self.channel.recv(64)
            except BlockingIOError:
                return
            except ConnectionResetError:  # it died with pipes unread; what it sent before still follows
                continue
            except OSError:
                data = b""
            if not data:  # the worker is gone: processEnded follows
                self.reactor.removeReader(self._channel)
                return
            if data.isdigit():
                self.taken = max(self.taken, int(data))

    def _send_again(self) -> None:
        self._resend = None
        self.flush()

    def _flushed(self) -> None:
        want = bool(self.queue) and self.channel is not None and self._resend is None
        if want != self._writing:
            self._writing = want
            (self.reactor.addWriter if want else self.reactor.removeWriter)(self._channel)
        if not self.queue:
            for timer in (self._expiry, self._resend):
                if timer is not None and timer.active():
                    timer.cancel()
            self._expiry = self._resend = None

    def _closed(self, sock: socket.socket, why: str) -> None:
        sock.close()
        self.front.lost += 1
        if self._closed_pipes.allow():
            self.log.warn(
                "pipe closed: {worker} {why} (the LP redials)",
                worker=self.name,
                why=why,
                suppressed=self._closed_pipes.take_suppressed(),
            )

    def _close_channel(self) -> None:
        while self.queue:
            self._closed(self.queue.popleft()[1], "ended")
        self._flushed()  # no writer, no expiry timer: before the channel goes
        if self.channel is None:
            return
        self.read_taken()  # its last word, if it said one
        self.reactor.removeReader(self._channel)
        self.channel.close()
        self.channel = None
        unread = self.passed - self.taken
        if unread > 0:
            self.front.lost += unread
            self.log.warn(
                "{worker} died with up to {n} unread; their LPs will redial", worker=self.name, n=plural(unread, "pipe")
            )

    def processEnded(self, reason: Failure) -> None:
        self._close_channel()
        status = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        how = f"killed by signal {sig}" if sig is not None else f"exited with status {status}"
        ended, self._ended = self._ended, None
        pid, self.pid = self.pid, None
        if self.stopping or self.front.stopping:
            self.log.info("{worker} (pid {pid}) {how}", worker=self.name, pid=pid, how=how)
        else:
            if self.reactor.seconds() - self.started_at >= RESTART_YOUNG:
                self.delay = RESTART_FIRST
            self._start_again(f"(pid {pid}) {how}")
        if ended is not None:
            ended.callback(None)

    def _start_again(self, what: str) -> None:
        """One line, and the next start after the current delay, doubled for the one after."""
        self.log.warn(
            "{worker} {what}; starting it again in {delay:g} s", worker=self.name, what=what, delay=self.delay
        )
        self.restarts += 1
        self._restart = self.reactor.callLater(self.delay, self.start)
        self.delay = min(self.delay * 2, RESTART_MOST)

    def stop(self, timeout: float) -> Deferred[None]:
        """SIGTERM, and SIGKILL if it has not ended ``timeout`` seconds later."""
        self.stopping = True
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        ended = self._ended
        if ended is None or self.transport is None:
            return succeed(None)
        self.transport.signalProcess("TERM")
        kill = self.reactor.callLater(timeout, self._kill)

        def over(result: None) -> None:
            if kill.active():
                kill.cancel()

        ended.addCallback(over)
        return ended

    def _kill(self) -> None:
        if self.transport is not None and self.pid is not None:
            self.log.warn("{worker} (pid {pid}) did not end in time: killed", worker=self.name, pid=self.pid)
            self.transport.signalProcess("KILL")


@implementer(IReadDescriptor, IWriteDescriptor)
class _Channel:
    """A worker's socket: written when the front's pipes wait for room,
    read for the worker's count of pipes taken."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker

    def fileno(self) -> int:
        channel = self.worker.channel
        return channel.fileno() if channel is not None else -1

    def doRead(self) -> None:
        self.worker.read_taken()

    def doWrite(self) -> None:
        self.worker.flush()

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return self.worker.name


def metrics_for_workers(description: str, workers: int) -> list[str]:
    """``--metrics tcp:PORT[:...]`` for each worker: worker i on PORT+i-1."""
    m = re.fullmatch(r"(tcp6?:)(?:port=)?(\d+)((?::.*)?)", description)
    if m is None or int(m.group(2)) == 0:
        raise ValueError(f"give a fixed port, as tcp:PORT[:interface=ADDR], not {description!r}")
    first = int(m.group(2))
    if first + workers - 1 > 65535:
        raise ValueError(f"workers take ports {first}..{first + workers - 1}, past 65535")
    return [f"{m.group(1)}{first + i}{m.group(3)}" for i in range(workers)]
