"""The LP's side of the version 2 handshake (tm3/core/handshake.py), for the
pipes of one dial attempt: each pipe sends its HELLO as soon as it connects,
checks that the RP proves the key, proves it back, and only then joins the
attempt's set. Any failure fails the whole attempt, with a line that says
what to check."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from tm3.core.handshake import ClientHandshake, HandshakeError
from tm3.mux.pipes import PipeGathering, PipeProtocol
from tm3.reactor import IProxyReactor
from tm3.tls import tls_failure


class HandshakeFailed(Exception):
    pass


class ClientGreeting:
    """The :class:`~tm3.mux.pipes.Greeter` of one attempt's pipes."""

    def __init__(
        self,
        reactor: IProxyReactor,
        attempt: PipeGathering,
        key: bytes,
        session_id: bytes,
        window: int,
        timeout: float,
        on_failed: Callable[[Failure], object],
    ) -> None:
        self.reactor = reactor
        self.attempt = attempt
        self.key = key
        self.session_id = session_id
        self.window = window
        self.timeout = timeout
        self.on_failed = on_failed
        self._next_index = 0
        self.handshakes: dict[PipeProtocol, tuple[ClientHandshake, IDelayedCall]] = {}

    def pipe_made(self, pipe: PipeProtocol) -> None:
        index, self._next_index = self._next_index, self._next_index + 1
        handshake = ClientHandshake(self.key, self.session_id, self.attempt.n, index, self.window)
        timer = self.reactor.callLater(self.timeout, self._expired, pipe)
        self.handshakes[pipe] = (handshake, timer)
        pipe.index = index
        assert pipe.transport is not None
        pipe.transport.write(handshake.hello_bytes())

    def pipe_data(self, pipe: PipeProtocol, data: bytes) -> None:
        entry = self.handshakes.get(pipe)
        if entry is None:
            return
        handshake, timer = entry
        try:
            proof = handshake.feed(data)
        except HandshakeError as e:
            self._fail(pipe, str(e))
            return
        if proof and pipe.transport is not None:
            pipe.transport.write(proof)
        if handshake.peer_window is not None:
            del self.handshakes[pipe]
            timer.cancel()
            pipe.peer_window = handshake.peer_window
            pipe.join(self.attempt, handshake.rest)

    def pipe_gone(self, pipe: PipeProtocol, reason: Failure) -> None:
        entry = self.handshakes.pop(pipe, None)
        if entry is None:
            return
        entry[1].cancel()
        tls = tls_failure(reason)
        if tls is not None:  # not a key mismatch: the hint below would mislead
            self.on_failed(Failure(HandshakeFailed(f"TLS with the RP failed: {tls}")))
            return
        self.on_failed(
            Failure(
                ConnectionLost(
                    f"the RP closed a pipe during the v2 handshake ({reason.getErrorMessage()}): does it have"
                    " the same --key-file? (an RP without one takes v1 pipes only)"
                )
            )
        )

    def pipe_secured(self, pipe: PipeProtocol) -> None:
        pass  # the hello was written at connect; TLS sends it once its handshake is over

    def _expired(self, pipe: PipeProtocol) -> None:
        if pipe in self.handshakes:
            self._fail(pipe, f"no answer to the v2 hello within {self.timeout:g} s (is it a TM3 v2 RP?)")

    def _fail(self, pipe: PipeProtocol, why: str) -> None:
        _, timer = self.handshakes.pop(pipe)
        if timer.active():
            timer.cancel()
        pipe.abort()
        self.on_failed(Failure(HandshakeFailed(f"v2 handshake failed: {why}")))

    def close(self) -> None:
        for pipe, (_, timer) in list(self.handshakes.items()):
            if timer.active():
                timer.cancel()
            pipe.abort()
        self.handshakes.clear()
