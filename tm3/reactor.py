"""The reactor as the proxies use it: time, TCP and name resolution.

Twisted's reactors provide each of these interfaces; naming their union lets
the code that passes a reactor around say what it needs instead of ``Any``
(tests pass a ``MemoryReactorClock``, which provides them all)."""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import IReactorCore, IReactorTCP, IReactorTime


class IProxyReactor(IReactorTime, IReactorTCP, IReactorCore):
    pass


def default_reactor() -> IProxyReactor:
    """The global reactor (imported late: importing it installs it)."""
    from twisted.internet import reactor

    return cast(IProxyReactor, reactor)
