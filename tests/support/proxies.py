"""Handles on our proxies running in the test's own reactor: :class:`RP` and
:class:`LP`, each a started ``makeService`` service with the ports it listens
on, its session and its statistics. :class:`tests.support.env.Env` builds
them exactly as ``twistd`` does and stops them at teardown."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer

from tests.support.waiting import within


class RP:
    """An in-process RP service (``tm3.rp.tap.makeService``) and its port."""

    def __init__(self, service: Any, port: int) -> None:
        self.service = service
        self.port = port
        self.stopped = False

    @property
    def stats(self) -> Any:
        return self.service.multiplexer.stats

    @property
    def session(self) -> Any:
        return self.service.multiplexer.session

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await within(defer.maybeDeferred(self.service.stopService), 10, "the RP to stop")


class LP:
    """An in-process LP service (``tm3.lp.tap.makeService``) and the ports it listens on."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.stopped = False
        self.socks_port = 0
        self.forward_ports: list[int] = []

    @property
    def stats(self) -> Any:
        return self.service.stats

    @property
    def session(self) -> Any:
        return self.service.session

    def port(self, mode: str, index: int = 0) -> int:
        return self.socks_port if mode == "socks" else self.forward_ports[index]

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await within(defer.maybeDeferred(self.service.stopService), 10, "the LP to stop")
