"""The local proxy as a service: a pipe dialer, the current session, and the
listeners that intercept application connections.

Listeners accept only while a session is up: in between, the listening
sockets stop reading and clients wait in the kernel's backlog. SOCKS
listeners are the exception: they always accept, so that a client can be
answered (its request waits for the session within ``--socks-timeout``, then
gets a failure reply). A lost pipe ends the session, resetting every
connection it carried, and the dialer starts again.
"""

from __future__ import annotations

import socket
from typing import Any, cast

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger, LogLevel

from tm3.cli import cannot_start, os_reason
from tm3.core.addresses import ipv4_literal
from tm3.core.ids import IdsExhausted
from tm3.fdlimit import LOW_CEILING, FdCeiling, soft_limit, start_ceiling
from tm3.listening import ListeningService
from tm3.logs import plural
from tm3.lp.clients import NoRoute
from tm3.lp.dialer import PipeDialer
from tm3.lp.resolver import Resolver, make_resolver
from tm3.lp.role import LocalRole
from tm3.mux.connection import Connection
from tm3.mux.pipes import PENDING_TIMEOUT, PipeProtocol
from tm3.mux.session import Session
from tm3.mux.sessions import Sessions
from tm3.mux.settings import Settings, Terms
from tm3.reactor import IProxyReactor

# A session that lasted this long resets the redial backoff.
STABLE_SESSION = 10.0
# A set lost this soon, having carried nothing, was probably closed by an RP
# that expects another --pipes: it takes a silent v1 pipe for v1 after 1 s
# (docs/protocol.md), then at once completes, replaces or refuses sets.
QUICK_LOSS = 2.5


class LocalProxy(MultiService):
    """The LP service: a pipe dialer, the current session, and listeners."""

    log = Logger()

    def __init__(
        self,
        reactor: IProxyReactor,
        endpoint: IStreamClientEndpoint,
        pipes: int,
        settings: Settings,
        remote: str = "the RP",
        key: bytes | None = None,
        handshake_timeout: float = 10.0,
        resolver: Resolver | None = None,
    ) -> None:
        super().__init__()
        self.setName("tm3lp")
        self.reactor = reactor
        self.sessions = Sessions(reactor, settings, LocalRole, on_up=self._up, on_down=self._down)
        self.stats = self.sessions.stats
        self.listeners: list[ListeningService] = []
        self.remote = remote
        # SOCKS names: --resolver dns unless the caller chose.
        self.resolver = resolver if resolver is not None else make_resolver(reactor)
        self.dialer = PipeDialer(
            reactor,
            endpoint,
            pipes,
            self._pipes_up,
            remote,
            key=key,
            window=settings.initial_window,
            handshake_timeout=handshake_timeout,
        )
        self._session_started = 0.0
        self._opened_before = 0
        self._session_waiters: list[Deferred[Session]] = []
        self._addresses: dict[ListeningService, str] = {}
        self._always_accept: set[ListeningService] = set()
        self._session_accepting = False
        # Client sockets open (SOCKS handshakes included), and their ceiling
        # under RLIMIT_NOFILE, set once listening (tm3/fdlimit.py).
        self.clients = 0
        self.fd_ceiling: FdCeiling | None = None

    @property
    def session(self) -> Session | None:
        return self.sessions.current

    def open(self, host: str, port: int) -> tuple[Session, Connection]:
        """Open a connection to ``host:port`` in the current session (the SYN
        goes out); raises :class:`~tm3.lp.clients.NoRoute` when it cannot."""
        session = self.sessions.current
        if session is None:
            raise NoRoute("no pipe session to the RP")
        if session.draining:
            raise NoRoute("the LP is stopping")
        limit = session.settings.max_connections
        if limit and len(session.live) >= limit:
            self.stats.connections_refused += 1
            raise NoRoute(f"{len(session.live)} connections open, --max-connections {limit}")
        try:
            return session, cast(LocalRole, session.role).open(host, port)
        except (IdsExhausted, ValueError) as e:
            raise NoRoute(str(e)) from None

    def add_listener(
        self,
        endpoint: IStreamServerEndpoint,
        factory: Factory,
        description: str,
        address: str | None = None,
        always_accept: bool = False,
    ) -> ListeningService:
        """Listen on ``endpoint`` (``address``: its string, for messages);
        ``always_accept``: also while no session is up."""
        listener = ListeningService(endpoint, factory, description)
        listener.setServiceParent(self)
        self.listeners.append(listener)
        self._addresses[listener] = address or description
        if always_accept:
            self._always_accept.add(listener)
        return listener

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as e:
            # Children start in order: the first listener without a port failed.
            failed = next((li for li in self.listeners if li.port is None), None)
            where = f"{self._addresses[failed]} ({failed.description})" if failed is not None else str(e.port)
            cannot_start("tm3lp", f"cannot listen on {where}: {os_reason(e.socketError)}")
        # Room for two sets of pipes: a new set may dial while the old closes.
        self.fd_ceiling, limits = start_ceiling(self.sessions.settings.fd_reserve, 2 * self.dialer.n)
        self.log.emit(
            LogLevel.warn if self.fd_ceiling.ceiling < LOW_CEILING else LogLevel.info,
            "room for {ceiling} client sockets ({limits})",
            ceiling=self.fd_ceiling.ceiling,
            limits=limits,
        )
        self._set_accepting(False)
        self.resolver.start()
        self.dialer.start()

    def stopService(self) -> Any:
        """Stop listening (no new clients), let the open connections finish
        for up to --drain-timeout, then end the session."""
        self.running = False  # before ending the session: no reconnect now
        self.dialer.stop()
        self.resolver.stop()  # lookups under way still answer their clients
        listeners = super().stopService()
        drained = self.sessions.drain(self.sessions.settings.drain_timeout)
        return gatherResults([listeners, drained])

    def resolve(self, name: str) -> Deferred[str]:
        """``name``'s IPv4 address from :attr:`resolver`. A DNS lookup holds a
        UDP socket while it is under way, even once its clients gave up:
        lookups count against the client sockets' ceiling, checked again
        when each ends (``Resolver.on_settled``)."""
        self.resolver.on_settled = self._check_fds
        d = self.resolver.resolve(name)
        self._check_fds()
        return d

    def client_opened(self) -> None:
        self.clients += 1
        self._check_fds()

    def client_closed(self) -> None:
        self.clients -= 1
        self._check_fds()

    def _check_fds(self) -> None:
        if self.fd_ceiling is None:
            return
        change = self.fd_ceiling.update(self.clients + len(self.resolver.in_flight))
        if change == "full":
            self.stats.fd_limit_pauses += 1
            self.log.warn(
                "{n} client sockets open, at the ceiling for RLIMIT_NOFILE {limit}: not accepting new clients "
                "(they wait in the listen backlog) until some close",
                n=self.clients,
                limit=soft_limit(),
            )
        elif change == "room":
            self.log.info("{n} client sockets open: accepting clients again", n=self.clients)
        if change is not None:
            self._set_accepting(self._session_accepting)

    def _set_accepting(self, on: bool) -> None:
        """Listen while a session is up (``on``), and the always-accepting
        listeners always; none while the client sockets are at their ceiling."""
        self._session_accepting = on
        full = self.fd_ceiling is not None and self.fd_ceiling.full
        for listener in self.listeners:
            port = listener.port
            accept = not full and (on or listener in self._always_accept)
            # A listening socket that stops reading stops accepting; clients
            # wait in the kernel backlog until the pipes are up.
            method = getattr(port, "startReading" if accept else "stopReading", None)
            if method is not None:
                method()

    def _pipes_up(self, pipes: list[PipeProtocol], terms: Terms) -> None:
        self._session_started = self.reactor.seconds()
        self._opened_before = self.stats.connections_opened
        self.sessions.start(pipes, terms=terms)

    def _up(self, session: Session) -> None:
        self.log.info(
            "{session} up (v{version}): {pipes} to the RP at {remote}",
            pipes=plural(len(session.pipes.pipes), "pipe"),
            session=session.name,
            version=session.terms.version,
            n=len(session.pipes.pipes),
            remote=self.remote,
        )
        self._set_accepting(True)
        waiters, self._session_waiters = self._session_waiters, []
        for d in waiters:
            d.callback(session)

    def _down(self, session: Session, why: str) -> None:
        self._set_accepting(False)
        if not self.running:
            return
        lasted = self.reactor.seconds() - self._session_started
        carried = self.stats.connections_opened > self._opened_before
        delay = self.dialer.next_delay(carried or lasted >= STABLE_SESSION)
        hint = ""
        if lasted < QUICK_LOSS and not carried:
            hint = f" (it lasted {lasted:.2f} s: does the RP expect --pipes {self.dialer.n}?)"
        elif self._rp_gave_up_on(session, lasted):
            hint = (
                f" (it lasted {lasted:.0f} s and a pipe never received a byte: an RP closes a set it has not"
                f" completed after {PENDING_TIMEOUT:.0f} s; does it expect --pipes {self.dialer.n}?)"
            )
        self.log.warn(
            "pipes to the RP lost ({why}){hint}; reconnecting in {delay:.1f} s", why=why, hint=hint, delay=delay
        )
        self.dialer.start(delay=delay)

    @staticmethod
    def _rp_gave_up_on(session: Session, lasted: float) -> bool:
        """Whether a v1 set looks closed by the RP's pending timeout: v1 pipes
        do not say how many they are, so an RP that expects more pipes than
        we opened waits for the rest, acting on nothing, and closes them
        after PENDING_TIMEOUT; one that expects fewer takes a set from ours
        and leaves the rest pending."""
        return (
            session.terms.version == 1
            and PENDING_TIMEOUT - 1 <= lasted <= PENDING_TIMEOUT + 5
            and any(p.bytes_received == 0 for p in session.pipes.pipes)
        )

    def when_session(self) -> Deferred[Session]:
        """Fires with the session once all pipes are up (at once if they are);
        cancelling it forgets the waiter."""

        def forget(d: Deferred[Session]) -> None:
            if d in self._session_waiters:
                self._session_waiters.remove(d)

        d: Deferred[Session] = Deferred(forget)
        if self.sessions.current is not None:
            d.callback(self.sessions.current)
        else:
            self._session_waiters.append(d)
        return d


def resolve_ipv4(host: str) -> str:
    """An IPv4 literal, or the first IPv4 address of a name (blocking: used at
    start-up only). Raises ``OSError``, or ``NotIPv4`` for a malformed literal."""
    literal = ipv4_literal(host)
    if literal is not None:
        return literal
    infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"{host} has no IPv4 address")
    return str(infos[0][4][0])
