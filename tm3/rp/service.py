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
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorSocket
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.logger import Logger, LogLevel

from tm3.core.credit import DEFAULT_INITIAL_WINDOW
from tm3.core.destinations import DestinationPolicy
from tm3.core.handshake import Hello
from tm3.fdlimit import LOW_CEILING, FdCeiling, SocketCount, start_ceiling
from tm3.logs import plural
from tm3.mux.flow import abort_transport
from tm3.mux.pipes import PENDING_TIMEOUT, PipeGathering, PipeProtocol
from tm3.mux.session import Session
from tm3.mux.sessions import Sessions
from tm3.mux.settings import V1, Settings, Terms
from tm3.reactor import IProxyReactor
from tm3.rp.admission import HANDSHAKE_TIMEOUT, HELLO_WAIT, Admission
from tm3.rp.role import RemoteRole
from tm3.rp.routing import QUIET

DEFAULT_MAX_PENDING = 256
DEFAULT_MAX_PER_ADDRESS = 64


class Multiplexer(Service):
    """Runs the RP's sessions: one per LP address, side by side."""

    log = Logger()

    def __init__(
        self, reactor: IProxyReactor, settings: Settings, destinations: DestinationPolicy | None = None
    ) -> None:
        self.settings = settings
        self.destinations = destinations if destinations is not None else DestinationPolicy()
        self.server_sockets = SocketCount()
        role = functools.partial(
            RemoteRole, destinations=self.destinations, has_fd_room=self.has_fd_room, sockets=self.server_sockets
        )
        self.sessions = Sessions(reactor, settings, role, on_up=self._up)
        self.stats = self.sessions.stats
        self.fd_ceiling: FdCeiling | None = None  # set by watch_fds once listening

    @property
    def session(self) -> Session | None:
        return self.sessions.current

    def start_session(self, pipes: list[PipeProtocol], key: str = "", terms: Terms = V1) -> Session:
        """A session over a complete set: v1 from the address ``key``,
        replacing the one from the same address if there is one; v2 with the
        session id in ``key``."""
        return self.sessions.start(pipes, key, terms)

    def is_live(self, key: str) -> bool:
        return key in self.sessions.by_key

    def watch_fds(self, pending_pipes: int) -> None:
        """Keep server sockets under a ceiling that leaves room, within
        RLIMIT_NOFILE, for what is open now, ``pending_pipes`` pipes waiting
        for their sets and --fd-reserve (tm3/fdlimit.py); the sessions' own
        pipes are counted as they come."""
        self.fd_ceiling, limits = start_ceiling(self.settings.fd_reserve, pending_pipes)
        self.log.emit(
            LogLevel.warn if self.fd_ceiling.ceiling < LOW_CEILING else LogLevel.info,
            "room for {ceiling} server sockets and pipes ({limits})",
            ceiling=self.fd_ceiling.ceiling,
            limits=limits,
        )

    def has_fd_room(self) -> bool:
        """Whether one more server socket fits under the ceiling, beside the
        server sockets open (connecting, connected, or over but still
        writing their last bytes) and the sessions' pipes."""
        ceiling = self.fd_ceiling
        return ceiling is None or ceiling.has_room(self.server_sockets.n + self.sessions.pipes_open)

    def _up(self, session: Session) -> None:
        pipes = session.pipes.pipes
        self.log.info(
            "{session} up (v{version}): {pipes} from {peers}",
            pipes=plural(len(pipes), "pipe"),
            session=session.name,
            version=session.terms.version,
            n=len(pipes),
            peers=", ".join(p.name for p in pipes),
        )

    def stopService(self) -> Any:
        """Refuse new connections (FIN 0x99 to every SYN), let the open ones
        finish for up to --drain-timeout, then end the sessions."""
        super().stopService()
        return self.sessions.drain(self.settings.drain_timeout)


def is_local_address(host: str) -> bool:
    """Whether ``host`` is one of this host's addresses: only those can be
    bound (EADDRNOTAVAIL otherwise)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


class Refused(Protocol):
    """A pipe refused at accept: closed at once. (Not ``None`` from
    buildProtocol: Twisted's TLS wrapper would wrap nothing and fail.)"""

    def connectionMade(self) -> None:
        abort_transport(self.transport)


class PipeFactory(Factory):
    """Accepts pipes, greets them (:class:`~tm3.rp.admission.Admission`: which
    version, and the v2 handshake), and gathers them into pending sets: v1
    pipes by source address, so a set never mixes sockets from two addresses;
    v2 pipes by the session id their handshake proved, each set as large as
    its LP said. Each complete set goes to ``on_complete`` with its key and
    terms, and owns the pipes from then on.

    Bounds: ``allow_from`` (when given) is the only networks pipes are taken
    from; at most ``max_pending`` pipes greet or wait in all sets together,
    and at most ``max_per_address`` of them from one address (so one address
    cannot hold every slot while others' sets wait); a
    set still incomplete ``pending_timeout`` seconds after its first pipe is
    closed; each pending pipe keeps at most a small multiple of 64 KiB of
    early bytes (tm3/mux/pipes.py). What is refused is closed and logged.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        pipes: int,
        reactor: IProxyReactor,
        on_complete: Callable[[list[PipeProtocol], str, Terms], object],
        pending_timeout: float = PENDING_TIMEOUT,
        allow_from: Sequence[ipaddress.IPv4Network] = (),
        max_pending: int = DEFAULT_MAX_PENDING,
        max_per_address: int = 0,
        key: bytes | None = None,
        allow_v1: bool = True,
        window: int = DEFAULT_INITIAL_WINDOW,
        is_live: Callable[[str], bool] = lambda key: False,
        hello_wait: float = HELLO_WAIT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.n = pipes
        self.reactor = reactor
        self.on_complete = on_complete
        self.pending_timeout = pending_timeout
        self.allow_from = tuple(allow_from)
        self.max_pending = max_pending
        self.max_per_address = max_per_address  # 0: no cap of its own
        self.is_live = is_live
        self.admission = Admission(reactor, self._v1, self._v2, key, window, allow_v1, hello_wait, handshake_timeout)
        self.groups: dict[str, PipeGathering] = {}  # v1: by source address; v2: by session key
        self._adopted: PipeProtocol | None = None  # the pipe adopt() made

    @property
    def pending(self) -> list[PipeProtocol]:
        return [pipe for group in self.groups.values() for pipe in group.pipes]

    def buildProtocol(self, addr: Any) -> PipeProtocol | Refused:
        host = str(getattr(addr, "host", ""))
        if self.allow_from and not within(host, self.allow_from):
            self.log.info("pipe from {host} refused: not in --allow-from", host=host)
            return Refused()
        for key in [k for k, g in self.groups.items() if not g.pipes]:
            del self.groups[key]
        if self.max_per_address and self._pending_from(host) >= self.max_per_address:
            self.log.warn(
                "pipe from {host} refused: {n} pipes from it already wait for their sets (--max-pending-per-address)",
                host=host,
                n=self.max_per_address,
            )
            return Refused()
        if len(self.admission) + sum(len(g) for g in self.groups.values()) >= self.max_pending:
            self.log.warn(
                "pipe from {host} refused: {n} pipes already wait for their sets (--max-pending-pipes)",
                host=host,
                n=self.max_pending,
            )
            return Refused()
        pipe = PipeProtocol(greeter=self.admission)
        pipe.factory = self
        self._adopted = pipe
        return pipe

    def _pending_from(self, host: str) -> int:
        """Pipes from ``host`` being greeted or waiting in a set."""
        greeting = sum(1 for pipe in self.admission.greeting if pipe.peer_host == host)
        return greeting + sum(1 for g in self.groups.values() for pipe in g.pipes if pipe.peer_host == host)

    def _v1(self, pipe: PipeProtocol, first: bytes) -> None:
        host = pipe.peer_host
        group = self.groups.get(host)
        if group is None:
            group = self.groups[host] = PipeGathering(
                self.n,
                self.reactor,
                lambda pipes: self.on_complete(pipes, host, V1),
                timeout=self.pending_timeout,
                # v1 pipes do not say how many they are.
                hint=f"does the LP at {host} run --pipes {self.n}, as this RP expects?",
            )
        pipe.join(group, first)

    def _v2(self, pipe: PipeProtocol, hello: Hello, rest: bytes) -> None:
        key = "v2 " + hello.session_id.hex()
        group = self.groups.get(key)
        why = ""
        if hello.n > self.max_pending:
            why = f"its set has {hello.n} pipes, more than --max-pending-pipes {self.max_pending} lets wait"
        elif self.max_per_address and hello.n > self.max_per_address:
            why = f"its set has {hello.n} pipes, more than --max-pending-per-address {self.max_per_address} lets wait"
        elif self.is_live(key):
            why = "its session is complete already"
        elif group is not None and group.n != hello.n:
            why = f"it says its set has {hello.n} pipes, and the set's first pipe said {group.n}"
        elif group is not None and any(p.index == hello.index for p in group.pipes):
            why = f"the set has a pipe #{hello.index} already"
        if why:
            self.log.warn("{pipe} refused: {why} (session {sid})", pipe=pipe.name, why=why, sid=hello.session_id.hex())
            pipe.abort()
            return
        if group is None:
            terms = Terms(version=2, peer_window=hello.window)
            group = self.groups[key] = PipeGathering(
                hello.n,
                self.reactor,
                lambda pipes: self.on_complete(sorted(pipes, key=lambda p: p.index), key, terms),
                timeout=self.pending_timeout,
            )
        pipe.index = hello.index
        pipe.join(group, rest)

    def adopt(self, reactor: IReactorSocket, fd: int, family: int, verdict: str) -> PipeProtocol | None:
        """Take a pipe that a ``--workers`` front accepted and routed here
        (tm3/rp/worker.py): the connected socket ``fd`` (the caller closes
        its copy), and what the front learned of it (tm3/rp/routing.py). Its
        bytes are all still in the socket: the front only peeked. Returns
        the pipe, or ``None`` if it was refused."""
        self._adopted = None
        reactor.adoptStreamConnection(fd, socket.AddressFamily(family), cast(ServerFactory, self))
        pipe, self._adopted = self._adopted, None
        if pipe is not None and verdict == QUIET:
            self.admission.waited_out(pipe)
        return pipe

    def stop(self) -> None:
        self.admission.close()
        for group in self.groups.values():
            group.close()
        self.groups.clear()


def within(host: str, networks: Sequence[ipaddress.IPv4Network]) -> bool:
    """Whether ``host`` (an address) is in one of ``networks`` (``--allow-from``)."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return any(address in net for net in networks)
