"""A service that listens on a Twisted server endpoint and says where.

Like ``StreamServerEndpointService``, but with a public :meth:`when_listening`
(tests listen on ``tcp:0`` and need the port), and a listen failure at start
(port in use, bad interface) raises straight to ``twistd``, which prints it
and exits, instead of being logged while the daemon runs on deaf.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure


class ListeningService(Service):
    log = Logger()

    def __init__(self, endpoint: IStreamServerEndpoint, factory: Factory, description: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.port: IListeningPort | None = None
        self._waiting: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:
        super().startService()
        outcome: list[Any] = []
        self.endpoint.listen(self.factory).addBoth(outcome.append)
        # TCP and UNIX endpoints listen synchronously; anything else is a bug here.
        if not outcome:
            raise RuntimeError(f"endpoint {self.description} did not listen synchronously")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]
        self.log.info("listening on {where} ({what})", where=self.port.getHost(), what=self.description)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(self.port)

    def when_listening(self) -> Deferred[IListeningPort]:
        if self.port is not None:
            return succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiting.append(d)
        return d

    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None
