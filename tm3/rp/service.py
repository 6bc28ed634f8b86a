"""The remote proxy as a service: a :class:`PipeFactory` that gathers
accepted pipes into complete sets, and the :class:`Multiplexer` that runs a
session over each set, spawning a :class:`~tm3.rp.role.ServerConnection`
for every connection the LP opens. The service never stops because an LP
went away: a lost pipe ends the session, and the next complete set starts
another.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
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
DEFAULT_MAX_PENDING = 256


class Multiplexer(Service):
    """Runs the RP's sessions: one per LP address, side by side."""

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

    def start_session(self, pipes: list[PipeProtocol], source: str = "") -> Session:
        """A session over a complete set from ``source``, replacing the one
        from the same address if there is one."""
        return self.sessions.start(pipes, source)

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
    """Accepts pipes into pending sets of ``n``, one per source address, so a
    set never mixes sockets from two addresses; each complete set goes to
    ``on_complete`` with its address, and owns the pipes from then on.

    Bounds: ``allow_from`` (when given) is the only networks pipes are taken
    from; at most ``max_pending`` pipes wait in all sets together; a set still
    incomplete ``pending_timeout`` seconds after its first pipe is closed;
    each pending pipe keeps at most a small multiple of 64 KiB of early bytes
    (tm3/mux/pipes.py). What is refused is closed at accept and logged.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        pipes: int,
        reactor: IProxyReactor,
        on_complete: Callable[[list[PipeProtocol], str], object],
        pending_timeout: float = PENDING_TIMEOUT,
        allow_from: Sequence[ipaddress.IPv4Network] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        self.n = pipes
        self.reactor = reactor
        self.on_complete = on_complete
        self.pending_timeout = pending_timeout
        self.allow_from = tuple(allow_from)
        self.max_pending = max_pending
        self.groups: dict[str, PipeGathering] = {}

    @property
    def pending(self) -> list[PipeProtocol]:
        return [pipe for group in self.groups.values() for pipe in group.pipes]

    def buildProtocol(self, addr: Any) -> PipeProtocol | None:
        host = str(getattr(addr, "host", ""))
        if self.allow_from and not _within(host, self.allow_from):
            self.log.info("pipe from {host} refused: not in --allow-from", host=host)
            return None
        for key in [k for k, g in self.groups.items() if not g.pipes]:
            del self.groups[key]
        if sum(len(g) for g in self.groups.values()) >= self.max_pending:
            self.log.warn(
                "pipe from {host} refused: {n} pipes already wait for their sets (--max-pending-pipes)",
                host=host,
                n=self.max_pending,
            )
            return None
        group = self.groups.get(host)
        if group is None:
            group = self.groups[host] = PipeGathering(
                self.n, self.reactor, lambda pipes: self.on_complete(pipes, host), timeout=self.pending_timeout
            )
        pipe = group.buildProtocol(addr)
        pipe.factory = self
        return pipe

    def stop(self) -> None:
        for group in self.groups.values():
            group.close()
        self.groups.clear()


def _within(host: str, networks: Sequence[ipaddress.IPv4Network]) -> bool:
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return any(address in net for net in networks)
