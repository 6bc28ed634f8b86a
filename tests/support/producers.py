"""Push producers for tests.

- :class:`Pausable`: the bookkeeping every producer here needs (``paused``,
  ``pauses``, pause and resume idempotent, because transports do call them
  twice); a subclass acts in :meth:`Pausable.on_pause` and
  :meth:`Pausable.on_resume`.
- :class:`PatternProducer`: writes ``size`` bytes of
  :class:`~tests.support.pattern.Pattern` into a transport as fast as it
  takes them: a source server's download, a client's upload.

They are the tests' own on purpose, not :class:`tm3.mux.flow.WriteGate` or
:class:`tm3.tools.streaming.PatternWriter`: what checks the proxies must not
share their flow-control code.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from tests.support.pattern import Pattern
from tests.support.waiting import Event


@implementer(IPushProducer)
class Pausable:
    """Records whether the consumer wants us to stop, and how often it asked."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1
            self.on_pause()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.on_resume()

    def stopProducing(self) -> None:
        self.paused = True

    def on_pause(self) -> None:
        pass

    def on_resume(self) -> None:
        pass


class PatternProducer(Pausable):
    """Writes ``size`` bytes of ``Pattern(seed)`` into ``transport`` as fast as
    it takes them (registered as its streaming producer from the start), then
    unregisters; ``done`` fires then. ``written`` counts what it has handed
    to the transport."""

    CHUNK = 65536

    def __init__(self, transport: Any, size: int, seed: int) -> None:
        super().__init__()
        self.transport = transport
        self.size = size
        self.pattern = Pattern(seed)
        self.written = 0
        self.done = Event()
        transport.registerProducer(self, True)
        self._produce()

    def on_resume(self) -> None:
        self._produce()

    def _produce(self) -> None:
        while not self.paused and self.written < self.size:
            n = min(self.CHUNK, self.size - self.written)
            chunk = self.pattern.chunk(self.written, n)
            self.written += n
            self.transport.write(chunk)
        if self.written >= self.size and not self.done.fired:
            self.transport.unregisterProducer()
            self.done.fire()
