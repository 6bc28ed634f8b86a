"""How tests wait in the reactor: every wait is bounded and says what it waited for.

- :class:`Event`: a one-shot event with any number of waiters.
- :func:`reactor`: the global reactor, looked up when called, so importing
  this module installs none (pytest-twisted and ``task.react`` choose it).
- :func:`sleep`; :func:`until`, which polls a predicate for state that has
  no event of its own; :func:`steady`, which waits for a value to stop
  changing (a stalled transfer announces itself by no event).
- :func:`with_timeout` fails with ``defer.TimeoutError`` after a delay;
  :func:`within` fails with an ``AssertionError`` naming what it waited for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.python.failure import Failure


def reactor() -> Any:
    from twisted.internet import reactor as r

    return r


class Event:
    """A one-shot event with any number of waiters (each gets its own Deferred,
    so a waiter that times out and cancels cannot disturb the others)."""

    def __init__(self) -> None:
        self.fired = False
        self.result: Any = None
        self._waiters: list[defer.Deferred[Any]] = []

    def fire(self, result: Any = None) -> None:
        if self.fired:
            return
        self.fired = True
        self.result = result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(result)

    def wait(self) -> defer.Deferred[Any]:
        if self.fired:
            return defer.succeed(self.result)
        d: defer.Deferred[Any] = defer.Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(d)
        return d


def with_timeout(d: Any, seconds: float) -> defer.Deferred[Any]:
    """``d`` (a Deferred or coroutine), failing with ``defer.TimeoutError``
    after ``seconds``."""
    if not isinstance(d, defer.Deferred):
        d = defer.ensureDeferred(d)
    return d.addTimeout(seconds, reactor())


def within(d: Any, seconds: float, what: str = "an event") -> defer.Deferred[Any]:
    """``d`` (a Deferred or coroutine), failing with a message naming ``what``
    after ``seconds``."""

    def timed_out(f: Failure) -> Failure:
        if f.check(defer.TimeoutError):
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        return f

    return with_timeout(d, seconds).addErrback(timed_out)


async def sleep(seconds: float) -> None:
    await deferLater(reactor(), seconds, lambda: None)


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` (for state that has no event of its own) until true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await sleep(0.01)


async def steady(sample: Callable[[], Any], quiet: float = 0.3, timeout: float = 20.0, what: str = "a stall") -> Any:
    """Wait until ``sample()`` has not changed for ``quiet`` seconds: the way
    to see that a transfer has stalled, which no event announces. Returns
    the value it settled on."""
    deadline = time.monotonic() + timeout
    last = sample()
    since = time.monotonic()
    unchanged = 0
    while True:
        await sleep(0.02)
        now = sample()
        if now != last:
            last, since, unchanged = now, time.monotonic(), 0
        else:
            # Both: a process starved of CPU must not pass for a stalled transfer.
            unchanged += 1
            if unchanged >= 10 and time.monotonic() - since >= quiet:
                return now
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last {last!r})")
