"""``twistd tm3rp``: the remote proxy's options and service.

One code path, two ways in: the ``tm3rp`` plugin calls :func:`makeService`,
and ``tm3rp.tac`` calls it too, with options taken from ``TM3_*`` variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import endpoints
from twisted.python import usage

from tm3.listening import ListeningService
from tm3.mux.settings import Settings
from tm3.options import (
    TUNING_PARAMETERS,
    argv_from_env,
    check_server_endpoint,
    parse_int,
    parse_tuning,
    settings_from,
)
from tm3.reactor import IProxyReactor, default_reactor
from tm3.rp.service import Multiplexer, PipeFactory

ENVIRONMENT = {
    "TM3_PIPES": "pipes",
    "TM3_LISTEN": "listen",
    "TM3_MAX_PAYLOAD": "max-payload",
    "TM3_CONNECT_TIMEOUT": "connect-timeout",
    "TM3_CONN_QUEUE": "conn-queue",
    "TM3_TOTAL_QUEUE": "total-queue",
    "TM3_REORDER_WINDOW": "reorder-window",
    "TM3_TOTAL_REORDER_WINDOW": "total-reorder-window",
}


class Options(usage.Options):
    synopsis = "--pipes N [options]"
    longdesc = (
        "TM3 remote proxy (RP). Accepts exactly N pipe connections from a TM3 local "
        "proxy, opens the TCP connections the LP asks for, and relays their bytes "
        "over the pipes (protocol: docs/protocol.md, version 1)."
    )
    optParameters = [
        ["pipes", "n", None, "Pipes in a session: the RP waits for exactly this many from the LP (required, 1..1024)."],
        ["listen", "l", "tcp:6000", "Where to accept pipes: a Twisted server endpoint string "
         "(tcp:6000, tcp:6000:interface=10.0.0.1, ssl:..., unix:/path)."],
        *TUNING_PARAMETERS,
    ]  # fmt: skip

    def postOptions(self) -> None:
        if self["pipes"] is None:
            raise usage.UsageError("--pipes is required: the number of pipes the LP opens (1..1024)")
        self["pipes"] = parse_int("pipes", self["pipes"], 1, 1024)
        parse_tuning(self)
        check_server_endpoint("listen", self["listen"])

    def settings(self) -> Settings:
        return settings_from(self)


class RemoteProxyService(MultiService):
    """The RP: a :class:`~tm3.rp.service.Multiplexer` fed by a listening :class:`~tm3.mux.pipes.PipeFactory`."""

    def __init__(self, config: Options, reactor: IProxyReactor) -> None:
        super().__init__()
        self.setName("tm3rp")
        self.multiplexer = Multiplexer(reactor, config.settings())
        self.multiplexer.setServiceParent(self)
        self.pipe_factory = PipeFactory(config["pipes"], reactor, self.multiplexer.start_session)
        endpoint = endpoints.serverFromString(reactor, config["listen"])
        self.listener = ListeningService(endpoint, self.pipe_factory, f"TM3 pipes, {config['pipes']} per session")
        self.listener.setServiceParent(self)

    def when_listening(self) -> Any:
        return self.listener.when_listening()

    def stopService(self) -> Any:
        self.pipe_factory.stop()
        return super().stopService()


def makeService(config: Options, reactor: IProxyReactor | None = None) -> RemoteProxyService:
    if reactor is None:
        reactor = default_reactor()
    return RemoteProxyService(config, reactor)


def options_from_env(environ: Mapping[str, str] | None = None) -> Options:
    """Options for ``tm3rp.tac``, from ``TM3_*`` environment variables.

    Raises ``usage.UsageError`` naming the variable when one is malformed."""
    environ = os.environ if environ is None else environ
    argv = argv_from_env(environ, ENVIRONMENT)
    config = Options()
    try:
        config.parseOptions(argv)
    except usage.UsageError as e:
        text = str(e)
        for var, option in ENVIRONMENT.items():  # name the one variable at fault
            if text.startswith((f"--{option} ", f"--{option}:")):
                if var in environ:
                    raise usage.UsageError(f"{var}={environ[var]!r}: {text}") from None
                raise usage.UsageError(f"{var} is not set: {text}") from None
        names = ", ".join(f"{k}={environ[k]!r}" for k in ENVIRONMENT if k in environ) or "none set"
        raise usage.UsageError(f"{e} (from the environment: {names}; TM3_PIPES is required)") from None
    return config
