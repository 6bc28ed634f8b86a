"""The current session of a proxy, for both roles.

A complete pipe set starts a session; a newer complete set replaces the one
that is up (docs/protocol.md, "Pipes and sessions": an LP that restarted may
come back before the RP notices the old pipes are dead). The owner is told
when a session comes up and when it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tm3.mux.pipes import PipeProtocol
from tm3.mux.role import IRole
from tm3.mux.session import Session
from tm3.mux.settings import Settings, Stats
from tm3.reactor import IProxyReactor


class Sessions:
    def __init__(
        self,
        reactor: IProxyReactor,
        settings: Settings,
        role: Callable[[Session], IRole],
        on_up: Callable[[Session], object] | None = None,
        on_down: Callable[[Session, str], object] | None = None,
    ) -> None:
        self.reactor = reactor
        self.settings = settings
        self.role = role
        self.stats = Stats()
        self.current: Session | None = None
        self.on_up = on_up
        self.on_down = on_down
        self._count = 0

    def start(self, pipes: Sequence[PipeProtocol]) -> Session:
        """A session over ``pipes``, replacing the current one."""
        if self.current is not None:
            self.current.end("replaced by a newer complete pipe set")
        self._count += 1
        # Bytes that came before the set was complete are replayed as the
        # session starts, and a protocol error among them ends it at once:
        # it is then reported down without having been up.
        session = Session(
            pipes, self.reactor, self.settings, self.stats, self.role, on_end=self._ended, name=f"session {self._count}"
        )
        if not session.ended:
            self.current = session
            if self.on_up is not None:
                self.on_up(session)
        return session

    def _ended(self, session: Session, why: str) -> None:
        if self.current is session or self.current is None:
            self.current = None
            if self.on_down is not None:
                self.on_down(session, why)

    def end(self, why: str) -> None:
        if self.current is not None:
            self.current.end(why)
