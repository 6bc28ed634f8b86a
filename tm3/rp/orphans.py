"""Rule 9 (docs/protocol.md): messages for an id that has no connection yet.

A DATA or FIN can overtake its connection's SYN on a faster pipe, so the RP
holds it, in case the SYN is still on its way: ``orphan_timeout`` seconds at
most, ``orphan_id_limit`` per id and ``orphan_total_limit`` in all, charged at
what it really costs (below). Past a limit, or when its time runs out, it is
dropped and counted as the tail of a connection that is over.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from tm3.core.wire import Message, wire_size
from tm3.mux.settings import Settings

# What held orphans really cost, charged against the limits: measured 108
# bytes for an empty DATA in the list (the Data tuple and the list slot),
# 141 + p with a payload of p bytes; charged wire size (8 + p) + 136. Each id
# with orphans also has its record and its expiry timer: charged 1 KiB.
ORPHAN_OVERHEAD = 136
ORPHAN_ID_OVERHEAD = 1024


class Held:
    """The orphans of one id."""

    __slots__ = ("messages", "size", "timer")

    def __init__(self, timer: IDelayedCall) -> None:
        self.messages: list[Message] = []
        self.size = ORPHAN_ID_OVERHEAD
        self.timer = timer


class Orphans:
    log = Logger()

    def __init__(self, reactor: IReactorTime, settings: Settings, drop: Callable[[Message], None], name: str) -> None:
        self.reactor = reactor
        self.settings = settings
        self.drop = drop  # counts a dropped message
        self.name = name
        self.held: dict[int, Held] = {}
        self.total = 0

    def hold(self, msg: Message) -> None:
        cid = msg.conn_id
        size = wire_size(msg) + ORPHAN_OVERHEAD
        held = self.held.get(cid)
        s = self.settings
        if held is None:
            if self.total + ORPHAN_ID_OVERHEAD + size > s.orphan_total_limit:
                self.drop(msg)
                return
            held = self.held[cid] = Held(self.reactor.callLater(s.orphan_timeout, self._expired, cid))
            self.total += ORPHAN_ID_OVERHEAD
        if held.size + size > s.orphan_id_limit or self.total + size > s.orphan_total_limit:
            self.drop(msg)
            return
        held.messages.append(msg)
        held.size += size
        self.total += size

    def take(self, cid: int) -> list[Message]:
        """Everything held for ``cid`` (its SYN came), in arrival order."""
        held = self.held.pop(cid, None)
        if held is None:
            return []
        if held.timer.active():
            held.timer.cancel()
        self.total -= held.size
        return held.messages

    def _expired(self, cid: int) -> None:
        held = self.held.pop(cid, None)
        if held is None:
            return
        self.total -= held.size
        for m in held.messages:
            self.drop(m)
        self.log.debug(
            "{session}: dropped {n} messages for id {conn_id}, which has no connection",
            session=self.name,
            n=len(held.messages),
            conn_id=cid,
        )

    def clear(self) -> None:
        for held in self.held.values():
            if held.timer.active():
                held.timer.cancel()
        self.held.clear()
        self.total = 0
