"""Late binding's edges, each found by a review of its first version
(2d423eb) and kept as a regression test: ids and queued ends, a peer's
reset, TLS pipes, the scheduler's memory, the cost per read, the session's
limit after a drop, TCP_INFO reads per message.

In memory (tests/support/rp_harness.py, lp_harness.py) except the TLS one,
which uses real sockets (the ``env`` fixture) as tests/test_tls.py does.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.support import servers
from tests.support.certs import PKI, make_pki
from tests.support.env import Env
from tests.support.lp_harness import LP
from tests.support.rp_harness import RP
from tests.support.waiting import until
from tm3.core.ids import IdAllocator
from tm3.core.schedule import LeastServedFirst
from tm3.core.wire import Fin, Syn
from tm3.mux.pipes import _always

HOST, PORT = "93.184.216.34", 443
KiB = 1024


def open_conn(rp: RP, cid: int = 3, pipe: int = 0):  # type: ignore[no-untyped-def]
    rp.send(Syn(cid, 0, HOST, PORT), pipe=pipe)
    return rp.accept()


# -- 1. LP: an id is reused while the old connection's end is still queued ---------------


def test_lp_does_not_reuse_an_id_whose_old_fin_is_still_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rule 7's 10 s quarantine starts when the connection is over, which is
    now when its FIN/RST is *queued*, not when it is bound to a pipe. Pipes
    that cannot send for 10 s (a stall, or a connection starved by the
    scheduler) let the LP hand the id to a new connection whose SYN
    (CONTROL_FIRST) then goes out before the old connection's data and RST.

    The LP's wire output is fed to an in-memory RP: the old connection's
    bytes must reach the old server and the new one's the new server, and
    the RP must see no protocol error."""
    monkeypatch.setattr("tm3.lp.role.IdAllocator", functools.partial(IdAllocator, count=1))
    lp = LP(n=1)
    lp.up()
    rp = RP(n=1)
    rp.up()
    lp_pipe = lp.pipes[0][1]

    seen = [0]

    def carry() -> None:  # LP -> RP, what the LP wrote since the last look
        lp.reactor.advance(0)
        value = lp_pipe.value()
        chunk, seen[0] = value[seen[0] :], len(value)
        if chunk:
            rp.send_raw(chunk)
        rp.flush()

    a, ta = lp.accept()  # id 0
    carry()
    _, server_a = rp.accept()
    lp_pipe.producer.pauseProducing()  # the pipe cannot send (a loss; a slow path)
    a.dataReceived(b"A" * 10)
    LP.reset(a)  # 0x99 queued behind the 10 bytes; over here: id 0 freed now
    lp.reactor.advance(10.5)  # the pipe still has not sent it
    c, tc = lp.accept()
    # The one id is still quarantined (its 0x99 has not left): the client is refused.
    assert tc.disconnected
    lp_pipe.producer.resumeProducing()
    carry()
    assert rp.session.stats.protocol_errors == 0, "the RP saw a protocol error"
    assert server_a.value() == b"A" * 10, f"the old server got {server_a.value()!r}"
    lp.reactor.advance(10)  # the quarantine, counted from when the 0x99 left
    c, tc = lp.accept()
    assert not tc.disconnected
    lp_pipe.producer.pauseProducing()
    c.dataReceived(b"C" * 10)
    lp_pipe.producer.resumeProducing()
    carry()
    assert rp.session.stats.protocol_errors == 0, "the RP saw a protocol error"
    assert server_a.value() == b"A" * 10, f"the old server got {server_a.value()!r}"
    assert len(rp.reactor.tcpClients) == 2
    _, server_c = rp.accept()
    rp.flush()
    assert server_c.value() == b"C" * 10, f"the new server got {server_c.value()!r}"


# -- 2. RP: after the peer's 0x99, the connection's queued data and FIN still go ----------


def test_rp_drops_what_waits_for_a_connection_the_lp_reset() -> None:
    """Session._over keeps a queue whose last item is our FIN, 'so the id is
    not reused before the peer has it'. But after the LP's 0x99 the LP's
    connection is over already (rule 6): nobody will read those bytes, they
    take the pipes from live connections (up to --send-queue each), and if
    they wait past the LP's 10 s quarantine they land in the id's next
    connection on the LP (which routes by id alone)."""
    rp = RP(n=1)
    session = rp.up()
    server, st = open_conn(rp)
    rp.pipes[0][1].producer.pauseProducing()
    server.dataReceived(b"s" * 100_000)
    server.readConnectionLost()  # the server finished: our FIN 0x88 is queued behind its bytes
    rp.send(Fin(3, 1, 0x99))  # the client reset (its SYN was seq 0): over on both sides
    assert session.conns.get(3) is None
    rp.pipes[0][1].producer.resumeProducing()
    sent = rp.sent()
    assert [m for m in sent if m.conn_id == 3] == [], f"{len(sent)} messages sent for a connection the LP reset"
    assert session.outbound.queued == 0


# -- 3. TLS: the late-binding patch lands on the TLS wrapper, not on the TCP transport -----


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "tm3.key"
    path.write_bytes(b"tm3 test key: 32 bytes and more..")
    return str(path)


@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls_pipes_close_the_write_gate_on_every_write(env: Env, pki: PKI, key_file: str) -> None:
    """PipeProtocol.late_binding looks for ``_isSendBufferFull`` and
    ``dataBuffer`` with hasattr; on a TLS pipe ``pipe.transport`` is a
    BufferingTLSTransport, a ProtocolWrapper whose ``__getattr__`` forwards
    to the TCP transport, so hasattr is true and ``_always`` is set on the
    wrapper, where Twisted never calls it. The TCP transport keeps pausing
    the gate only past 64 KiB: over TLS, a stalled pipe keeps taking bound
    messages (the issue late binding fixes)."""
    g = pki.good
    srv = await env.server(servers.echo(env.reactor))
    spec = f"tls:0:interface=127.0.0.1:privateKey={g.server.key}:certificate={g.server.cert}"
    rp = await env.rp(2, "--listen", spec, "--key-file", key_file)
    lp = await env.lp(
        rp.port,
        2,
        [srv.port],
        extra=["--key-file", key_file],
        remote=f"tls:127.0.0.1:{rp.port}:trustRoots={g.trust_dir}",
    )
    await until(lambda: rp.session is not None, 5, "the RP's session")
    for pipe in [*lp.session.pipes.pipes, *rp.session.pipes.pipes]:
        tcp = pipe.transport.transport  # under the TLS wrapper
        assert hasattr(tcp, "dataBuffer") and hasattr(tcp, "doWrite"), tcp
        assert tcp._isSendBufferFull is _always, f"{pipe.name}: the TCP transport under TLS was not tuned"


# -- 4. LeastServedFirst(share=1) ('--send-order arrival'): the heap never shrinks -------------


def test_arrival_order_does_not_grow_the_heap_without_bound() -> None:
    """With share=1 every pop takes the fifo; heap entries are only ever
    removed by compaction, which is triggered by the fifo's length alone,
    and the fifo never grows there. While some connection is always waiting
    the heap grows by one entry per push, for ever (memory, and heappush
    gets slower)."""
    lsf: LeastServedFirst[str] = LeastServedFirst(share=1)
    for k in range(50):
        lsf.push(f"c{k}", 0)
    for i in range(100_000):  # each pick sends a little and the connection waits again
        key = lsf.pop()
        assert key is not None
        lsf.push(key, i)
    assert len(lsf) == 50
    assert len(lsf._heap) <= 4 * len(lsf) + 128, f"heap holds {len(lsf._heap)} entries for {len(lsf)} waiting"


# -- 5. A socket read costs O(pipes) while every pipe is blocked --------------------------------


class _CountingGate:
    reads = 0

    @property
    def is_blocked(self) -> bool:
        _CountingGate.reads += 1
        return True


def test_a_socket_read_does_not_scan_every_pipe() -> None:
    """Outbound._enqueue asks ``self.pipes.can_take`` (a loop over all n
    pipes) whenever no kick is pending, i.e. on every read while every gate
    is closed, which with the gate closing on every write is the normal
    state under load. The old PipeSet kept an ``unblocked`` counter."""
    n = 256
    rp = RP(n=n)
    rp.up()
    server, _ = open_conn(rp)
    for pipe, _ in rp.pipes:
        pipe.gate = _CountingGate()  # type: ignore[assignment]
    _CountingGate.reads = 0
    reads = 200
    for _ in range(reads):
        server.dataReceived(b"x" * 100)
    assert _CountingGate.reads <= 4 * reads, f"{_CountingGate.reads} gate checks for {reads} reads ({n} pipes)"


# -- 6. A wedge: the session stays 'over' after its queue was dropped, sockets stay paused -----


def test_sockets_resume_when_the_queue_is_dropped_below_half() -> None:
    """``_under`` runs only at the end of ``_fill``; ``flush`` returns before
    any ``_fill`` when nothing waits, and ``drop_queue`` never checks. So when
    the session went over its limit while pipes could send (a TLS pipe,
    whose gate stays open, see above; or several sockets read in one turn)
    and the queue is then dropped (the LP resets the big connection), no
    fill ever comes: ``over`` stays set and every socket paused meanwhile,
    or attached meanwhile, is never read again."""
    rp = RP(n=1, total_send_queue=1024 * KiB, send_queue=4096 * KiB)
    session = rp.up()
    big, _ = open_conn(rp, cid=3)
    big.dataReceived(b"x" * (1100 * KiB))  # one turn's reads past --total-send-queue
    assert session.outbound.over
    _, fresh = open_conn(rp, cid=4)  # a server that connects now starts paused
    assert fresh.producerState == "paused"
    rp.send(Fin(3, 1, 0x99))  # the client of the big one resets: its queue is dropped
    assert session.outbound.queued == 0
    rp.flush()
    rp.reactor.advance(60)
    assert not session.outbound.over
    assert fresh.producerState == "producing", "a server socket is never read again"


# -- 7. One TCP_INFO syscall per open pipe for every message, under light load --------------


def test_a_lone_message_does_not_cost_a_tcp_info_per_open_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under light load every read is its own flush, and ``takers`` ranks
    every open pipe by ``expected_delivery`` (one getsockopt(TCP_INFO) each)
    to give one small batch to the first: n syscalls per message."""
    from tm3.mux.pipes import PipeProtocol

    calls = [0]

    def counting(self: PipeProtocol) -> float:
        calls[0] += 1  # stands for the getsockopt(TCP_INFO) a real pipe makes
        return 0.01

    monkeypatch.setattr(PipeProtocol, "expected_delivery", counting)
    n = 16
    rp = RP(n=n)
    rp.up()
    server, _ = open_conn(rp)
    rp.flush()
    calls[0] = 0
    messages = 50
    for _ in range(messages):
        server.dataReceived(b"keystroke")
        rp.flush()
    assert calls[0] <= 2 * messages, f"{calls[0]} TCP_INFO calls for {messages} one-message batches ({n} pipes)"


# -- the pipes' congestion control ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipe_congestion_sets_tcp_congestion_on_every_pipe_of_both_proxies(env: Env) -> None:
    """--pipe-congestion: the pipes of both proxies use the named algorithm
    (reno: available everywhere, unlike bbr or cubic in a namespace)."""
    import socket

    srv = await env.server(servers.echo(env.reactor))
    rp = await env.rp(2, "--pipe-congestion", "reno")
    lp = await env.lp(rp.port, 2, [srv.port], extra=["--pipe-congestion", "reno"])
    await env.echo_round_trip(lp, "forward", srv.port, b"x" * 100_000)

    def cc(sock: socket.socket) -> bytes:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")

    for proxy in (rp, lp):
        for pipe in proxy.session.pipes.pipes:
            sock = pipe.socket()
            assert sock is not None and cc(sock) == b"reno", pipe.name


# -- a stalled pipe takes little, the others carry the rest ---------------------------


class FreezableRelay:
    """A TCP relay in front of the RP (Twisted's port forwarder) whose
    accepted sockets have a small receive buffer, and any of which can stop
    reading: a pipe that stalls (a loss being repaired, a path that died)."""

    def __init__(self, host: str, port: int) -> None:
        from twisted.protocols import portforward

        relay = self
        self.servers: list[Any] = []

        class Server(portforward.ProxyServer):
            def connectionMade(self) -> None:
                import socket

                self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # type: ignore[union-attr]
                relay.servers.append(self)
                super().connectionMade()

        self.factory = portforward.ProxyFactory(host, port)
        self.factory.protocol = Server


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_a_stalled_pipe_traps_a_bounded_few_exchanges_and_the_others_complete(
    env: Env, tmp_path: Path, v2: bool
) -> None:
    """One of two pipes stops moving (the relay stops reading it); then 30
    exchanges of 16 KiB start at once. Early binding spread every request's
    messages over both pipes, so every exchange waited on the stalled one.
    Bound late, a pipe takes messages only while it moves: the stalled one
    traps what its socket buffers and a batch hold (about 100 KiB: 6 to 8
    exchanges here), and the others complete over the other pipe. (Measured
    on the code before late binding: 0 of 30.)"""
    from twisted.internet import reactor

    from tests.support.waiting import until

    key = tmp_path / "key"
    key.write_text("k" * 40)
    extra = ["--key-file", str(key)] if v2 else []
    srv = await env.server(servers.echo(env.reactor))
    rp = await env.rp(2, *extra)
    relay = FreezableRelay("127.0.0.1", rp.port)
    port = reactor.listenTCP(0, relay.factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    env.ports.append(port)
    lp = await env.lp(rp.port, 2, [srv.port], remote=f"127.0.0.1:{port.getHost().port}", extra=extra)
    await env.echo_round_trip(lp, "forward", srv.port, b"warm" * 1000)
    assert len(relay.servers) == 2
    relay.servers[0].transport.pauseProducing()  # LP -> RP on that pipe stops moving
    request = b"r" * 16 * 1024
    clients = [await env.open(lp, "forward", srv.port) for _ in range(30)]
    for c in clients:
        c.write(request)
    done = lambda: sum(c.received == len(request) for c in clients)  # noqa: E731
    try:
        await until(lambda: done() >= 15, 15, "exchanges over the pipe that moves")  # early binding: 0
    finally:
        print(f"\n{done()} of 30 exchanges completed while one pipe was stalled")
    relay.servers[0].transport.resumeProducing()
    await until(lambda: done() == 30, 15, "the trapped exchanges once the pipe moves again")
    assert lp.stats.protocol_errors == rp.stats.protocol_errors == 0
