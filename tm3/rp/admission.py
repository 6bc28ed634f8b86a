"""How the RP greets an accepted pipe before it may join a pipe set: learn
which version it speaks, and for version 2 run the handshake
(tm3/core/handshake.py).

A v2 LP's first bytes are its HELLO, sent as soon as it connects. A v1 LP
(the reference) sends nothing until a client connects, and then a v1 message,
whose first 8 bytes can never be the hello's magic. So a pipe is v1 as soon
as its first bytes differ from the magic, or, where v1 is served, when it has
said nothing for ``hello_wait`` seconds after connecting (after its TLS
handshake, on a TLS listener): an idle reference LP, for which the wait costs
nothing, since its first message classifies the pipe at once. On an RP
without a key (v1 only), a pipe's first message also classifies its silent
siblings from the same address, so the set starts at once. A pipe is v2 once
the LP has proved the key. What is refused is closed and logged, one line each:

- a v2 hello when this RP has no key;
- a v1 pipe when this RP has a key, unless ``allow_v1``;
- a handshake that fails (a wrong key, a malformed message) or does not
  finish within ``handshake_timeout`` seconds.

A TLS pipe whose TLS handshake fails (``--listen tls:``) is lost while it is
greeted, and logged too.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import define
from twisted.internet.interfaces import IDelayedCall, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from tm3.core.handshake import HandshakeError, Hello, ServerHandshake, looks_like_hello
from tm3.mux.pipes import PipeProtocol
from tm3.reactor import IProxyReactor
from tm3.tls import tls_failure

HELLO_WAIT = 1.0
HANDSHAKE_TIMEOUT = 10.0


@define
class _Greeting:
    timer: IDelayedCall
    first: bytes = b""
    handshake: ServerHandshake | None = None


class Admission:
    """The greeter (:class:`~tm3.mux.pipes.Greeter`) of every accepted pipe."""

    log = Logger()

    def __init__(
        self,
        reactor: IProxyReactor,
        on_v1: Callable[[PipeProtocol, bytes], object],
        on_v2: Callable[[PipeProtocol, Hello, bytes], object],
        key: bytes | None = None,
        window: int = 0,
        allow_v1: bool = True,
        hello_wait: float = HELLO_WAIT,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.on_v1 = on_v1
        self.on_v2 = on_v2
        self.key = key
        self.window = window
        self.allow_v1 = allow_v1 or key is None
        self.hello_wait = hello_wait
        self.handshake_timeout = handshake_timeout
        self.greeting: dict[PipeProtocol, _Greeting] = {}
        self.refused = 0
        self.handshakes_failed = 0
        self.tls_failed = 0

    def __len__(self) -> int:
        return len(self.greeting)

    def pipe_made(self, pipe: PipeProtocol) -> None:
        # Silence means v1 only where v1 is served, and only once a TLS
        # handshake (which comes first) is over; until then, the handshake
        # timeout applies.
        tls = ISSLTransport.providedBy(pipe.transport)
        wait = self.hello_wait if self.allow_v1 and not tls else self.handshake_timeout
        self.greeting[pipe] = _Greeting(self.reactor.callLater(wait, self._quiet, pipe))

    def waited_out(self, pipe: PipeProtocol) -> None:
        """The pipe has said nothing for the hello wait already, before it
        came here (a ``--workers`` front waited: tm3/rp/front.py): where v1
        is served, it is an idle v1 LP now, not a second wait later."""
        g = self.greeting.get(pipe)
        if g is not None and g.handshake is None and not g.first and self.allow_v1:
            self._quiet(pipe)

    def pipe_secured(self, pipe: PipeProtocol) -> None:
        """The pipe's TLS handshake is over: now the hello wait starts."""
        g = self.greeting.get(pipe)
        if g is not None and g.handshake is None and not g.first and self.allow_v1:
            g.timer.reset(self.hello_wait)

    def pipe_data(self, pipe: PipeProtocol, data: bytes) -> None:
        g = self.greeting.get(pipe)
        if g is None:
            return
        if g.handshake is None:
            g.first += data
            verdict = looks_like_hello(g.first)
            if verdict is None:
                return  # a few bytes of the magic so far
            if verdict is False:
                self._v1(pipe, g.first)
                if self.key is None:
                    # Its silent siblings from the same address are the same
                    # v1 LP's idle pipes: the set must not wait out their
                    # hello wait to start. (Not where v2 is served: a pipe
                    # whose hello is late must not be taken for v1 because
                    # of someone else's bytes.)
                    for other, og in list(self.greeting.items()):
                        if other.peer_host == pipe.peer_host and og.handshake is None and not og.first:
                            self._v1(other, b"")
                return
            if self.key is None:
                self._refuse(
                    pipe, "sent a TM3 v2 hello, but this RP has no --key-file (it serves v1 only)", failed=True
                )
                return
            g.handshake = ServerHandshake(self.key, self.window)
            g.timer.reset(self.handshake_timeout)
            data, g.first = g.first, b""
        try:
            reply = g.handshake.feed(data)
        except HandshakeError as e:
            self._refuse(pipe, f"failed the v2 handshake: {e}", failed=True)
            return
        if reply and pipe.transport is not None:
            pipe.transport.write(reply)
        hello = g.handshake.hello
        if hello is not None:
            self._done(pipe)
            pipe.peer_window = hello.window
            self.on_v2(pipe, hello, g.handshake.rest)

    def pipe_gone(self, pipe: PipeProtocol, reason: Failure) -> None:
        g = self.greeting.pop(pipe, None)
        if g is None:
            return
        if g.timer.active():
            g.timer.cancel()
        tls = tls_failure(reason)
        if tls is not None:  # a refused client certificate, or the LP refused ours
            self.tls_failed += 1
            self.log.warn("{pipe} lost in its TLS handshake: {why}", pipe=pipe.name, why=tls)

    def _quiet(self, pipe: PipeProtocol) -> None:
        g = self.greeting.get(pipe)
        if g is None:
            return
        if g.handshake is None and not g.first and self.allow_v1:
            self._v1(pipe, b"")  # an idle v1 LP
        elif g.handshake is None:
            self._refuse(pipe, f"sent no v2 hello within {self.handshake_timeout:g} s", failed=True)
        else:
            self._refuse(pipe, f"did not finish the v2 handshake within {self.handshake_timeout:g} s", failed=True)

    def _v1(self, pipe: PipeProtocol, first: bytes) -> None:
        if not self.allow_v1:
            self._refuse(pipe, "speaks v1, and this RP has a key: only v2 pipes that prove it are taken (--allow-v1)")
            return
        self._done(pipe)
        self.on_v1(pipe, first)

    def _done(self, pipe: PipeProtocol) -> None:
        g = self.greeting.pop(pipe)
        if g.timer.active():
            g.timer.cancel()

    def _refuse(self, pipe: PipeProtocol, why: str, failed: bool = False) -> None:
        self._done(pipe)
        self.refused += 1
        if failed:
            self.handshakes_failed += 1
        self.log.warn("{pipe} refused: it {why}", pipe=pipe.name, why=why)
        pipe.abort()

    def close(self) -> None:
        for pipe in list(self.greeting):
            self._done(pipe)
            pipe.abort()
