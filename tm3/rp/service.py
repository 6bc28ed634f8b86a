"""The remote proxy as a service: a :class:`PipeFactory` that gathers
accepted pipes into complete sets, and the :class:`Multiplexer` that runs a
session over each set, spawning a :class:`~tm3.rp.role.ServerConnection`
for every connection the LP opens. The service never stops because an LP
went away: a lost pipe ends the session, and the next complete set starts
another.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from tm3.core.destinations import DestinationPolicy
from tm3.mux.pipes import PipeGathering, PipeProtocol
from tm3.mux.session import Session
from tm3.mux.sessions import Sessions
from tm3.mux.settings import Settings
from tm3.reactor import IProxyReactor
from tm3.rp.role import RemoteRole

PENDING_TIMEOUT = 30.0


class Multiplexer(Service):
    """Runs the RP's sessions (one at a time in protocol v1)."""

    log = Logger()

    def __init__(
        self, reactor: IProxyReactor, settings: Settings, destinations: DestinationPolicy | None = None
    ) -> None:
        self.settings = settings
        self.destinations = destinations if destinations is not None else DestinationPolicy()
        role = functools.partial(RemoteRole, destinations=self.destinations)
        self.sessions = Sessions(reactor, settings, role, on_up=self._up)
        self.stats = self.sessions.stats

    @property
    def session(self) -> Session | None:
        return self.sessions.current

    def start_session(self, pipes: list[PipeProtocol]) -> Session:
        return self.sessions.start(pipes)

    def _up(self, session: Session) -> None:
        pipes = session.pipes.pipes
        self.log.info(
            "{session} up: {n} pipes from {peers}",
            session=session.name,
            n=len(pipes),
            peers=", ".join(p.name for p in pipes),
        )

    def stopService(self) -> Any:
        self.sessions.end("service stopping")
        return super().stopService()


def is_local_address(host: str) -> bool:
    """Whether ``host`` is one of this host's addresses: only those can be
    bound (EADDRNOTAVAIL otherwise)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


class PipeFactory(Factory):
    """Accepts pipes into a pending set of ``n``; each complete set goes to
    ``on_complete``, which owns the pipes from then on. A set still
    incomplete after ``pending_timeout`` seconds is closed."""

    noisy = False

    def __init__(
        self,
        pipes: int,
        reactor: IReactorTime,
        on_complete: Callable[[list[PipeProtocol]], object],
        pending_timeout: float = PENDING_TIMEOUT,
    ) -> None:
        self.n = pipes
        self.pending = PipeGathering(pipes, reactor, on_complete, timeout=pending_timeout)

    def buildProtocol(self, addr: Any) -> PipeProtocol:
        return self.pending.buildProtocol(addr)

    def stop(self) -> None:
        self.pending.close()
