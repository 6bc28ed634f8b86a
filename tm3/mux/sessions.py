"""The sessions of a proxy, for both roles.

A complete pipe set starts a session under a key: the source address of its
pipes on the RP (one LP per address; LPs at other addresses have sessions of
their own, side by side), one key on the LP. A newer complete set replaces
the session with the same key only (docs/protocol.md, "Pipes and sessions":
an LP that restarted may come back before the RP notices the old pipes are
dead). The owner is told when a session comes up and when it ends.

When the proxy stops, :meth:`Sessions.drain` lets the open connections
finish (no new ones are taken) for up to ``--drain-timeout`` seconds, then
ends the sessions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tm3.mux.pipes import PipeProtocol
from tm3.mux.role import IRole
from tm3.mux.session import Session
from tm3.mux.settings import V1, Settings, Stats, Terms
from tm3.reactor import IProxyReactor

DRAIN_POLL = 0.1  # how often a drain checks whether every connection is over
# A v1 session replaced this soon by a set from the same address was most
# likely cut short by its own LP's extra pipes (a --pipes mismatch).
QUICK_REPLACEMENT = 2.0


class Sessions:
    log = Logger()

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
        self.by_key: dict[str, Session] = {}
        self._starting = False
        self.on_up = on_up
        self.on_down = on_down
        self._count = 0
        self.pipes_open = 0  # the pipes of the sessions in by_key (for the fd ceiling)

    @property
    def current(self) -> Session | None:
        """The newest session (the LP's only one)."""
        return next(reversed(self.by_key.values()), None)

    def start(self, pipes: Sequence[PipeProtocol], key: str = "", terms: Terms = V1) -> Session:
        """A session over ``pipes``, replacing the one with the same key."""
        old = self.by_key.get(key)
        if old is not None:
            why = "replaced by a newer complete pipe set" + (f" from {key}" if key else "")
            lasted = time.monotonic() - old.started
            if terms.version == 1 and key and lasted < QUICK_REPLACEMENT:
                # v1 pipes do not say how many they are: an LP that opens
                # more than n at once completes one set and starts the next.
                why += (
                    f" {lasted:.2f} s after it started: does the LP at {key} open more than --pipes {len(pipes)} pipes?"
                )
            old.end(why)
        self._count += 1
        self._starting = True
        try:
            session = Session(
                pipes,
                self.reactor,
                self.settings,
                self.stats,
                self.role,
                on_end=self._ended,
                name=f"session {self._count}",
                terms=terms,
            )
        finally:
            self._starting = False
        if not session.ended:
            self.by_key[key] = session
            self.pipes_open += len(pipes)
            if self.on_up is not None:
                self.on_up(session)
        return session

    def _ended(self, session: Session, why: str) -> None:
        for key, live in self.by_key.items():
            if live is session:
                del self.by_key[key]
                self.pipes_open -= len(session.pipes.pipes)
                break
        else:
            if not self._starting:
                return
            # Bytes that came before the set was complete are replayed as the
            # session starts, and a protocol error among them ends it at once:
            # it is reported down without having been up.
        if self.on_down is not None:
            self.on_down(session, why)

    def end(self, why: str, clean: bool = False) -> None:
        for session in list(self.by_key.values()):
            session.end(why, clean)

    def open_connections(self) -> int:
        return sum(len(session.live) for session in self.by_key.values())

    def drain(self, timeout: float, why: str = "service stopping") -> Deferred[None]:
        """Take no new connections; once every open one is over, or after
        ``timeout`` seconds, end every session (``why``), closing the pipes
        with a FIN (the peer sees a clean close, not a reset). Fires then."""
        for session in self.by_key.values():
            session.draining = True
        open_now = self.open_connections()
        if timeout <= 0 or open_now == 0:
            self.end(why, clean=True)
            return succeed(None)
        self.log.info(
            "draining: {n} connection{s} open; waiting up to {t:g} s for them to finish",
            n=open_now,
            s="" if open_now == 1 else "s",
            t=timeout,
        )
        done: Deferred[None] = Deferred()
        deadline = self.reactor.seconds() + timeout

        def check() -> None:
            left = self.open_connections()
            if left and self.reactor.seconds() < deadline:
                return
            poll.stop()
            if left:
                self.log.warn(
                    "drain timeout after {t:g} s: resetting {n} connection{s} still open",
                    t=timeout,
                    n=left,
                    s="" if left == 1 else "s",
                )
            else:
                self.log.info("drained: every connection finished")
            self.end(why, clean=True)
            done.callback(None)

        poll = LoopingCall(check)
        poll.clock = self.reactor
        poll.start(DRAIN_POLL, now=False)
        return done
