"""What both experiment tools use to run and to write: :class:`PatternWriter`,
the push producer that streams pattern bytes into a transport under its flow
control (the server's responses, the client's request bodies), and
:func:`react_exit_code` for their console-script entry points."""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from attrs import define, field
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.task import react
from zope.interface import implementer

from tm3.tools.testproto import CHUNK_SIZE, Stream, pattern_bytes


@define
class _Send:
    prefix: bytes
    index: int
    stream: Stream
    length: int
    sent: int = 0


@implementer(IPushProducer)
@define(eq=False)
class PatternWriter:
    """Streams queued pattern bodies into ``consumer``, one chunk at a time.

    It registers itself as the consumer's streaming producer while it has
    something to send and unregisters when its queue runs dry, because
    ``loseConnection`` (and a half-close) wait for a registered producer.  A
    paused writer holds only the queue of what is still owed, never the bytes:
    chunks are cut from the pattern when the transport asks for more.
    """

    consumer: IConsumer
    #: Called with the request index when the last byte of an item was written.
    on_sent: Callable[[int], None] | None = None
    #: Called when the queue has drained and the writer unregistered itself.
    on_idle: Callable[[], None] | None = None
    bytes_written: int = 0
    paused: bool = False
    _queue: deque[_Send] = field(factory=deque, init=False)
    _registered: bool = field(default=False, init=False)
    _stopped: bool = field(default=False, init=False)
    _pumping: bool = field(default=False, init=False)

    @property
    def idle(self) -> bool:
        return not self._registered

    @property
    def queued(self) -> int:
        return len(self._queue)

    def send(self, prefix: bytes, index: int, stream: Stream, length: int) -> None:
        """Queue ``prefix`` followed by ``length`` pattern bytes of (index, stream)."""
        if self._stopped:
            return
        self._queue.append(_Send(prefix, index, stream, length))
        if not self._registered:
            self._registered = True
            # A writer that went idle while paused would otherwise never
            # resume: the transport only resumes producers that it paused
            # while they were registered.  If its buffer is still full, the
            # first write below pauses us again.
            self.paused = False
            self.consumer.registerProducer(self, True)
        self._pump()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._stopped = True
        self._registered = False
        self._queue.clear()

    def cancel(self) -> None:
        """Drop everything still owed and let go of the consumer for good.

        Unlike ``stopProducing`` (the consumer telling us it is gone), this
        also unregisters, so that a following ``loseConnection`` can close.
        """
        registered = self._registered
        self.stopProducing()
        if registered:
            self.consumer.unregisterProducer()

    def _pump(self) -> None:
        # Writes can pause us and callbacks can queue more (the client sends
        # its next request from on_sent); the flag keeps one loop in charge.
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._queue and not self.paused and not self._stopped:
                item = self._queue[0]
                if item.prefix:
                    data, item.prefix = item.prefix, b""
                    self.bytes_written += len(data)
                    self.consumer.write(data)
                    continue
                if item.sent < item.length:
                    n = min(CHUNK_SIZE, item.length - item.sent)
                    chunk = pattern_bytes(item.index, item.stream, item.sent, n)
                    item.sent += n
                    self.bytes_written += n
                    self.consumer.write(chunk)
                    continue
                self._queue.popleft()
                if self.on_sent is not None:
                    self.on_sent(item.index)
        finally:
            self._pumping = False
        if not self._queue and self._registered and not self._stopped:
            self._registered = False
            self.consumer.unregisterProducer()
            if self.on_idle is not None:
                self.on_idle()


def react_exit_code(main: Callable[..., Coroutine[Any, Any, None]], *args: object) -> int:
    """Run ``main(reactor, *args)`` under :func:`~twisted.internet.task.react`.

    ``react`` ends with ``sys.exit``; our ``main`` functions return the code
    instead, as console-script entry points and tests expect.
    """
    try:
        react(main, args)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    return 0  # pragma: no cover (react always exits)
