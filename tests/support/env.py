"""The ``env`` of the loopback tests: :class:`Env` owns everything a test
starts in the reactor and, at teardown, stops it all and checks that nothing
leaked.

It builds our proxies in-process exactly as ``twistd`` does
(``makeService(Options().parseOptions([...]))`` on ``tcp:0:interface=127.0.0.1``
ports): :meth:`Env.rp`, :meth:`Env.lp`, :meth:`Env.system`. It drives them
with the protocol-level test LP (:meth:`Env.lp_client`) or with socket
clients through our LP (:meth:`Env.connect`, :meth:`Env.open`,
:meth:`Env.echo_round_trip`), against the servers of
:mod:`tests.support.servers` (:meth:`Env.server`) and child processes
(:meth:`Env.spawn`).

:meth:`Env.close` stops every piece (each step runs even if an earlier one
failed), then fails the test if a socket is left in the reactor, a delayed
call is left pending, a failure was logged, or the test LP saw the RP break
the protocol. ``tests/conftest.py`` hands an ``Env`` to every test that takes
``env``.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import formatEvent, globalLogPublisher

from tests.support import servers
from tests.support.clients import REP_SUCCEEDED, Client, socks_ipv4
from tests.support.lpclient import LPClient
from tests.support.ports import HOST, refusing_socket
from tests.support.processes import Proc, spawn
from tests.support.proxies import LP, RP
from tests.support.servers import TestServer, was_reset
from tests.support.waiting import reactor, until, within
from tm3.lp import tap as lp_tap
from tm3.rp import tap as rp_tap


class Env:
    """Everything a test starts; :meth:`close` stops it and checks for leaks."""

    def __init__(self) -> None:
        self.reactor = reactor()
        self.rps: list[RP] = []
        self.lps: list[LP] = []
        self.lp_clients: list[LPClient] = []
        self.servers: list[TestServer] = []
        self.ports: list[Any] = []  # other listening ports (test server, web)
        self.clients: list[Client] = []
        self.procs: list[Proc] = []
        self.holds: list[socket.socket] = []
        self.held_ports: dict[int, socket.socket] = {}
        self.log: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.log.append)
        self.fds = set(self.reactor.getReaders()) | set(self.reactor.getWriters())
        self.calls = {c for c in self.reactor.getDelayedCalls() if c.active()}

    # -- our proxies ----------------------------------------------------------------------

    async def rp(self, pipes: int = 1, *extra: str, port: int = 0, allow_loopback: bool = True) -> RP:
        """An RP for ``pipes`` pipes listening on ``port`` (0: any), with the
        ``extra`` options; a port :meth:`hold_port` holds is released first.
        The test servers listen on loopback, which an RP refuses by default:
        ``allow_loopback`` allows it (``--allow-to 127.0.0.0/8``)."""
        held = self.held_ports.pop(port, None)
        if held is not None:
            held.close()
        config = rp_tap.Options()
        allow = ["--allow-to", "127.0.0.0/8"] if allow_loopback else []
        # No drain on stop unless a test asks (teardown would wait for open clients).
        config.parseOptions(
            ["--pipes", str(pipes), "--listen", f"tcp:{port}:interface={HOST}", "--drain-timeout", "0", *allow, *extra]
        )
        service = rp_tap.makeService(config, self.reactor)
        service.startService()
        listening = await within(service.when_listening(), 5, "the RP to listen")
        rp = RP(service, listening.getHost().port)
        self.rps.append(rp)
        return rp

    async def lp(
        self,
        rp_port: int,
        pipes: int,
        forward: Sequence[int] = (),
        wait: bool = True,
        extra: Sequence[str] = (),
        remote: str | None = None,
    ) -> LP:
        """An LP with a SOCKS5 listener and one forward listener per port in
        ``forward`` (to 127.0.0.1:port), with the ``extra`` options; ``remote``
        replaces ``127.0.0.1:rp_port`` (an endpoint string); ``wait``: until
        its session is up."""
        remote = f"{HOST}:{rp_port}" if remote is None else remote
        argv = ["--remote", remote, "--pipes", str(pipes), "--socks", f"tcp:0:interface={HOST}", "--drain-timeout", "0"]
        argv += extra
        for port in forward:
            argv += ["--forward", f"tcp:0:interface={HOST}:{HOST}:{port}"]
        config = lp_tap.Options()
        config.parseOptions(argv)
        service = lp_tap.makeService(config, self.reactor)
        lp = LP(service)
        self.lps.append(lp)
        service.startService()
        ports = [(await within(li.when_listening(), 5, "the LP to listen")).getHost().port for li in service.listeners]
        lp.socks_port, lp.forward_ports = ports[0], ports[1:]
        if wait:
            await within(service.when_session(), 10, "the LP's pipes to come up")
        return lp

    async def system(self, pipes: int, forward: Sequence[int] = ()) -> tuple[RP, LP]:
        rp = await self.rp(pipes)
        lp = await self.lp(rp.port, pipes, forward)
        return rp, lp

    def hold_port(self, port: int) -> socket.socket:
        """Keep a stopped RP's port bound but not listening: dials to it are
        refused, and nothing else (say, the next listener on tcp:0) can take
        it until :meth:`rp` reopens it."""
        # The old RP's connections may sit in TIME_WAIT on this port.
        held = refusing_socket(port, reuse_addr=True)
        self.held_ports[port] = held
        return held

    # -- what drives them -------------------------------------------------------------------

    async def lp_client(self, port: int, pipes: int = 1, **kw: Any) -> LPClient:
        """The protocol-level test LP, its ``pipes`` pipes connected to the RP at ``port``."""
        lp = LPClient(self.reactor, port, pipes, **kw)
        self.lp_clients.append(lp)
        await within(lp.connect(), 5, "the test LP's pipes to connect")
        return lp

    async def connect(self, port: int, client: Client | None = None, timeout: float = 10) -> Client:
        client = Client() if client is None else client
        self.clients.append(client)
        endpoint = TCP4ClientEndpoint(self.reactor, HOST, port, timeout=timeout)
        await within(connectProtocol(endpoint, client), timeout, f"a connection to port {port}")
        return client

    async def open(self, lp: LP, mode: str, target: int, client: Client | None = None, index: int = 0) -> Client:
        """A client to 127.0.0.1:``target`` through the LP: through its
        forward listener ``index`` (which must go to ``target``) or SOCKS5;
        for SOCKS5, returns once the success reply is in."""
        client = Client() if client is None else client
        if mode == "socks":
            client.use_socks(socks_ipv4(HOST, target))
        await self.connect(lp.port(mode, index), client)
        if mode == "socks":
            rep = await within(client.socks_reply.wait(), 10, "the SOCKS reply")
            assert client.socks_method == b"\x05\x00"
            assert rep == REP_SUCCEEDED, f"SOCKS reply {rep!r}"
        return client

    async def download_in_progress(self, size: int, drain_timeout: float = 20) -> tuple[RP, LP, Client, TestServer]:
        """An RP (``--drain-timeout``) and an LP with 2 pipes, and a client in
        the middle of downloading ``size`` pattern bytes (it reads nothing
        yet: the download is in progress, not done); and the source."""
        src = await self.server(servers.source(self.reactor, size, seed=5))
        rp = await self.rp(2, "--drain-timeout", f"{drain_timeout:g}")
        lp = await self.lp(rp.port, 2, [src.port])
        client = await self.open(lp, "forward", src.port)
        client.transport.pauseProducing()
        await until(lambda: rp.stats.bytes_to_pipes > 0, 5, "the download to start")
        return rp, lp, client, src

    async def echo_round_trip(self, lp: LP, mode: str, port: int, data: bytes, index: int = 0) -> Client:
        """Send ``data`` to the echo server at ``port`` through the LP, half-close,
        and check that exactly ``data`` comes back, then an orderly close."""
        client = await self.open(lp, mode, port, index=index)
        client.write(data)
        client.shutdown_write()
        reason = await within(client.lost.wait(), 20, "the echo to end")
        assert not was_reset(reason), reason
        assert client.received == len(data) and client.data == data
        return client

    # -- what they talk to ----------------------------------------------------------------

    async def server(self, server: TestServer) -> TestServer:
        self.servers.append(server)
        return await server.start()

    def closed_port(self) -> int:
        """A port on 127.0.0.1 that is bound but not listening: connects are refused."""
        s = refusing_socket()
        self.holds.append(s)
        return int(s.getsockname()[1])

    def spawn(self, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = spawn(argv, env)
        self.procs.append(proc)
        return proc

    # -- teardown ---------------------------------------------------------------------------

    def new_calls(self) -> list[Any]:
        return [c for c in self.reactor.getDelayedCalls() if c.active() and c not in self.calls]

    def logged(self) -> str:
        return "\n".join(str(formatEvent(e)) for e in self.log)

    async def close(self) -> None:
        """Stop everything (each step runs even if an earlier one failed),
        then check for leaks; report every problem."""
        globalLogPublisher.removeObserver(self.log.append)
        problems: list[BaseException] = []

        async def step(d: Any, seconds: float, what: str) -> None:
            try:
                await within(d, seconds, what)
            except BaseException as e:  # reported below, after the other steps
                problems.append(e)

        for client in self.clients:
            if not client.lost.fired and client.transport is not None:
                client.transport.abortConnection()
        for client in self.clients:
            if client.transport is not None or client.lost.fired:
                await step(client.lost.wait(), 5, "a client to close")
        for lp_client in self.lp_clients:
            await step(lp_client.close(), 5, "the test LP to close")
        for lp in self.lps:
            await step(lp.stop(), 15, "the LP to stop")
        for rp in self.rps:
            await step(rp.stop(), 15, "the RP to stop")
        for server in self.servers:
            await step(server.stop(), 5, "a server to stop")
        for port in self.ports:
            await step(defer.maybeDeferred(port.stopListening), 5, "a port to stop listening")
        for proc in self.procs:
            if not proc.ended.fired:
                proc.transport.signalProcess("KILL")
                await step(proc.ended.wait(), 10, "a child process to end")
        for s in [*self.holds, *self.held_ports.values()]:
            s.close()
        r = self.reactor
        # Not through step(): its own timeout would be a pending delayed call.
        try:
            await until(
                lambda: not (set(r.getReaders()) | set(r.getWriters())) - self.fds, 5, "every socket to be closed"
            )
            await until(lambda: not self.new_calls(), 5, "no delayed call left pending")
        except AssertionError as e:
            problems.append(AssertionError(f"{e}: {self.new_calls()}"))
        if problems:
            raise AssertionError("teardown: " + "; ".join(str(p) for p in problems))
        failures = [formatEvent(e) + "\n" + e["log_failure"].getTraceback() for e in self.log if "log_failure" in e]
        assert not failures, "failures were logged:\n" + "\n".join(failures)
        errors = [e for lp in self.lp_clients for e in lp.errors]
        assert not errors, f"the test LP saw protocol violations: {errors}"
