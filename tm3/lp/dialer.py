"""The LP's pipe dialer: opens all ``n`` pipes to the RP at once (through a
client endpoint: TCP, or TLS), greets the RP on each (the v2 handshake, with
a key), and uses a set only whole. A failed try is retried with exponential backoff; the delay
after a session ends depends on whether that session was of any use (an RP
that closes every set at once probably expects another ``--pipes``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from tm3.core.credit import DEFAULT_INITIAL_WINDOW
from tm3.core.handshake import new_session_id
from tm3.logs import plural
from tm3.lp.greeting import ClientGreeting
from tm3.mux.pipes import PipeGathering, PipeProtocol
from tm3.mux.settings import V1, Terms
from tm3.reactor import IProxyReactor

INITIAL_BACKOFF = 0.5
MAX_BACKOFF = 30.0


class PipeDialer:
    log = Logger()

    def __init__(
        self,
        reactor: IProxyReactor,
        endpoint: IStreamClientEndpoint,
        n: int,
        on_up: Callable[[list[PipeProtocol], Terms], object],
        remote: str = "the RP",
        key: bytes | None = None,
        window: int = DEFAULT_INITIAL_WINDOW,
        handshake_timeout: float = 10.0,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.remote = remote
        self.n = n
        self.on_up = on_up
        self.key = key
        self.window = window
        self.handshake_timeout = handshake_timeout
        self.backoff = INITIAL_BACKOFF
        self.attempt: PipeGathering | None = None
        self.retry: IDelayedCall | None = None
        self.stopped = True
        self.failures = 0

    def start(self, delay: float = 0.0) -> None:
        self.stopped = False
        if self.retry is not None and self.retry.active():
            return
        if delay > 0:
            self.retry = self.reactor.callLater(delay, self._dial)
        else:
            self._dial()

    def _dial(self) -> None:
        self.retry = None
        if self.stopped:
            return
        attempt = self.attempt = PipeGathering(
            self.n,
            self.reactor,
            on_complete=lambda pipes: self._complete(attempt, pipes),
            on_lost=lambda _pipe, reason: self.failed(attempt, reason),
        )
        if self.key is not None:
            # A new session id for every attempt: an LP that redials (or
            # restarts) starts a new session, and the old one ends with its pipes.
            attempt.greeter = ClientGreeting(
                self.reactor,
                attempt,
                self.key,
                new_session_id(),
                self.window,
                self.handshake_timeout,
                lambda reason: self.failed(attempt, reason),
            )
        for _ in range(self.n):
            d: Deferred[Any] = self.endpoint.connect(attempt)
            d.addErrback(self._connect_failed, attempt)

    def _connect_failed(self, reason: Failure, attempt: PipeGathering) -> None:
        self.failed(attempt, reason)

    def failed(self, attempt: PipeGathering, reason: Failure) -> None:
        if attempt.closed or attempt is not self.attempt:
            return
        self._close(attempt)
        self.failures += 1
        if self.stopped:
            return
        self.log.warn(
            "cannot open {pipes} to the RP at {remote}: {why}; retrying in {delay:.1f} s",
            pipes=plural(self.n, "pipe"),
            n=self.n,
            remote=self.remote,
            why=reason.getErrorMessage(),
            delay=self.backoff,
        )
        self.retry = self.reactor.callLater(self.backoff, self._dial)
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)

    def _complete(self, attempt: PipeGathering, pipes: list[PipeProtocol]) -> None:
        attempt.closed = True  # the pipes belong to the session now
        if attempt is not self.attempt:
            for pipe in pipes:
                pipe.abort()
            return
        self.attempt = None
        if self.key is None:
            self.on_up(pipes, V1)
        else:
            pipes.sort(key=lambda p: p.index)
            self.on_up(pipes, Terms(version=2, peer_window=min(p.peer_window for p in pipes)))

    def next_delay(self, session_was_useful: bool) -> float:
        """Delay before redialing after a session ended: short after a
        session that lasted or carried traffic, growing after ones that
        died at once (the RP keeps closing them: it expects another --pipes)."""
        if session_was_useful:
            self.backoff = INITIAL_BACKOFF
            return INITIAL_BACKOFF
        delay = self.backoff
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        return delay

    def stop(self) -> None:
        self.stopped = True
        if self.retry is not None and self.retry.active():
            self.retry.cancel()
        self.retry = None
        if self.attempt is not None:
            self._close(self.attempt)

    def _close(self, attempt: PipeGathering) -> None:
        attempt.close()
        if isinstance(attempt.greeter, ClientGreeting):
            attempt.greeter.close()
        if attempt is self.attempt:
            self.attempt = None
