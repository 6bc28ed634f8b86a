"""Protocol v2 between our LP and our RP, over real sockets on loopback:
authenticated pipes, sessions bound by id (many LPs per RP, no takeovers),
a window per connection (a slow reader or a slow server holds up only its
own connection), and a reset after a half-close. v1 goes on beside it."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import defer

from tests.support import servers
from tests.support.clients import Client
from tests.support.env import Env
from tests.support.pattern import Pattern
from tests.support.ports import HOST
from tests.support.producers import PatternProducer
from tests.support.servers import was_reset
from tests.support.waiting import sleep, until, within
from tm3.core.handshake import MAGIC, Hello

MiB = 1024 * 1024
KiB = 1024


@pytest.fixture
def key(tmp_path: Path) -> str:
    path = tmp_path / "tm3.key"
    path.write_bytes(os.urandom(24).hex().encode() + b"\n")
    return str(path)


@pytest.fixture
def other_key(tmp_path: Path) -> str:
    path = tmp_path / "other.key"
    path.write_bytes(os.urandom(24).hex().encode())
    return str(path)


TCP_CLOSE = 7


def tcp_state(client: Client) -> int:
    return int(client.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0])


def raw_socket(port: int) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=5)
    s.setblocking(False)
    return s


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


# -- sessions ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_v2_carries_every_byte_both_ways(env: Env, key: str) -> None:
    srv = await env.server(servers.echo(env.reactor))
    rp = await env.rp(4, "--key-file", key)
    lp = await env.lp(rp.port, 4, [srv.port], extra=["--key-file", key])
    assert lp.session.terms.version == 2
    clients = [await env.open(lp, "socks" if i % 2 else "forward", srv.port) for i in range(20)]
    data = [Pattern(i).bytes(300_000 + i) for i in range(20)]
    for c, d in zip(clients, data):
        c.write(d)
        c.shutdown_write()
    await within(defer.gatherResults([c.lost.wait() for c in clients]), 20, "the echoes")
    assert all(bytes(c.data) == d for c, d in zip(clients, data))
    assert rp.session.terms.version == 2 and rp.stats.protocol_errors == 0
    assert rp.stats.credits_sent > 0 and lp.stats.credits_sent > 0  # the windows were used
    assert "up (v2)" in env.logged()
    # Every window grown is given back when its connection ends (also those
    # that drain to a half-closed client after they are over).
    assert lp.session.windows.used == rp.session.windows.used == 0


@pytest_twisted.ensureDeferred
async def test_an_lp_with_another_key_gets_no_session(env: Env, key: str, other_key: str) -> None:
    rp = await env.rp(2, "--key-file", key)
    lp = await env.lp(rp.port, 2, extra=["--key-file", other_key], wait=False)
    await until(lambda: "does not have our key" in env.logged(), 5, "the LP to refuse the RP's proof")
    await until(lambda: lp.service.dialer.failures >= 2, 10, "the LP to retry")
    assert lp.session is None and rp.stats.sessions == 0


@pytest_twisted.ensureDeferred
async def test_an_rp_without_a_key_says_so_and_the_lp_says_what_to_check(env: Env, key: str) -> None:
    rp = await env.rp(2)
    lp = await env.lp(rp.port, 2, extra=["--key-file", key], wait=False)
    await until(lambda: "this RP has no --key-file" in env.logged(), 5, "the RP to refuse the hello")
    await until(lambda: "does it have the same --key-file?" in env.logged(), 5, "the LP's hint")
    assert lp.session is None and rp.stats.sessions == 0


@pytest_twisted.ensureDeferred
async def test_with_a_key_v1_is_refused_unless_allowed_and_then_served_beside_v2(env: Env, key: str) -> None:
    srv = await env.server(servers.echo(env.reactor))
    strict = await env.rp(2, "--key-file", key, "--handshake-timeout", "1")
    v1 = await env.lp_client(strict.port, 2)
    v1.open(1, HOST, srv.port, pipe=0)  # a v1 message on one pipe; the other stays silent
    await within(defer.gatherResults([p.closed.wait() for p in v1.pipes]), 5, "the RP to close the v1 pipes")
    log = env.logged()
    assert "speaks v1, and this RP has a key" in log and "sent no v2 hello within 1 s" in log
    assert strict.stats.sessions == 0

    both = await env.rp(2, "--key-file", key, "--allow-v1")
    lp2 = await env.lp(both.port, 2, [srv.port], extra=["--key-file", key])
    lp1 = await env.lp(both.port, 2, [srv.port])  # our LP without a key speaks v1
    for lp in (lp1, lp2, lp1):
        await env.echo_round_trip(lp, "forward", srv.port, Pattern(5).bytes(200_000))
    versions = sorted(s.terms.version for s in both.service.multiplexer.sessions.by_key.values())
    assert versions == [1, 2]


# -- what an attacker can do without the key -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_idle_and_garbage_sockets_never_disturb_a_session(env: Env, key: str) -> None:
    """Idle sockets, a forged hello and garbage on the pipe port during a
    transfer: each is closed, the transfer completes, no session is replaced."""
    srv = await env.server(servers.echo(env.reactor))
    rp = await env.rp(4, "--key-file", key, "--hello-wait", "0.3", "--handshake-timeout", "0.5")
    lp = await env.lp(rp.port, 4, [srv.port], extra=["--key-file", key])
    client = await env.open(lp, "forward", srv.port)
    data = Pattern(9).bytes(30 * MiB)
    client.write(data)
    idle = [raw_socket(rp.port) for _ in range(8)]
    forged = raw_socket(rp.port)
    forged.send(Hello(os.urandom(16), os.urandom(16), 4, 0, 65536).encode() + os.urandom(32))
    magic_only = raw_socket(rp.port)
    magic_only.send(MAGIC)
    garbage = raw_socket(rp.port)
    garbage.send(os.urandom(64))
    await until(lambda: all(closed_by_peer(s) for s in [*idle, forged, magic_only]), 5, "the intruders to be closed")
    client.shutdown_write()
    await within(client.lost.wait(), 20, "the transfer")
    assert bytes(client.data) == data
    assert rp.stats.sessions == 1 and not rp.session.ended and lp.stats.sessions == 1
    log = env.logged()
    assert "failed the v2 handshake: wrong proof" in log
    assert "did not finish the v2 handshake within 0.5 s" in log
    assert "speaks v1, and this RP has a key" in log
    for s in [*idle, forged, magic_only, garbage]:
        s.close()


@pytest_twisted.ensureDeferred
async def test_many_lps_share_one_rp_even_from_one_address(env: Env, key: str) -> None:
    """v2 sets are bound by session id, not address: three LPs on one host
    each keep their session while the others come and go."""
    srv = await env.server(servers.echo(env.reactor))
    rp = await env.rp(3, "--key-file", key)
    lps = [await env.lp(rp.port, n, [srv.port], extra=["--key-file", key]) for n in (1, 3, 5)]
    await until(lambda: len(rp.service.multiplexer.sessions.by_key) == 3, 5, "three sessions on the RP")
    first = [lp.session for lp in lps]
    for _ in range(2):
        for lp in lps:
            await env.echo_round_trip(lp, "forward", srv.port, Pattern(3).bytes(100_000))
    await lps[0].stop()
    await until(lambda: len(rp.service.multiplexer.sessions.by_key) == 2, 5, "the stopped LP's session to end")
    await env.echo_round_trip(lps[2], "forward", srv.port, Pattern(4).bytes(100_000))
    assert [lp.session for lp in lps[1:]] == first[1:] and rp.stats.sessions == 3


# -- windows ------------------------------------------------------------------------------


async def exchanges(env: Env, lp: object, port: int, n: int) -> list[float]:
    """``n`` 10 KiB echo exchanges, one after another; their times in seconds."""
    times = []
    payload = Pattern(2).bytes(10 * KiB)
    for _ in range(n):
        start = time.monotonic()
        c = await env.open(lp, "forward", port, index=1)  # type: ignore[arg-type]
        c.write(payload)
        await within(c.when_received(len(payload)), 10, "a 10 KiB echo")
        times.append(time.monotonic() - start)
        c.transport.loseConnection()
    return times


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_holds_up_only_its_own_connection(env: Env, key: str) -> None:
    src = await env.server(servers.source(env.reactor, 1 << 40))
    echo = await env.server(servers.echo(env.reactor))
    rp = await env.rp(4, "--key-file", key)
    lp = await env.lp(rp.port, 4, [src.port, echo.port], extra=["--key-file", key])
    stuck = await env.open(lp, "forward", src.port)
    await within(stuck.when_received(1), 5, "the download to start")
    stuck.transport.pauseProducing()
    await sleep(0.5)  # its window and the socket buffers fill
    times = await exchanges(env, lp, echo.port, 20)
    assert max(times) < 5, times
    (conn,) = [c for c in lp.session.conns.values() if c.port == src.port]
    # What waits for the stuck client is its window (grown while the client
    # read fast, up to --max-window), not the whole stream.
    waiting = sum(map(len, conn.queue))
    assert 0 < waiting <= conn.rwin.granted - conn.rwin.consumed <= 16 * MiB, (waiting, conn.rwin.window)
    assert not rp.session.pipes.reading_paused and not lp.session.pipes.reading_paused
    assert rp.stats.credit_stalls >= 1
    stuck.transport.resumeProducing()
    before = stuck.received
    await until(lambda: stuck.received > before + 8 * MiB, 10, "the download to resume")


@pytest_twisted.ensureDeferred
async def test_a_server_that_stops_reading_holds_up_only_its_own_connection(env: Env, key: str) -> None:
    stuck_srv = await env.server(servers.never_read(env.reactor))
    echo = await env.server(servers.echo(env.reactor))
    rp = await env.rp(4, "--key-file", key, "--stall-timeout", "1")
    lp = await env.lp(rp.port, 4, [stuck_srv.port, echo.port], extra=["--key-file", key])
    uploader = await env.open(lp, "forward", stuck_srv.port)
    writer = PatternProducer(uploader.transport, 256 * MiB, seed=1)
    await until(lambda: lp.stats.credit_stalls >= 1, 5, "the LP to stop reading the uploader")
    times = await exchanges(env, lp, echo.port, 20)
    assert max(times) < 5, times
    await sleep(1.5)  # past --stall-timeout: v2 resets nothing, the window holds it
    assert rp.stats.stalled_resets == 0 and not rp.session.pipes.reading_paused
    (conn,) = [c for c in rp.session.conns.values() if c.port == stuck_srv.port]
    assert sum(map(len, conn.queue)) <= conn.rwin.granted - conn.rwin.consumed <= 16 * MiB
    written = writer.written
    await sleep(0.3)
    assert writer.written - written <= 1 * MiB  # the client is held back, not buffered for
    server = await within(stuck_srv.connection(0), 1)
    server.start_reading()
    await until(lambda: server.received >= 64 * MiB, 20, "the upload to resume")
    uploader.transport.abortConnection()


# -- a reset after a half-close -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_client_that_half_closes_then_resets_tears_the_server_side_down(env: Env, key: str) -> None:
    """v1 cannot say it (one FIN per side): the server would stream forever."""
    src = await env.server(servers.source(env.reactor, 1 << 40))
    rp = await env.rp(2, "--key-file", key)
    lp = await env.lp(rp.port, 2, [src.port], extra=["--key-file", key])
    client = await env.open(lp, "forward", src.port)
    await within(client.when_received(1 * MiB), 5, "the stream")
    client.shutdown_write()
    server = await within(src.connection(0), 1)
    await within(server.eof.wait(), 5, "the half-close to reach the server")
    client.reset()
    reason = await within(server.lost.wait(), 1, "the server side to be torn down")
    assert was_reset(reason)
    await until(lambda: not rp.session.conns and not lp.session.conns, 2, "both proxies to forget it")


@pytest_twisted.ensureDeferred
async def test_a_server_that_half_closes_then_resets_resets_the_client(env: Env, key: str) -> None:
    srv = await env.server(servers.half_close_first(env.reactor, b"hello"))
    rp = await env.rp(2, "--key-file", key)
    lp = await env.lp(rp.port, 2, [srv.port], extra=["--key-file", key])
    client = await env.open(lp, "forward", srv.port)
    await within(client.eof.wait(), 5, "the server's half-close")
    assert bytes(client.data) == b"hello"
    server = await within(srv.connection(0), 1)
    server.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    server.transport.abortConnection()
    # As over direct TCP, a half-closed socket learns of the reset when it
    # next writes: here the RP, writing what the client sends on.
    client.write(b"more")
    # The client stopped reading at the EOF, as any half-closeable socket
    # does; the kernel tells the RST (state CLOSE) from a FIN (CLOSE_WAIT).
    await until(lambda: tcp_state(client) == TCP_CLOSE, 2, "the client to be reset")
    assert "ended: rst" in env.logged()
