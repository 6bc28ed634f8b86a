"""Producer/consumer plumbing shared by pipes and application sockets.

A Twisted transport takes exactly one registered producer and calls its
``pauseProducing`` when the transport's write buffer passes 64 KiB, and
``resumeProducing`` only once it has fully drained. :class:`WriteGate` is that
producer: it does not produce anything itself, it only turns the transport's
verdict into an ``is_blocked`` flag plus callbacks, so the owner can decide
what to do (choose another pipe, queue, stop reading elsewhere).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import cast

from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from zope.interface import implementer


@implementer(IPushProducer)
class WriteGate:
    __slots__ = ("is_blocked", "_on_pause", "_on_resume")

    def __init__(self, on_pause: Callable[[], None], on_resume: Callable[[], None]) -> None:
        self.is_blocked = False
        self._on_pause = on_pause
        self._on_resume = on_resume

    # Idempotent on purpose: transports and producer membranes do call these
    # twice (see twisted.protocols.tls._ProducerMembrane).
    def pauseProducing(self) -> None:
        if not self.is_blocked:
            self.is_blocked = True
            self._on_pause()

    def resumeProducing(self) -> None:
        if self.is_blocked:
            self.is_blocked = False
            self._on_resume()

    def stopProducing(self) -> None:
        # The transport is going away; its connectionLost tells the owner.
        pass


def register_producer(transport: object, producer: IPushProducer) -> None:
    """Register a streaming producer on a transport (TCP and test transports
    are consumers, though ``Protocol.transport`` is typed as ITransport)."""
    cast(IConsumer, transport).registerProducer(producer, True)


def unregister_producer(transport: object) -> None:
    """Unregister the transport's producer, if it has one: loseConnection
    and loseWriteConnection do not finish while one is registered."""
    if getattr(transport, "producer", None) is not None:
        cast(IConsumer, transport).unregisterProducer()


def abort_transport(transport: object) -> None:
    """Close at once, dropping buffered data (TCP RST where possible)."""
    unregister_producer(transport)
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        cast(ITransport, transport).loseConnection()


def reset_pending(transport: object) -> bool:
    """Whether the socket under ``transport`` has a pending error (SO_ERROR).

    Twisted takes EPOLLHUP without EPOLLIN on a socket it reads for a clean
    close (``posixbase._doReadOrWrite``), and the kernel does report a RST
    that way now and then (HUP|ERR while it is still processing the RST on
    another CPU): a half-closeable protocol then gets ``readConnectionLost``
    for what was a reset. The error is still pending on the socket."""
    try:
        err = transport.getHandle().getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return False
    return isinstance(err, int) and err != 0
