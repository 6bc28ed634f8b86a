"""``--summary-interval``: one info line every so often saying how the proxy
is doing (pipes up, connections open, bytes each way and the rates since the
last line), and one more when it stops, with the totals since it started.
That one waits for the sessions to end (a stopping proxy drains its open
connections first, up to ``--drain-timeout``), so the totals include them.

"up" is the client-to-server direction: bytes the LP reads from its clients
and the RP writes to its servers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from tm3.logs import plural
from tm3.mux.session import Session
from tm3.mux.settings import Stats

DEFAULT_SUMMARY_INTERVAL = 60.0
# While stopping: how often to look whether the sessions have ended.
STOP_POLL = 0.05


def rate(n: float, seconds: float) -> str:
    """``12.3 kB/s``-style (decimal units, like link speeds)."""
    per_second = n / seconds if seconds > 0 else 0.0
    for unit in ("B/s", "kB/s", "MB/s", "GB/s"):
        if per_second < 1000 or unit == "GB/s":
            return f"{per_second:.3g} {unit}" if unit != "B/s" else f"{per_second:.0f} B/s"
        per_second /= 1000
    raise AssertionError("unreachable")


class SummaryService(Service):
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        role: str,
        stats: Stats,
        sessions: Callable[[], Iterable[Session]],
        interval: float = DEFAULT_SUMMARY_INTERVAL,
        stop_wait: float = 0.0,
    ) -> None:
        self.reactor = reactor
        self.role = role
        self.stats = stats
        self.sessions = sessions
        self.interval = interval
        self.stop_wait = stop_wait  # the most the exit line waits for the sessions to end
        self._loop: LoopingCall | None = None
        self._started = 0.0
        self._last = (0.0, 0, 0, 0)  # when, up, down, connections opened

    def _up_down(self) -> tuple[int, int]:
        s = self.stats
        if self.role == "lp":
            return s.bytes_to_pipes, s.bytes_from_pipes
        return s.bytes_from_pipes, s.bytes_to_pipes

    def startService(self) -> None:
        super().startService()
        self._started = self.reactor.seconds()
        self._last = (self._started, *self._up_down(), self.stats.connections_opened)
        if self.interval > 0:
            self._loop = LoopingCall(self.summary)
            self._loop.clock = self.reactor
            self._loop.start(self.interval, now=False)

    def stopService(self) -> Any:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        super().stopService()
        done: Deferred[None] = Deferred()
        deadline = self.reactor.seconds() + self.stop_wait

        def check() -> None:
            if any(True for _ in self.sessions()) and self.reactor.seconds() < deadline:
                return
            poll.stop()
            self.summary(final=True)
            done.callback(None)

        poll = LoopingCall(check)
        poll.clock = self.reactor
        poll.start(STOP_POLL, now=True)
        return done

    def summary(self, final: bool = False) -> None:
        """The line for the last interval; ``final``: the totals since start
        (the sessions may be gone by then: no live state)."""
        now = self.reactor.seconds()
        up, down = self._up_down()
        opened = self.stats.connections_opened
        if final:
            seconds = now - self._started
            self.log.info(
                "summary at exit: {opened} connections in {seconds:.0f} s; "
                "up {up} B ({up_rate}), down {down} B ({down_rate})",
                opened=opened,
                seconds=seconds,
                up=up,
                down=down,
                up_rate=rate(up, seconds),
                down_rate=rate(down, seconds),
                final=True,
            )
            return
        since, up0, down0, opened0 = self._last
        self._last = (now, up, down, opened)
        seconds = now - since
        pipes = sum(p.connected_ for s in self.sessions() for p in s.pipes.pipes)
        open_now = opened - self.stats.connections_closed
        self.log.info(
            "summary: {pipes_up} up, {conns_open} open ({opened} opened in {seconds:.0f} s); "
            "up {up} B ({up_rate}), down {down} B ({down_rate})",
            pipes_up=plural(pipes, "pipe"),
            pipes=pipes,
            conns_open=plural(open_now, "connection"),
            connections_open=open_now,
            opened=opened - opened0,
            seconds=seconds,
            up=up - up0,
            down=down - down0,
            up_rate=rate(up - up0, seconds),
            down_rate=rate(down - down0, seconds),
            final=False,
        )
