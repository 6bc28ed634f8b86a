"""``twistd tm3rp``: the remote proxy's options and service.

One code path, two ways in: the ``tm3rp`` plugin calls :func:`makeService`,
and ``tm3rp.tac`` calls it too, with options taken from ``TM3_*`` variables.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorFDSet, IReactorSocket
from twisted.python import usage

from tm3.cli import ProxyOptions, cannot_start, os_reason
from tm3.core.destinations import BadRule, DestinationPolicy, parse_rule
from tm3.listening import ListeningService
from tm3.logs import set_label
from tm3.metrics import MetricsService, ProxyCollector
from tm3.mux.settings import Settings
from tm3.options import (
    OBSERVE_PARAMETERS,
    TUNING_ENVIRONMENT,
    TUNING_PARAMETERS,
    check_server_endpoint,
    options_from_environment,
    parse_int,
    parse_observe,
    parse_seconds,
    parse_tuning,
    read_key_file,
    settings_from,
)
from tm3.reactor import IProxyReactor, default_reactor
from tm3.rp.admission import HANDSHAKE_TIMEOUT, HELLO_WAIT
from tm3.rp.front import FrontService, metrics_for_workers
from tm3.rp.service import DEFAULT_MAX_PENDING, DEFAULT_MAX_PER_ADDRESS, Multiplexer, PipeFactory, is_local_address
from tm3.rp.worker import PipeReceiver, StopOnce, WorkerRole, worker_from_env
from tm3.summary import SummaryService
from tm3.tls import server_from_string

ENVIRONMENT = {
    **TUNING_ENVIRONMENT,
    "TM3_PIPES": "pipes",
    "TM3_LISTEN": "listen",
    "TM3_MAX_PENDING_PIPES": "max-pending-pipes",
    "TM3_MAX_PENDING_PER_ADDRESS": "max-pending-per-address",
    "TM3_ALLOW_FROM": "allow-from",  # networks separated by spaces
    "TM3_ALLOW_TO": "allow-to",  # rules separated by spaces; the allow rules come first
    "TM3_DENY_TO": "deny-to",
    "TM3_KEY_FILE": "key-file",
    "TM3_HELLO_WAIT": "hello-wait",
    "TM3_HANDSHAKE_TIMEOUT": "handshake-timeout",
    "TM3_METRICS": "metrics",
    "TM3_LOG_FORMAT": "log-format",
    "TM3_SUMMARY_INTERVAL": "summary-interval",
    "TM3_WORKERS": "workers",
}
# Flags: set when the variable is 1, yes or true.
FLAGS = {"TM3_ALLOW_V1": "allow-v1"}


class Options(ProxyOptions):
    command = "tm3rp"
    synopsis = "--pipes N [options]"
    longdesc = (
        "TM3 remote proxy (RP). Accepts sets of pipe connections from TM3 local "
        "proxies, opens the TCP connections each LP asks for, and relays their bytes "
        "over the pipes (protocol: docs/protocol.md). Version 1 (the reference LP): "
        "exactly N pipes per set, one set per source address, no authentication. "
        "Version 2 (our LP with --key-file): each pipe proves the shared key, "
        "sets are bound by session id, and every connection has its own window."
    )
    optParameters = [
        ["pipes", "n", None, "Pipes in a v1 session: the RP waits for exactly this many from a v1 LP (required, 1..1024); "
         "a v2 LP says how many its set has."],
        ["listen", "l", "tcp:6000", "Where to accept pipes: a Twisted server endpoint string "
         "(tcp:6000, tcp:6000:interface=10.0.0.1, ssl:..., unix:/path), or for TLS pipes tls:6000:privateKey=KEY.pem:"
         "certificate=CERT.pem[:caCerts=CA.pem] (with caCerts, every LP must present a certificate those CAs signed); "
         "haproxy:tcp:6000 or haproxy:tls:... behind HAProxy's send-proxy-v2 (the PROXY header gives each LP's address)."],
        ["max-pending-pipes", None, None, "Pipes that may wait for their sets to complete, from all addresses "
         f"together (--pipes..65536; default {DEFAULT_MAX_PENDING}, or --pipes if larger); more are closed at accept."],
        ["max-pending-per-address", None, None, "Of those, how many may come from one address (--pipes..65536; "
         f"default {DEFAULT_MAX_PER_ADDRESS}, or --pipes if larger): one address cannot take every slot."],
        ["key-file", None, None, "File holding the shared key (at least 32 characters; for example "
         "`head -c 32 /dev/urandom | base64 > tm3.key`): take v2 pipes that prove it, and no v1 pipes "
         "unless --allow-v1. Without it, only v1 is served."],
        ["hello-wait", None, str(HELLO_WAIT), "Seconds a new pipe that sends nothing is given before it counts as "
         "v1 (a v1 LP's first message classifies it at once) (0 < s <= 60)."],
        ["handshake-timeout", None, str(HANDSHAKE_TIMEOUT), "Seconds a v2 pipe has to finish its handshake "
         "(0 < s <= 600)."],
        ["workers", None, "1", "Processes that run sessions (1..64). 1: this one. N >= 2: this process becomes a "
         "front that accepts the pipes and passes each to one of N worker processes it starts (a v2 set by its "
         "session id, a v1 set by its address), restarts one that dies, and stops them on SIGTERM; needs a tcp: "
         "--listen, and --metrics tcp:PORT gives worker i PORT+i-1."],
        *TUNING_PARAMETERS,
        *OBSERVE_PARAMETERS,
    ]  # fmt: skip
    optFlags = [
        ["allow-v1", None, "With --key-file: serve v1 pipes (the reference LP, unauthenticated) as well."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["destination-rules"] = []
        self["allow-from"] = []
        self.argv: list[str] = []

    def parseOptions(self, options: Any = None) -> None:
        # Kept for the workers of a --workers front: the same options, each its own.
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def opt_allow_from(self, spec: str) -> None:
        """CIDR: accept pipes only from these networks (repeatable); others are
        closed at accept and logged. Default: from anywhere."""
        for text in spec.split():
            try:
                rule = parse_rule(text, allow=True)
            except BadRule as e:
                raise usage.UsageError(f"--allow-from: {e}") from None
            if rule.ports:
                raise usage.UsageError(f"--allow-from: {text!r} takes no ports, only CIDR")
            self["allow-from"].append(rule.network)

    def opt_allow_to(self, spec: str) -> None:
        """CIDR[:PORTS]: let the LP reach these destinations (repeatable; rules
        apply in the order given, the first that matches decides). Needed for
        loopback, 0.0.0.0/8, 169.254.0.0/16, multicast and broadcast, which are
        denied otherwise. PORTS: 80, 80,443 or 8000-8999."""
        self._rules("allow-to", spec, allow=True)

    def opt_deny_to(self, spec: str) -> None:
        """CIDR[:PORTS]: refuse these destinations with FIN 0x99 (repeatable, in
        order with --allow-to). End with --deny-to 0.0.0.0/0 to allow only the
        --allow-to destinations."""
        self._rules("deny-to", spec, allow=False)

    def _rules(self, option: str, spec: str, allow: bool) -> None:
        for text in spec.split():
            try:
                self["destination-rules"].append(parse_rule(text, allow))
            except BadRule as e:
                raise usage.UsageError(f"--{option}: {e}") from None

    def postOptions(self) -> None:
        if self["pipes"] is None:
            raise usage.UsageError("--pipes is required: the number of pipes the LP opens (1..1024)")
        self["pipes"] = parse_int("pipes", self["pipes"], 1, 1024)
        if self["max-pending-pipes"] is None:
            self["max-pending-pipes"] = max(DEFAULT_MAX_PENDING, self["pipes"])
        else:
            self["max-pending-pipes"] = parse_int("max-pending-pipes", self["max-pending-pipes"], self["pipes"], 65536)
        if self["max-pending-per-address"] is None:
            self["max-pending-per-address"] = max(DEFAULT_MAX_PER_ADDRESS, self["pipes"])
        else:
            self["max-pending-per-address"] = parse_int(
                "max-pending-per-address", self["max-pending-per-address"], self["pipes"], 65536
            )
        parse_tuning(self)
        parse_observe(self)
        check_server_endpoint("listen", self["listen"], server_from_string)
        self["hello-wait"] = parse_seconds("hello-wait", self["hello-wait"], 0, 60)
        self["handshake-timeout"] = parse_seconds("handshake-timeout", self["handshake-timeout"], 0, 600)
        self["key"] = read_key_file("key-file", self["key-file"]) if self["key-file"] is not None else None
        if self["allow-v1"] and self["key"] is None:
            raise usage.UsageError("--allow-v1 goes with --key-file (without a key, v1 is all this RP serves)")
        self._workers()

    def _workers(self) -> None:
        self["workers"] = parse_int("workers", self["workers"], 1, 64)
        try:
            self["worker"] = worker_from_env(os.environ)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        if self["worker"] is not None:
            set_label(f"worker {self['worker'].index}")
            return
        self["worker-metrics"] = []
        if self["workers"] == 1:
            return
        endpoint = server_from_string(default_reactor(), self["listen"])
        if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
            raise usage.UsageError(
                f"--workers {self['workers']} needs a tcp: --listen, not {self['listen']!r}: the front routes "
                "a pipe by its first bytes, which TLS hides and a PROXY header precedes (run --workers 1)"
            )
        if self["metrics"] is not None:
            try:
                self["worker-metrics"] = metrics_for_workers(self["metrics"], self["workers"])
            except ValueError as e:
                raise usage.UsageError(f"--metrics with --workers: {e}") from None

    def settings(self) -> Settings:
        return settings_from(self)


class RemoteProxyService(MultiService):
    """The RP: a :class:`~tm3.rp.service.Multiplexer` fed by a listening
    :class:`~tm3.mux.pipes.PipeFactory`; or, as a worker of a ``--workers``
    front (``role``), by the pipes the front passes (tm3/rp/worker.py)."""

    def __init__(self, config: Options, reactor: IProxyReactor, role: WorkerRole | None = None) -> None:
        super().__init__()
        self.setName("tm3rp")
        self.reactor = reactor
        self.destinations = DestinationPolicy(config["destination-rules"], is_own_address=is_local_address)
        self.multiplexer = Multiplexer(reactor, config.settings(), self.destinations)
        self.multiplexer.setServiceParent(self)
        self.pipe_factory = PipeFactory(
            config["pipes"],
            reactor,
            self.multiplexer.start_session,
            allow_from=config["allow-from"],
            max_pending=config["max-pending-pipes"],
            max_per_address=config["max-pending-per-address"],
            key=config["key"],
            allow_v1=config["allow-v1"],
            window=config["initial-window"],
            is_live=self.multiplexer.is_live,
            hello_wait=config["hello-wait"],
            handshake_timeout=config["handshake-timeout"],
        )
        self.listen = config["listen"]
        self.listener: ListeningService | None = None
        self.receiver: PipeReceiver | None = None
        if role is None:
            endpoint = server_from_string(reactor, config["listen"])
            self.listener = ListeningService(endpoint, self.pipe_factory, f"TM3 pipes, {config['pipes']} per session")
            self.listener.setServiceParent(self)
        else:
            assert IReactorFDSet.providedBy(reactor)
            stop = StopOnce(reactor)
            reactor.callWhenRunning(stop.install)
            self.receiver = PipeReceiver(reactor, role.fd, self._adopt, stop)
            self.receiver.setServiceParent(self)
        stats, sessions = self.multiplexer.stats, self.multiplexer.sessions.by_key.values
        if config["metrics"] is not None:
            collector = ProxyCollector("rp", stats, sessions)
            MetricsService(reactor, config["metrics"], collector, "tm3rp").setServiceParent(self)
        SummaryService(
            reactor, "rp", stats, sessions, config["summary-interval"], stop_wait=config["drain-timeout"] + 5
        ).setServiceParent(self)

    def startService(self) -> None:
        try:
            super().startService()
        except CannotListenError as e:
            cannot_start("tm3rp", f"cannot listen on {self.listen}: {os_reason(e.socketError)}")
        self.multiplexer.watch_fds(self.pipe_factory.max_pending)
        if self.listener is None:
            return
        # A carried connection to our own pipe port would join a session as a pipe.
        port = self.listener.port
        pipe_port = getattr(port.getHost(), "port", None) if port is not None else None
        if isinstance(pipe_port, int):
            self.destinations.own_ports.add(pipe_port)

    def when_listening(self) -> Any:
        assert self.listener is not None
        return self.listener.when_listening()

    def _adopt(self, fd: int, family: int, verdict: str) -> None:
        assert IReactorSocket.providedBy(self.reactor)
        pipe = self.pipe_factory.adopt(self.reactor, fd, family, verdict)
        port = getattr(pipe.transport.getHost(), "port", None) if pipe is not None and pipe.transport else None
        if isinstance(port, int):
            # The front's pipe port: a carried connection to it would come back as a pipe.
            self.destinations.own_ports.add(port)

    def stopService(self) -> Any:
        self.pipe_factory.stop()
        return super().stopService()


def makeService(config: Options, reactor: IProxyReactor | None = None) -> MultiService:
    if reactor is None:
        reactor = default_reactor()
    if config["worker"] is None and config["workers"] > 1:
        return FrontService(
            reactor,
            config["listen"],
            config["workers"],
            [*config.argv, "--workers", "1"],
            worker_metrics=config["worker-metrics"],
            allow_from=config["allow-from"],
            max_pending=config["max-pending-pipes"],
            max_per_address=config["max-pending-per-address"],
            hello_wait=config["hello-wait"],
            handshake_timeout=config["handshake-timeout"],
            v1_only=config["key"] is None,
            serves_v1=config["key"] is None or config["allow-v1"],
            drain_timeout=config["drain-timeout"],
        )
    return RemoteProxyService(config, reactor, config["worker"])


def options_from_env(environ: Mapping[str, str] | None = None) -> Options:
    """Options for ``tm3rp.tac``, from ``TM3_*`` environment variables.

    Raises ``usage.UsageError`` naming the variable when one is malformed."""
    environ = os.environ if environ is None else environ
    return options_from_environment(Options, environ, ENVIRONMENT, FLAGS, "TM3_PIPES is required")
