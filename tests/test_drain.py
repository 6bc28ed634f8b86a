"""Graceful drain on stop (SIGTERM under twistd), with real sockets: a
download in progress completes, new connections are refused meanwhile, and
what outlasts --drain-timeout is reset."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer

from tests.support import servers
from tests.support.env import Env
from tests.support.pattern import Pattern
from tests.support.waiting import until, within

MiB = 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_stopping_the_rp_lets_a_download_in_progress_finish(env: Env) -> None:
    size = 8 * MiB
    rp, lp, client, src = await env.download_in_progress(size)
    stopping = defer.maybeDeferred(rp.service.stopService)
    rp.stopped = True
    assert rp.session is not None and rp.session.draining and not stopping.called
    # A new connection meanwhile is refused (FIN 0x99 at once: the client is reset).
    late = await env.open(lp, "forward", src.port)
    await within(late.lost.wait(), 5, "the late connection to be refused")
    assert late.received == 0 and rp.stats.ended_by.get("draining") == 1
    client.transport.resumeProducing()
    await until(lambda: client.received == size, 20, "the download to finish")
    assert client.data == Pattern(5).bytes(size)
    client.transport.loseConnection()  # done: the client closes, as an HTTP client would
    await within(stopping, 5, "the RP to stop once its connections are over")
    assert "drained: every connection finished" in env.logged()


@pytest_twisted.ensureDeferred
async def test_stopping_the_lp_lets_a_download_finish_and_takes_no_new_client(env: Env) -> None:
    size = 8 * MiB
    src = await env.server(servers.source(env.reactor, size, seed=6))
    rp = await env.rp(2)
    lp = await env.lp(rp.port, 2, [src.port], extra=["--drain-timeout", "20"])
    port = lp.port("forward")
    client = await env.open(lp, "forward", src.port)
    client.transport.pauseProducing()
    await until(lambda: lp.stats.bytes_from_pipes > 0, 5, "the download to start")
    stopping = defer.maybeDeferred(lp.service.stopService)
    lp.stopped = True
    await until(lambda: lp.service.listeners[0].port is None or not lp.service.listeners[0].running, 5, "no listener")
    from twisted.internet.error import ConnectionRefusedError

    from tests.support.clients import Client

    refused = Client()
    try:
        await env.connect(port, refused)
        raise AssertionError("the stopping LP still took a client")
    except ConnectionRefusedError:
        pass
    client.transport.resumeProducing()
    await until(lambda: client.received == size, 20, "the download to finish")
    assert client.data == Pattern(6).bytes(size)
    client.transport.loseConnection()
    await within(stopping, 5, "the LP to stop once its connections are over")


@pytest_twisted.ensureDeferred
async def test_a_connection_outlasting_the_drain_is_reset(env: Env) -> None:
    srv = await env.server(servers.echo(env.reactor))
    rp = await env.rp(1, "--drain-timeout", "1")
    lp = await env.lp(rp.port, 1, [srv.port])
    client = await env.open(lp, "forward", srv.port)
    client.write(b"hello")
    await until(lambda: client.received == 5, 5, "the echo")
    stopping = defer.maybeDeferred(rp.service.stopService)
    rp.stopped = True
    await within(stopping, 5, "the drain to time out")
    await within(client.lost.wait(), 5, "the client to be reset")
    assert "drain timeout after 1 s: resetting 1 connection still open" in env.logged()


@pytest_twisted.ensureDeferred
async def test_a_stopping_lp_closes_its_pipes_cleanly(env: Env) -> None:
    """A proxy that stops closes its pipes with a FIN: the peer logs a clean
    close, not a connection "lost in a non-clean fashion" (a reset)."""
    rp = await env.rp(2)
    lp = await env.lp(rp.port, 2)
    await until(lambda: rp.session is not None, 5, "the RP's session")
    await lp.stop()
    await until(lambda: rp.session is None, 5, "the RP's session to end")
    (line,) = [line for line in env.logged().splitlines() if "session 1 lost" in line and "closed" in line]
    assert line.endswith("closed: Connection was closed cleanly."), line
