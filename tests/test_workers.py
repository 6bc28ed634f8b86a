"""``twistd tm3rp --workers N``: a front process that routes each pipe, by
what its first bytes say, to one of N worker processes (tm3/rp/front.py,
tm3/rp/worker.py, tm3/rp/routing.py).

The routing itself is pure and tested without sockets; the rest runs the
real ``twistd`` front and its workers as child processes, with our LP in
this process (v2 with chosen session ids, so the test knows which worker
each set must land on, or v1)."""

from __future__ import annotations

import collections
import errno
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.error import ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.python.failure import Failure

from tests.support import servers
from tests.support.certs import make_pki
from tests.support.env import Env
from tests.support.logs import LogCapture
from tests.support.pattern import Pattern
from tests.support.ports import HOST
from tests.support.processes import LISTENING, REPO_ROOT, TWISTD, Proc
from tests.support.proxies import LP
from tests.support.waiting import until, within
from tm3.core.handshake import Hello
from tm3.lp import dialer
from tm3.rp import tap as rp_tap
from tm3.rp.front import (
    ACCEPT_PAUSE,
    SEND_AGAIN,
    WORKER_QUEUE,
    FrontService,
    WorkerProcess,
    _Acceptor,
    _Peek,
    metrics_for_workers,
)
from tm3.rp.routing import QUIET, V1, V2, Route, address_key, route, worker_for
from tm3.rp.worker import PipeReceiver

MiB = 1024 * 1024
# worker_for(address_key("10.0.0.i"), 2) for i in 0..7, as it was when the front was written.
PINNED = [1, 1, 1, 1, 0, 0, 0, 0]


def hello(session_id: bytes, index: int = 0, n: int = 2) -> bytes:
    return Hello(os.urandom(16), session_id, n, index, 262144).encode()


# -- routing (pure) -------------------------------------------------------------------


def test_a_v2_hello_routes_by_its_session_id_whatever_the_address() -> None:
    sid = bytes(range(16))
    a = route(hello(sid, 0), "10.0.0.1")
    b = route(hello(sid, 1) + b"more", "10.0.0.2")
    assert a == b == Route(V2, b"v2 " + sid)


def test_first_bytes_that_are_not_the_magic_route_a_v1_pipe_by_address() -> None:
    assert route(b"\x00\x01", "10.0.0.1") == Route(V1, address_key("10.0.0.1"))
    assert route(b"TM3v1", "10.0.0.1") == Route(V1, address_key("10.0.0.1"))  # differs at byte 5


def test_part_of_the_magic_or_nothing_is_not_decided_yet() -> None:
    whole = hello(b"s" * 16)
    for n in (0, 1, 7, 8, 47):
        assert route(whole[:n], "10.0.0.1") is None
    # After the hello wait: silence is an idle v1 LP; part of a hello still waits.
    assert route(b"", "10.0.0.1", waited=True) == Route(QUIET, address_key("10.0.0.1"))
    assert route(whole[:20], "10.0.0.1", waited=True) is None


def test_the_worker_hash_is_stable_and_spreads_keys() -> None:
    # Not Python's salted hash(): the same in every process and run.
    assert worker_for(b"v2 " + bytes(16), 4) == worker_for(b"v2 " + bytes(16), 4)
    assert [worker_for(address_key(f"10.0.0.{i}"), 8) for i in range(8)] == [
        worker_for(address_key(f"10.0.0.{i}"), 8) for i in range(8)
    ]
    counts = collections.Counter(worker_for(b"v2 " + i.to_bytes(16, "big"), 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3}
    assert all(800 <= c <= 1200 for c in counts.values()), counts
    assert {worker_for(b"k", 1)} == {0}


def test_the_worker_hash_is_pinned() -> None:
    # A front and its restarted self must agree: the hash is part of the design.
    assert [worker_for(address_key(f"10.0.0.{i}"), 2) for i in range(8)] == PINNED


# -- the front on a fake reactor (no processes) --------------------------------------------------


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

    def signalProcess(self, sig: str) -> None:
        self.signals.append(sig)


class SpawnReactor(MemoryReactorClock):
    """Spawns nothing: ``spawnProcess`` raises the next of ``spawn_errors``,
    or connects the protocol to a :class:`FakeProcess`."""

    def __init__(self) -> None:
        super().__init__()
        self.spawn_errors: list[Exception] = []
        self.spawned: list[FakeProcess] = []

    def spawnProcess(self, proto: ProcessProtocol, *args: object, **kwargs: object) -> FakeProcess:
        if self.spawn_errors:
            raise self.spawn_errors.pop(0)
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append(process)
        proto.makeConnection(process)  # type: ignore[arg-type]
        return process


def fake_front(reactor: SpawnReactor | None = None, **kwargs: object) -> FrontService:
    return FrontService(reactor or SpawnReactor(), "tcp:0", 2, ["--pipes", "2"], **kwargs)  # type: ignore[arg-type]


def test_a_worker_that_cannot_be_started_is_tried_again_with_the_same_backoff(logs: LogCapture) -> None:
    reactor = SpawnReactor()
    reactor.spawn_errors += [OSError(errno.EAGAIN, "Resource temporarily unavailable"), OSError(errno.ENOMEM, "x")]
    worker = fake_front(reactor).workers[1]
    fds = len(os.listdir("/proc/self/fd"))
    worker.start()
    assert worker.channel is None and len(os.listdir("/proc/self/fd")) == fds  # both ends closed
    assert logs.matching("worker 2 could not be started: resource temporarily unavailable; starting it again in 0.5 s")
    reactor.advance(0.5)
    assert logs.matching("worker 2 could not be started: x; starting it again in 1 s")
    reactor.advance(1)
    assert worker.channel is not None and worker.pid == 1000
    worker.channel.close()


def channel_for(worker: WorkerProcess) -> socket.socket:
    """Gives ``worker`` a small channel (a few messages) and returns its other end."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's least: a few messages
    mine.setblocking(False)
    worker.channel = mine
    return theirs


def test_a_worker_that_stops_reading_holds_at_most_its_queue_for_at_most_the_deadline(logs: LogCapture) -> None:
    reactor = SpawnReactor()
    front = fake_front(reactor, handshake_timeout=5.0)
    worker = front.workers[0]
    theirs = channel_for(worker)  # never read
    queued = []
    while len(worker.queue) < WORKER_QUEUE:
        queued.append(socket.socket())
        worker.send(V2, queued[-1])
        assert len(queued) < 1000, "the channel never filled"
    extra = [socket.socket() for _ in range(3)]
    for sock in extra:
        worker.send(V2, sock)
    assert len(worker.queue) == WORKER_QUEUE and all(s.fileno() == -1 for s in extra)
    assert logs.matching(f"pipe closed: worker 1 is not taking its pipes ({WORKER_QUEUE} wait for it already)")
    assert front.held() == 0  # the other workers' pipes are still taken
    reactor.advance(4.9)
    assert len(worker.queue) == WORKER_QUEUE
    reactor.advance(0.1)
    assert not worker.queue and all(s.fileno() == -1 for s in queued[-WORKER_QUEUE:])
    assert not reactor.getDelayedCalls() and not reactor.writers
    theirs.close()
    worker.channel.close()


def test_a_pipe_the_worker_cannot_take_is_closed_and_the_rest_are_taken(logs: LogCapture) -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    taken: list[str] = []

    def adopt(fd: int, family: int, verdict: str) -> None:
        if not taken:
            taken.append("failed")
            raise RuntimeError("a bug")
        taken.append(verdict)

    gone: list[bool] = []
    receiver = PipeReceiver(MemoryReactorClock(), theirs.detach(), adopt, lambda: gone.append(True))
    receiver.startService()
    pipes = [socket.socket() for _ in range(2)]
    for pipe, verdict in zip(pipes, (V2, QUIET)):
        socket.send_fds(mine, [verdict.encode()], [pipe.fileno()])
    receiver.read()
    assert taken == ["failed", QUIET] and not gone
    assert mine.recv(64) == b"2"  # taken so far, for the front
    assert logs.matching("a pipe from the front could not be taken: RuntimeError('a bug'); closed")
    # Should the reactor drop the reader all the same, the worker ends (and is started again).
    receiver._reader.connectionLost(Failure(RuntimeError("dropped")))
    assert gone == [True] and logs.matching("the front is gone (reading its socket failed: dropped): stopping")
    for sock in (mine, receiver.channel, *pipes):
        sock.close()


def peek_at(front: FrontService, host: str = "10.0.0.1") -> tuple[socket.socket, _Peek]:
    """A pipe from ``host`` that the front has accepted: the LP's end, and the front's peek at it."""
    ours, lp = socket.socketpair()
    ours.setblocking(False)
    front.accepted(ours, host)
    return lp, front.peeking[ours.fileno()]


def is_closed(sock: socket.socket) -> bool:
    """Whether the other end closed (with unread bytes, Linux resets instead)."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_a_begun_hello_has_the_handshake_timeout_even_when_it_is_below_the_hello_wait(logs: LogCapture) -> None:
    # As in a single RP: the handshake timeout runs from the magic; nothing
    # requires it to be longer than the hello wait.
    reactor = SpawnReactor()
    front = fake_front(reactor, hello_wait=5.0, handshake_timeout=2.0)
    lp, peek = peek_at(front)
    reactor.advance(1)
    lp.sendall(hello(b"s" * 16)[:20])
    peek.doRead()
    reactor.advance(1.9)
    assert front.peeking
    reactor.advance(0.1)
    assert not front.peeking and front.refused == 1 and not reactor.getDelayedCalls()
    assert logs.matching("pipe from 10.0.0.1 refused: it sent part of a v2 hello and no more within 2 s")
    assert is_closed(lp)
    lp.close()


def test_on_a_v2_only_rp_a_late_hello_still_goes_by_its_session_id(logs: LogCapture) -> None:
    reactor = SpawnReactor()
    front = fake_front(reactor, hello_wait=1.0, handshake_timeout=10.0, v1_only=False, serves_v1=False)
    ends = [channel_for(w) for w in front.workers]
    late, late_peek = peek_at(front)
    silent, _ = peek_at(front)
    reactor.advance(5)  # well past the hello wait: silence is not v1 here
    assert len(front.peeking) == 2
    late.sendall(hello(next(ids_for(2))))
    late_peek.doRead()
    data, fds, _, _ = socket.recv_fds(ends[1], 64, 1)
    assert (data, len(fds)) == (V2.encode(), 1)
    reactor.advance(5)
    assert not front.peeking and front.refused == 1
    assert logs.matching("pipe from 10.0.0.1 refused: it sent no v2 hello within 10 s")
    assert is_closed(silent)
    for sock in (late, silent, *ends, *(w.channel for w in front.workers if w.channel)):
        sock.close()
    os.close(fds[0])


class Listening:
    """What ``accept()`` returns, or raises, in turn."""

    def __init__(self, *results: object) -> None:
        self.results = list(results)

    def accept(self) -> object:
        result = self.results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    def fileno(self) -> int:
        return 1000


def test_an_accept_error_of_one_connection_does_not_pause_accepting() -> None:
    reactor = SpawnReactor()
    front = fake_front(reactor, hello_wait=3.0)
    pairs = [socket.socketpair() for _ in range(2)]
    acceptor = front._acceptor = _Acceptor(front, Listening(  # type: ignore[arg-type]
        OSError(errno.ECONNABORTED, "aborted"), (pairs[0][0], ("10.0.0.1", 1)),
        OSError(errno.EPROTO, "protocol"), (pairs[1][0], ("10.0.0.2", 2)),
        OSError(errno.EMFILE, "too many open files"), (None, None),
    ))  # fmt: skip
    acceptor.doRead()
    assert len(front.peeking) == 2
    assert len(acceptor.listening.results) == 1  # EMFILE paused: the next accept waits
    assert sorted(c.getTime() for c in reactor.getDelayedCalls()) == [ACCEPT_PAUSE, 3.0, 3.0]
    front.stopService()
    for a, b in pairs:
        a.close()
        b.close()


def test_a_send_error_that_is_not_the_worker_gone_does_not_close_its_socket(
    logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    reactor = SpawnReactor()
    worker = fake_front(reactor).workers[0]
    theirs = channel_for(worker)
    errors = [OSError(errno.ETOOMANYREFS, "Too many references"), OSError(errno.EINVAL, "Invalid argument")]
    real_send_fds = socket.send_fds

    def send_fds(sock: socket.socket, buffers: list[bytes], fds: list[int]) -> int:
        if errors:
            raise errors.pop(0)
        return real_send_fds(sock, buffers, fds)

    monkeypatch.setattr(socket, "send_fds", send_fds)
    pipes = [socket.socket() for _ in range(3)]
    for pipe in pipes:
        worker.send(V2, pipe)
    # Too many references: kept, and tried again after a moment (not on writable, which it is).
    assert worker.channel is not None and len(worker.queue) == 3 and not reactor.writers
    assert logs.matching("worker 1: cannot pass a pipe now (too many references): trying again in 0.1 s")
    reactor.advance(SEND_AGAIN)
    # Invalid argument: that pipe is closed, the others passed.
    assert pipes[0].fileno() == -1 and logs.matching("pipe closed: worker 1 could not be passed it: invalid argument")
    assert worker.channel is not None and not worker.queue and not reactor.getDelayedCalls()
    for _ in range(2):
        data, fds, _, _ = socket.recv_fds(theirs, 64, 1)
        assert (data, len(fds)) == (V2.encode(), 1)
        os.close(fds[0])
    # Gone: the channel is closed (processEnded follows).
    theirs.close()
    worker.send(V2, socket.socket())
    assert worker.channel is None


def test_the_front_counts_its_unrouted_pipes_per_address(logs: LogCapture) -> None:
    front = fake_front(max_per_address=2)
    a1, a1_peek = peek_at(front, "10.0.0.1")
    a2, _ = peek_at(front, "10.0.0.1")
    b, _ = peek_at(front, "10.0.0.2")
    a3 = socket.socketpair()
    front.accepted(a3[0], "10.0.0.1")
    assert front.refused == 1 and front.peeking_from == {"10.0.0.1": 2, "10.0.0.2": 1}
    a1.close()
    a1_peek.doRead()  # closed before it said anything: dropped
    assert front.peeking_from == {"10.0.0.1": 1, "10.0.0.2": 1}
    front.stopService()
    assert front.peeking_from == {} and not front.peeking
    for sock in (a2, b, *a3):
        sock.close()


def test_an_error_accepting_one_pipe_costs_that_pipe_not_accepting(
    logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    reactor = SpawnReactor()
    front = fake_front(reactor)
    pairs = [socket.socketpair() for _ in range(2)]
    acceptor = front._acceptor = _Acceptor(front, Listening(  # type: ignore[arg-type]
        (pairs[0][0], ("10.0.0.1", 1)), (pairs[1][0], ("10.0.0.2", 2)), BlockingIOError()
    ))  # fmt: skip
    accepted = front.accepted
    monkeypatch.setattr(front, "accepted", lambda sock, host: accepted(sock, host) if host != "10.0.0.1" else 1 / 0)
    acceptor.doRead()
    assert pairs[0][0].fileno() == -1 and list(front.peeking_from) == ["10.0.0.2"]
    assert logs.matching("pipe from 10.0.0.1: accepting it failed; closed")
    # Should the reactor drop the acceptor all the same, it is back a moment later.
    reactor.removeReader(acceptor)
    acceptor.connectionLost(Failure(ZeroDivisionError()))
    assert logs.matching("accepting failed; accepting again in 1 s") and acceptor not in reactor.readers
    reactor.advance(ACCEPT_PAUSE)
    assert acceptor in reactor.readers
    front.stopService()
    for a, b in pairs:
        a.close()
        b.close()


def test_a_pipe_whose_descriptor_did_not_fit_is_logged(logs: LogCapture, monkeypatch: pytest.MonkeyPatch) -> None:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    receiver = PipeReceiver(MemoryReactorClock(), theirs.detach(), lambda *a: None, lambda: None)
    results: list[object] = [(V2.encode(), [], socket.MSG_CTRUNC, None), BlockingIOError()]

    def recv_fds(*args: object) -> object:
        result = results.pop(0)
        if isinstance(result, Exception):
            raise result
        return result

    monkeypatch.setattr(socket, "recv_fds", recv_fds)
    receiver.read()
    assert logs.matching("a pipe from the front was lost: its descriptor did not fit (out of descriptors?)")
    assert mine.recv(64) == b"1"
    mine.close()
    receiver.channel.close()


def test_a_worker_that_dies_with_pipes_unread_says_how_many(logs: LogCapture) -> None:
    reactor = SpawnReactor()
    front = fake_front(reactor)
    worker = front.workers[0]
    theirs = channel_for(worker)
    pipes = [socket.socket() for _ in range(3)]
    for pipe in pipes:
        worker.send(V2, pipe)
    assert worker.passed == 3 and not worker.queue
    theirs.send(b"1")  # the worker took one
    theirs.close()
    worker.processEnded(Failure(ProcessTerminated(signal=9)))
    assert logs.matching("worker 1 died with up to 2 pipes unread; their LPs will redial"), logs.texts()
    worker.send(V2, socket.socket())  # while it is down: closed
    front._said_at_exit()
    assert logs.matching("front at exit: 0 pipes routed (worker 1: 0, worker 2: 0), 0 refused, 3 lost after routing")


# -- the real front and its workers -------------------------------------------------------------


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "tm3.key"
    path.write_text("workers-test-key-" + "k" * 32 + "\n")
    return str(path)


def ids_for(worker: int, workers: int = 2) -> Iterator[bytes]:
    """Session ids that the front routes to ``worker`` (1..workers)."""
    i = 0
    while True:
        i += 1
        sid = i.to_bytes(16, "big")
        if worker_for(b"v2 " + sid, workers) + 1 == worker:
            yield sid


class Ids:
    """Our LP's next session ids, chosen by the test (monkeypatched into tm3.lp.dialer);
    random once the test's are used up."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.next: list[bytes] = []
        monkeypatch.setattr(dialer, "new_session_id", self._take)

    def _take(self) -> bytes:
        return self.next.pop(0) if self.next else os.urandom(16)


@pytest.fixture
def ids(monkeypatch: pytest.MonkeyPatch) -> Ids:
    return Ids(monkeypatch)


async def front(env: Env, *extra: str, workers: int = 2) -> tuple[Proc, int]:
    """``twistd tm3rp --workers`` as a child; returns it and its pipe port
    once every worker has started."""
    proc = env.spawn(
        [TWISTD, "-n", "--pidfile=", "tm3rp", "--pipes", "2", "--workers", str(workers),
         "--listen", f"tcp:0:interface={HOST}", "--allow-to", HOST, "--summary-interval", "0", *extra]
    )  # fmt: skip
    match = await within(proc.when_output(LISTENING), 30, "the front to listen")
    for i in range(1, workers + 1):
        await within(proc.when_output(rb"worker %d: taking pipes from the front" % i), 20, f"worker {i} to start")
    return proc, int(match.group(1))


async def stop_front(proc: Proc, within_s: float = 30) -> None:
    proc.transport.signalProcess("TERM")
    print(proc.text)
    status = await within(proc.ended.wait(), within_s, "the front to end")
    assert status.exitCode == 0 or status.signal == signal.SIGTERM, proc.text
    assert "front at exit:" in proc.text, proc.text
    assert "Traceback" not in proc.text, proc.text


def pids(proc: Proc, worker: int) -> list[int]:
    return [int(p) for p in re.findall(rf"worker {worker} started \(pid (\d+)\)", proc.text)]


def lp_ports(lp: LP) -> set[int]:
    return {p.transport.getHost().port for p in lp.session.pipes.pipes}


def session_worker(proc: Proc, ports: set[int]) -> list[int]:
    """The workers that logged a session up over exactly these LP pipe ports."""
    found = []
    for worker, peers in re.findall(r"worker (\d+): session \d+ up \(v\d\): \d+ pipes? from ([^\n]*)", proc.text):
        if {int(p) for p in re.findall(r":(\d+)", peers)} == ports:
            found.append(int(worker))
    return found


@pytest_twisted.ensureDeferred
async def test_v2_sets_land_whole_on_the_worker_their_session_id_names(env: Env, key_file: str, ids: Ids) -> None:
    proc, port = await front(env, "--key-file", key_file)
    echo = await env.server(servers.echo(env.reactor))
    one, two = ids_for(1), ids_for(2)
    wanted = [1, 2, 1, 2, 2, 1]
    lps = []
    for w in wanted:
        ids.next.append(next(one if w == 1 else two))
        lps.append(await env.lp(port, 2, [echo.port], extra=["--key-file", key_file]))
    for i, lp in enumerate(lps):
        await env.echo_round_trip(lp, "forward", echo.port, Pattern(20 + i).bytes(300_000))
    for w, lp in zip(wanted, lps):
        ports = lp_ports(lp)
        await until(lambda ports=ports: session_worker(proc, ports), 5, "the worker's session line")
        assert session_worker(proc, ports) == [w], proc.text
    await stop_front(proc)
    assert "front at exit: 12 pipes routed (worker 1: 6, worker 2: 6), 0 refused" in proc.text, proc.text
    for w in (1, 2):
        assert re.search(rf"worker {w}: summary at exit: 3 connections", proc.text), proc.text


@pytest_twisted.ensureDeferred
async def test_an_idle_v1_lp_waits_one_hello_wait_not_two(env: Env, key_file: str) -> None:
    # With a key and --allow-v1, silent pipes are v1 only after the hello wait:
    # the front waits it, and the worker takes its word (no second wait).
    proc, port = await front(env, "--key-file", key_file, "--allow-v1", "--hello-wait", "3")
    echo = await env.server(servers.echo(env.reactor))
    started = time.monotonic()
    lp = await env.lp(port, 2, [echo.port])  # no key: v1, silent until a client comes
    await env.echo_round_trip(lp, "forward", echo.port, Pattern(31).bytes(100_000))
    elapsed = time.monotonic() - started
    print(f"v1 LP through the front, --hello-wait 3: first echo after {elapsed:.2f} s")
    assert elapsed < 5.5, f"{elapsed:.2f} s: the hello wait was waited twice"
    assert len(session_worker(proc, lp_ports(lp))) == 1, proc.text
    await stop_front(proc)


@pytest_twisted.ensureDeferred
async def test_a_v1_lp_is_served_at_once_when_its_first_message_comes(env: Env) -> None:
    # Without a key (v1 only), a pipe's first message classifies its silent
    # siblings from the same address, in the front as in a single RP.
    proc, port = await front(env, "--hello-wait", "20")
    echo = await env.server(servers.echo(env.reactor))
    lp = await env.lp(port, 2, [echo.port])
    started = time.monotonic()
    await env.echo_round_trip(lp, "forward", echo.port, Pattern(32).bytes(100_000))
    elapsed = time.monotonic() - started
    print(f"v1 LP through the front, --hello-wait 20: first echo after {elapsed:.2f} s")
    assert elapsed < 10, f"{elapsed:.2f} s: the silent pipes waited for the hello wait"
    await stop_front(proc)


@pytest_twisted.ensureDeferred
async def test_a_killed_worker_is_started_again_and_serves_the_lp_that_redials(
    env: Env, key_file: str, ids: Ids
) -> None:
    proc, port = await front(env, "--key-file", key_file)
    echo = await env.server(servers.echo(env.reactor))
    to_two = ids_for(2)
    ids.next += [next(to_two), next(to_two)]  # its first session and the one after the crash
    lp = await env.lp(port, 2, [echo.port], extra=["--key-file", key_file])
    await env.echo_round_trip(lp, "forward", echo.port, Pattern(41).bytes(50_000))
    first = lp.session
    [pid] = pids(proc, 2)
    os.kill(pid, signal.SIGKILL)
    await within(
        proc.when_output(rb"worker 2 \(pid %d\) killed by signal 9; starting it again in" % pid), 10, "the log"
    )
    await until(lambda: len(pids(proc, 2)) == 2, 10, "worker 2 to start again")
    await until(lambda: lp.session is not None and lp.session is not first, 30, "the LP's new session")
    await env.echo_round_trip(lp, "forward", echo.port, Pattern(42).bytes(50_000))
    assert session_worker(proc, lp_ports(lp)) == [2], proc.text
    assert pids(proc, 1) and len(pids(proc, 1)) == 1  # the other worker was not touched
    await stop_front(proc)


@pytest_twisted.ensureDeferred
async def test_sigterm_on_the_front_lets_a_download_in_progress_finish(env: Env, key_file: str) -> None:
    size = 8 * MiB
    src = await env.server(servers.source(env.reactor, size, seed=7))
    proc, port = await front(env, "--key-file", key_file, "--drain-timeout", "20")
    lp = await env.lp(port, 2, [src.port], extra=["--key-file", key_file])
    client = await env.open(lp, "forward", src.port)
    client.transport.pauseProducing()  # in progress, not done
    await until(lambda: lp.stats.bytes_from_pipes > 0, 10, "the download to start")
    proc.transport.signalProcess("TERM")
    await within(proc.when_output(rb"worker \d: draining: 1 connection open"), 10, "the worker to drain")
    proc.transport.signalProcess("TERM")  # again, and ^C: no error, no second stop
    proc.transport.signalProcess("INT")
    client.transport.resumeProducing()
    await until(lambda: client.received == size, 30, "the download to finish")
    assert client.data == Pattern(7).bytes(size)
    client.transport.loseConnection()
    status = await within(proc.ended.wait(), 30, "the front to end once its workers have")
    assert status.exitCode == 0 or status.signal == signal.SIGTERM, proc.text
    assert re.search(r"worker \d: drained: every connection finished", proc.text), proc.text
    assert "front at exit:" in proc.text and "Traceback" not in proc.text, proc.text


@pytest_twisted.ensureDeferred
async def test_the_front_bounds_the_unrouted_pipes_from_one_address(env: Env) -> None:
    proc, port = await front(env, "--hello-wait", "30", "--max-pending-per-address", "2")
    silent = [socket.create_connection((HOST, port)) for _ in range(3)]
    try:
        await within(
            proc.when_output(rb"pipe from 127\.0\.0\.1 refused: 2 pipes from it already wait to be routed"),
            10,
            "the third silent pipe to be refused",
        )
        silent[2].settimeout(5)
        assert silent[2].recv(1) == b""  # closed by the front
    finally:
        for s in silent:
            s.close()
    await stop_front(proc)


@pytest_twisted.ensureDeferred
async def test_the_tac_starts_a_front_from_tm3_workers(env: Env) -> None:
    proc = env.spawn(
        [TWISTD, "-n", "--pidfile=", "-y", str(REPO_ROOT / "tm3rp.tac")],
        {"TM3_PIPES": "2", "TM3_LISTEN": f"tcp:0:interface={HOST}", "TM3_WORKERS": "2", "TM3_ALLOW_TO": HOST},
    )
    match = await within(proc.when_output(LISTENING), 30, "the front to listen")
    await within(proc.when_output(rb"worker 2: taking pipes from the front"), 20, "worker 2 to start")
    echo = await env.server(servers.echo(env.reactor))
    lp = await env.lp(int(match.group(1)), 2, [echo.port])
    await env.echo_round_trip(lp, "forward", echo.port, Pattern(51).bytes(10_000))
    await stop_front(proc)


# -- options ---------------------------------------------------------------------------------


def parse(*argv: str) -> rp_tap.Options:
    config = rp_tap.Options()
    config.parseOptions(["--pipes", "2", *argv])
    return config


def test_one_worker_is_the_single_process_rp() -> None:
    config = parse()
    assert config["workers"] == 1
    service = rp_tap.makeService(config, MemoryReactorClock())
    assert isinstance(service, rp_tap.RemoteProxyService)


def test_workers_make_a_front_that_starts_them_with_the_same_options() -> None:
    config = parse("--workers", "3", "--max-payload", "1000", "--metrics", "tcp:9300:interface=127.0.0.1")
    front = rp_tap.makeService(config, MemoryReactorClock())
    assert isinstance(front, FrontService) and len(front.workers) == 3
    argv = front.workers[2].argv
    assert argv[argv.index("tm3rp") + 1 :] == [
        "--pipes", "2", "--workers", "3", "--max-payload", "1000", "--metrics", "tcp:9300:interface=127.0.0.1",
        "--workers", "1", "--metrics", "tcp:9302:interface=127.0.0.1",
    ]  # fmt: skip
    assert rp_tap.ENVIRONMENT["TM3_WORKERS"] == "workers"
    assert rp_tap.options_from_env({"TM3_PIPES": "2", "TM3_WORKERS": "4"})["workers"] == 4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "unix:/tmp/x.sock"], "--workers 2 needs a tcp: --listen, not 'unix:/tmp/x.sock'"),
        (["--metrics", "tcp:0"], "--metrics with --workers: give a fixed port"),
        (["--metrics", "unix:/tmp/m"], "--metrics with --workers: give a fixed port"),
        (["--metrics", "tcp:65535"], "workers take ports 65535..65536, past 65535"),
    ],
)
def test_what_a_front_cannot_do_is_a_usage_error(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as info:
        parse("--workers", "2", *argv)
    assert str(info.value).startswith(message) or message in str(info.value), info.value


def test_a_tls_listen_with_workers_is_a_usage_error(tmp_path: Path) -> None:
    server = make_pki(tmp_path).good.server
    listen = f"tls:0:privateKey={server.key}:certificate={server.cert}"
    parse("--listen", listen)  # one process: fine
    with pytest.raises(usage.UsageError, match=r"^--workers 2 needs a tcp: --listen.*TLS hides"):
        parse("--workers", "2", "--listen", listen)


def test_metrics_for_workers() -> None:
    assert metrics_for_workers("tcp:9100", 2) == ["tcp:9100", "tcp:9101"]
    assert metrics_for_workers("tcp:port=9100:interface=::1", 2) == ["tcp:9100:interface=::1", "tcp:9101:interface=::1"]


def test_the_front_knows_whether_v1_is_served(key_file: str) -> None:
    def serves_v1(*argv: str) -> bool:
        front = rp_tap.makeService(parse("--workers", "2", *argv), MemoryReactorClock())
        assert isinstance(front, FrontService)
        return front.serves_v1

    assert serves_v1() and serves_v1("--key-file", key_file, "--allow-v1")
    assert not serves_v1("--key-file", key_file)
