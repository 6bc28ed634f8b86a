"""The file descriptor ceiling (tm3/fdlimit.py): at RLIMIT_NOFILE the LP
stops accepting clients and the RP refuses new connections, while pipes and
open connections go on. The proxies under a small limit are real ``twistd``
processes started under ``prlimit``."""

from __future__ import annotations

import re
import resource
import socket

import pytest_twisted

from tests.support import servers
from tests.support.clients import Client
from tests.support.env import Env
from tests.support.ports import HOST
from tests.support.processes import TWISTD, Proc, clean_env, python_env
from tests.support.servers import was_reset
from tests.support.waiting import sleep, until, within
from tm3.fdlimit import RESUME_AT, FdCeiling, open_fds, raise_soft_limit, soft_limit

LIMIT = 160  # the proxies' RLIMIT_NOFILE, soft and hard


def test_the_ceiling_leaves_room_for_what_is_open_pipes_and_the_reserve() -> None:
    assert FdCeiling.at_start(reserve=64, pipes=8, limit=1024, in_use=20).ceiling == 1024 - 20 - 8 - 64
    assert FdCeiling.at_start(reserve=64, pipes=8, limit=50, in_use=20).ceiling == 1  # never 0 or less


def test_full_at_the_ceiling_and_room_again_below_95_percent() -> None:
    c = FdCeiling(100)
    assert c.has_room(99) and not c.has_room(100)
    assert [c.update(n) for n in (98, 99)] == [None, None]
    assert c.update(100) == "full" and c.full
    assert c.update(101) is None
    assert c.update(int(100 * RESUME_AT)) is None  # not below yet
    assert c.update(int(100 * RESUME_AT) - 1) == "room" and not c.full
    assert c.update(96) is None


def test_a_ceiling_of_one_still_resumes() -> None:
    c = FdCeiling(1)
    assert c.update(1) == "full" and c.update(0) == "room"


def test_open_fds_counts_a_new_socket() -> None:
    before = open_fds()
    with socket.socket():
        assert open_fds() == before + 1


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before, after = raise_soft_limit()
    try:
        assert before == soft
        assert after == soft_limit() == (soft if hard == resource.RLIM_INFINITY else hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def limited(argv: list[str]) -> list[str]:
    return ["prlimit", f"--nofile={LIMIT}:{LIMIT}", TWISTD, "-n", "--pidfile=", *argv]


async def ceiling_of(proc: Proc, what: str) -> int:
    m = await within(proc.when_output(rf"room for (\d+) {what}".encode()), 30, f"the {what} ceiling")
    return int(m.group(1))


async def echoes(client: Client, text: bytes) -> bool:
    """Whether ``text`` comes back on ``client`` (an echo) within 10 s."""
    start = client.received
    client.transport.write(text)
    await within(client.when_received(start + len(text)), 10, "the echo")
    return bytes(client.data[start:]) == text


@pytest_twisted.ensureDeferred
async def test_the_lp_stops_accepting_at_its_ceiling_and_its_pipes_go_on(env: Env) -> None:
    echo = await env.server(servers.echo(env.reactor))
    rp = await env.rp(2)
    lp = env.spawn(
        limited(["tm3lp", "--remote", f"{HOST}:{rp.port}", "--pipes", "2", "--fd-reserve", "16",
                 "--forward", f"tcp:0:interface={HOST}:{HOST}:{echo.port}"]),
        python_env(clean_env()),
    )  # fmt: skip
    ceiling = await ceiling_of(lp, "client sockets")
    assert 0 < ceiling < LIMIT - 2 * 2 - 16
    await within(lp.when_output(rb"session 1 up"), 30, "the LP's session")
    m = await within(lp.when_output(rb"listening on .*port=(\d+)\).*forward"), 10, "the forward port")
    port = int(m.group(1))

    clients = [await env.connect(port) for _ in range(ceiling)]
    await within(lp.when_output(rb"not accepting new clients"), 10, "the LP to stop accepting")
    # Past the ceiling a client is not accepted: it waits in the backlog.
    waiting = await env.connect(port)
    waiting.transport.write(b"hello")
    await sleep(0.5)
    assert waiting.received == 0 and not waiting.lost.fired
    # The pipes and the open connections go on.
    assert await echoes(clients[0], b"still here")
    assert await echoes(clients[-1], b"and here")
    assert b"pipes to the RP lost" not in lp.output
    assert rp.session is not None and not rp.session.ended

    # Below 95% of the ceiling it accepts again: the waiting client is served.
    for c in clients[: ceiling - int(ceiling * RESUME_AT) + 1]:
        c.transport.loseConnection()
    await within(lp.when_output(rb"accepting clients again"), 10, "the LP to accept again")
    await within(waiting.when_received(5), 10, "the waiting client's echo")
    assert bytes(waiting.data) == b"hello"


@pytest_twisted.ensureDeferred
async def test_the_rp_refuses_connections_at_its_ceiling_and_keeps_its_pipes(env: Env) -> None:
    echo = await env.server(servers.echo(env.reactor))
    rp = env.spawn(
        limited(["tm3rp", "--pipes", "2", "--listen", f"tcp:0:interface={HOST}", "--allow-to", HOST,
                 "--fd-reserve", "16", "--max-pending-pipes", "8", "--drain-timeout", "0"]),
        python_env(clean_env()),
    )  # fmt: skip
    ceiling = await ceiling_of(rp, "server sockets and pipes")
    m = await within(rp.when_output(rb"listening on .*port=(\d+)\).*TM3 pipes"), 10, "the pipe port")
    rp_port = int(m.group(1))
    lp = await env.lp(rp_port, 2, forward=[echo.port])
    port = lp.forward_ports[0]

    # Server sockets fit under the ceiling less the session's 2 pipes.
    clients = []
    for i in range(ceiling - 2):
        c = await env.connect(port)
        assert await echoes(c, b"x"), i
        clients.append(c)
    refused = await env.connect(port)
    assert was_reset(await within(refused.lost.wait(), 10, "the refused client's reset"))
    await within(rp.when_output(rb"refusing new connections until some close"), 10, "the RP's line")
    assert re.search(rb"ended: fd-limit", rp.output)
    # Pipes and open connections go on; the pipe port still takes pipes (a
    # new one waits for its set instead of being closed on arrival).
    assert await echoes(clients[0], b"still here")
    assert lp.session is not None and not lp.session.ended
    probe = await env.connect(rp_port)
    await sleep(0.5)
    assert not probe.lost.fired
    probe.transport.loseConnection()
    # Once some close, new connections go through again.
    for c in clients[:5]:
        c.transport.loseConnection()
    await until(lambda: rp.output.count(b"ended: fin") >= 5, 10, "the RP to see them end")
    again = await env.connect(port)
    assert await echoes(again, b"room again")


@pytest_twisted.ensureDeferred
async def test_the_rp_counts_its_server_sockets_and_pipes_exactly(env: Env) -> None:
    """What the RP's ceiling is checked against: server sockets from the
    connect until the socket closes (a failed connect included) and the
    sessions' pipes."""
    echo = await env.server(servers.echo(env.reactor))
    rp = await env.rp(3)
    lp = await env.lp(rp.port, 3, forward=[echo.port, env.closed_port()])
    mux = rp.service.multiplexer
    await until(lambda: mux.sessions.pipes_open == 3, 5, "the RP's session")
    clients = [await env.connect(lp.forward_ports[0]) for _ in range(5)]
    for c in clients:
        assert await echoes(c, b"x")
    assert mux.server_sockets.n == 5
    failed = await env.connect(lp.forward_ports[1])
    assert was_reset(await within(failed.lost.wait(), 10, "the failed connect's reset"))
    for c in clients:
        c.transport.loseConnection()
    await until(lambda: mux.server_sockets.n == 0, 10, "every server socket to close")
    await lp.stop()
    await until(lambda: mux.sessions.pipes_open == 0, 5, "the session's end")
