"""``twistd tm3lp``: the local proxy's options and service.

One code path, two ways in: the ``tm3lp`` plugin calls :func:`makeService`,
and ``tm3lp.tac`` calls it too, with options taken from ``TM3_*`` variables
(:func:`options_from_env`).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping

from twisted.internet import endpoints
from twisted.python import usage

from tm3.cli import ProxyOptions
from tm3.core.addresses import NotIPv4
from tm3.lp.clients import forward_factory, socks_factory, transparent_factory
from tm3.lp.resolver import (
    DEFAULT_RESOLVE_TIMEOUT,
    DEFAULT_RESOLVER,
    DEFAULT_RESOLVER_THREADS,
    RESOLVERS,
    make_resolver,
    parse_dns_server,
)
from tm3.lp.rules import RedirectRules, parse_redirect
from tm3.lp.service import LocalProxy, resolve_ipv4
from tm3.metrics import MetricsService, ProxyCollector
from tm3.mux.settings import Settings
from tm3.options import (
    OBSERVE_PARAMETERS,
    TUNING_ENVIRONMENT,
    TUNING_PARAMETERS,
    check_client_endpoint,
    check_server_endpoint,
    options_from_environment,
    parse_choice,
    parse_int,
    parse_observe,
    parse_seconds,
    parse_tuning,
    read_key_file,
    settings_from,
)
from tm3.reactor import IProxyReactor, default_reactor
from tm3.summary import SummaryService

DEFAULT_RP_PORT = 6000
SOCKS_TIMEOUT = 10.0

ENVIRONMENT = {
    **TUNING_ENVIRONMENT,
    "TM3_REMOTE": "remote",
    "TM3_PIPES": "pipes",
    "TM3_KEY_FILE": "key-file",
    "TM3_HANDSHAKE_TIMEOUT": "handshake-timeout",
    "TM3_SOCKS": "socks",
    "TM3_SOCKS_TIMEOUT": "socks-timeout",
    "TM3_RESOLVER": "resolver",
    "TM3_RESOLVE_TIMEOUT": "resolve-timeout",
    "TM3_RESOLVER_THREADS": "resolver-threads",
    "TM3_DNS_SERVER": "dns-server",  # servers separated by commas or spaces
    "TM3_TRANSPARENT": "transparent",
    "TM3_FORWARD": "forward",  # specs separated by spaces
    "TM3_REDIRECT": "redirect",
    "TM3_METRICS": "metrics",
    "TM3_LOG_FORMAT": "log-format",
    "TM3_SUMMARY_INTERVAL": "summary-interval",
}


# Client endpoint types --remote takes as an endpoint string; anything else is
# HOST[:PORT].
ENDPOINT_TYPES = ("tcp", "tls", "ssl", "unix")


REMOTE_FORMS = "HOST, HOST:PORT, [IPV6]:PORT or a client endpoint string (tcp:HOST:PORT, tls:HOST:PORT:...)"


def parse_remote(text: str, connect_timeout: float) -> str:
    """The RP as a Twisted client endpoint string: ``tcp:HOST:PORT``,
    ``tls:HOST:PORT:trustRoots=...`` and the like as given (an IPv6 address
    may be written ``[::1]`` in them), or ``HOST[:PORT]``, ``[IPV6][:PORT]``
    or a bare IPv6 address made into ``tcp:host=...:port=...`` (a name is
    resolved to IPv4 once, now)."""
    kind = text.split(":", 1)[0].strip().lower()
    if kind in ENDPOINT_TYPES:
        text = re.sub(r"\[([0-9A-Fa-f:.]+)\]", lambda m: m.group(1).replace(":", "\\:"), text)
        check_client_endpoint("remote", text)
        return text
    if re.fullmatch(r"[a-z][a-z0-9+-]*", kind) and "=" in text:
        raise usage.UsageError(
            f"--remote: {kind!r} is not a client endpoint type here (tcp, tls, ssl, unix), in {text!r}"
        )
    m = re.fullmatch(r"\[([^\]]+)\](?::(.*))?", text)
    if m:
        host, port_text = m.group(1), m.group(2) or str(DEFAULT_RP_PORT)
    elif text.count(":") > 1:
        host, port_text = text, str(DEFAULT_RP_PORT)  # a bare IPv6 address
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, str(DEFAULT_RP_PORT)
    if not host:
        raise usage.UsageError(f"--remote must be {REMOTE_FORMS}, not {text!r}")
    port = parse_int("remote port", port_text, 1, 65535)
    if ":" in host:
        try:
            address = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise usage.UsageError(f"--remote: {host!r} is not an IPv6 address (in {text!r})") from None
        return f"tcp:host={address.replace(':', chr(92) + ':')}:port={port}:timeout={connect_timeout:g}"
    return f"tcp:host={_resolve('remote', host)}:port={port}:timeout={connect_timeout:g}"


def _resolve(option: str, host: str) -> str:
    try:
        return resolve_ipv4(host)
    except NotIPv4 as e:
        raise usage.UsageError(f"--{option}: {e}") from None
    except OSError as e:
        raise usage.UsageError(f"--{option}: cannot resolve {host!r} to an IPv4 address ({e})") from None


def _dns_server(text: str) -> tuple[str, int]:
    try:
        return parse_dns_server(text)
    except ValueError as e:
        raise usage.UsageError(
            f"--dns-server must be HOST[:PORT] with HOST an IPv4 address, not {text!r}: {e}"
        ) from None


def remote_ipv4(description: str) -> str | None:
    """The RP's IPv4 address in a parsed ``--remote`` (a client endpoint
    string), resolving a name; ``None`` for a ``unix:`` RP."""
    args, kwargs = endpoints._parse(description)
    if "endpoint" in kwargs:  # tls:...:endpoint=tcp\:ADDRESS\:PORT dials ADDRESS
        return remote_ipv4(kwargs["endpoint"])
    if args[0].lower() == "unix":
        return None
    host = kwargs.get("host") or (args[1] if len(args) > 1 else None)
    if host and ":" in host:
        return None  # IPv6 pipes: IPv4 redirect rules never catch them
    return _resolve("remote", host) if host else None


def parse_forward(text: str) -> tuple[str, str, int]:
    """``LISTEN_ENDPOINT:HOST:PORT``; the endpoint may itself contain colons."""
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise usage.UsageError(f"--forward must be LISTEN_ENDPOINT:HOST:PORT (like tcp:8080:10.0.0.5:80), not {text!r}")
    listen, host, port_text = parts
    port = parse_int("forward port", port_text, 1, 65535)
    return listen, _resolve("forward", host), port


DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """Twisted's TCP endpoints default to a listen backlog of 50, which drops
    SYNs when many clients connect at once (seen at 10,000 connections);
    give application listeners a deeper one unless the user chose."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={DEFAULT_BACKLOG}"
    return description


class Options(ProxyOptions):
    command = "tm3lp"
    synopsis = "--remote HOST[:PORT]|ENDPOINT --pipes N [--socks ENDPOINT] [--transparent ENDPOINT] [--forward SPEC]..."
    longdesc = (
        "TM3 local proxy (LP). Opens N pipes to the TM3 remote proxy and carries the "
        "application connections it intercepts over them. Give at least one way in: "
        "--socks (SOCKS5, no root needed), --transparent (connections redirected by "
        "iptables; see tm3-redirect and --redirect), or --forward (a fixed destination). TCP listeners "
        f"get backlog={DEFAULT_BACKLOG} unless the endpoint string sets one. While no session to the RP is up, "
        "transparent and forward clients wait in the listening socket's backlog; SOCKS clients are accepted "
        "and get reply 0x03 (network unreachable) if none is up within --socks-timeout."
    )
    optParameters = [
        ["remote", "r", None, f"The RP: HOST or HOST:PORT (port default {DEFAULT_RP_PORT}; names are resolved to IPv4 "
         "once at start), an IPv6 address (::1, [::1]:6000), or a Twisted client endpoint string: tcp:HOST:PORT "
         "(tcp:[::1]:6000), or tls:HOST:PORT:trustRoots=CA_DIR "
         "[:certificate=CERT.pem:privateKey=KEY.pem] for TLS pipes (mutual with a client certificate)."],
        ["key-file", None, None, "File holding the key shared with the RP (at least 32 characters): speak protocol v2 "
         "(authenticated pipes, a window per connection). The RP needs the same --key-file."],
        ["handshake-timeout", None, "10", "v2: seconds the RP has to answer a pipe's hello (0 < s <= 600)."],
        ["pipes", "n", None, "Pipes to open to the RP (required, 1..1024; the RP must expect the same number)."],
        ["socks", "s", None, "Listen for SOCKS5 clients (CONNECT, no auth) on this server endpoint, like tcp:1080:interface=127.0.0.1."],
        ["socks-timeout", None, str(SOCKS_TIMEOUT).removesuffix(".0"), "Seconds a SOCKS client has, from connecting to "
         "the reply: a client that has not sent its whole request by then is closed; one whose request waits for "
         "a session to the RP gets reply 0x03 (network unreachable) (0 < s <= 3600)."],
        ["resolver", None, DEFAULT_RESOLVER, "How SOCKS names are resolved: 'dns' (/etc/hosts, then DNS queries to "
         "resolv.conf's servers or --dns-server, no threads: a slow name delays no other) or 'system' (getaddrinfo, "
         "so nsswitch applies: mDNS, NIS, resolv.conf's search list; on --resolver-threads threads). IPv4 literals "
         "and localhost are never looked up."],
        ["resolve-timeout", None, None, "Seconds a SOCKS name may take to resolve; then the client gets reply 0x04 "
         f"(host unreachable) (0 < s < --socks-timeout; default {DEFAULT_RESOLVE_TIMEOUT:g}, or half --socks-timeout "
         "if that is less)."],
        ["resolver-threads", None, str(DEFAULT_RESOLVER_THREADS), "--resolver system: names looked up at once (one "
         "thread each; a lookup cannot be interrupted); a new name while all are busy gets reply 0x01 at once "
         "(1..1024)."],
        ["transparent", "t", None, "Listen for iptables-redirected connections on this server endpoint, like tcp:6001."],
        ["redirect", None, None, "IFACE:PORT[,PORT...] (like eth0:80,443): with --transparent, install the iptables "
         "rules tm3-redirect installs, for these destination ports, to the transparent listener's port, while the LP "
         "runs (removed when it stops). Needs root or CAP_NET_ADMIN."],
        *TUNING_PARAMETERS,
        *OBSERVE_PARAMETERS,
    ]  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self["forward"] = []
        self["dns-server"] = []

    def opt_forward(self, spec: str) -> None:
        """LISTEN_ENDPOINT:HOST:PORT: carry every connection accepted on the endpoint to HOST:PORT (repeatable)."""
        self["forward"].extend(spec.split())  # TM3_FORWARD holds several, separated by spaces

    opt_f = opt_forward

    def opt_dns_server(self, servers: str) -> None:
        """HOST[:PORT] (IPv4 address, port 53 by default): --resolver dns asks it, not resolv.conf's (repeatable)."""
        self["dns-server"].extend(servers.replace(",", " ").split())

    def postOptions(self) -> None:
        if self["remote"] is None:
            raise usage.UsageError(f"--remote is required: the RP's {REMOTE_FORMS}")
        if self["pipes"] is None:
            raise usage.UsageError("--pipes is required: how many pipes to open to the RP (1..1024)")
        self["pipes"] = parse_int("pipes", self["pipes"], 1, 1024)
        parse_tuning(self)
        parse_observe(self)
        self["remote-display"] = self["remote"]
        self["remote"] = parse_remote(self["remote"], self["connect-timeout"])
        self["handshake-timeout"] = parse_seconds("handshake-timeout", self["handshake-timeout"], 0, 600)
        self["socks-timeout"] = parse_seconds("socks-timeout", self["socks-timeout"], 0, 3600)
        self["resolver"] = parse_choice("resolver", self["resolver"], RESOLVERS)
        if self["resolve-timeout"] is None:
            self["resolve-timeout"] = min(DEFAULT_RESOLVE_TIMEOUT, self["socks-timeout"] / 2)
        self["resolve-timeout"] = parse_seconds("resolve-timeout", self["resolve-timeout"], 0, 3600)
        if self["resolve-timeout"] >= self["socks-timeout"]:
            raise usage.UsageError(
                f"--resolve-timeout must be below --socks-timeout ({self['socks-timeout']:g} s), the time a SOCKS "
                f"client has in all, not {self['resolve-timeout']:g}"
            )
        self["resolver-threads"] = parse_int("resolver-threads", self["resolver-threads"], 1, 1024)
        self["dns-server"] = [_dns_server(text) for text in self["dns-server"]]
        if self["dns-server"] and self["resolver"] != "dns":
            raise usage.UsageError("--dns-server goes with --resolver dns: getaddrinfo asks resolv.conf's servers")
        self["key"] = read_key_file("key-file", self["key-file"]) if self["key-file"] is not None else None
        self["forward"] = [parse_forward(spec) for spec in self["forward"]]
        if not (self["socks"] or self["transparent"] or self["forward"]):
            raise usage.UsageError("give at least one of --socks, --transparent or --forward: the LP has no way in")
        for option, desc in [("socks", self["socks"]), ("transparent", self["transparent"])] + [
            ("forward", f[0]) for f in self["forward"]
        ]:
            if desc is not None:
                check_server_endpoint(option, desc)
        self["rp-ip"] = None
        if self["redirect"] is not None:
            if not self["transparent"]:
                raise usage.UsageError("--redirect goes with --transparent: the rules send connections to its port")
            self["redirect"] = parse_redirect(self["redirect"])
            self["rp-ip"] = remote_ipv4(self["remote"])
            if self["rp-ip"] is None:
                raise usage.UsageError("--redirect needs an RP with an IPv4 address (--remote), to exempt its pipes")

    def settings(self) -> Settings:
        return settings_from(self)


def makeService(config: Options, reactor: IProxyReactor | None = None) -> LocalProxy:
    if reactor is None:
        reactor = default_reactor()
    proxy = LocalProxy(
        reactor,
        endpoints.clientFromString(reactor, config["remote"]),
        config["pipes"],
        config.settings(),
        remote=config["remote-display"],
        key=config["key"],
        handshake_timeout=config["handshake-timeout"],
        resolver=make_resolver(
            reactor,
            config["resolver"],
            config["resolve-timeout"],
            config["resolver-threads"],
            config["dns-server"] or None,
        ),
    )
    if config["socks"]:
        proxy.add_listener(
            endpoints.serverFromString(reactor, with_backlog(config["socks"])),
            socks_factory(proxy, config["socks-timeout"]),
            "SOCKS5",
            address=config["socks"],
            always_accept=True,
        )
    transparent = None
    if config["transparent"]:
        transparent = proxy.add_listener(
            endpoints.serverFromString(reactor, with_backlog(config["transparent"])),
            transparent_factory(proxy),
            "transparent",
            address=config["transparent"],
        )
    for listen, fhost, fport in config["forward"]:
        proxy.add_listener(
            endpoints.serverFromString(reactor, with_backlog(listen)),
            forward_factory(proxy, fhost, fport),
            f"forward to {fhost}:{fport}",
            address=listen,
        )
    sessions = proxy.sessions.by_key.values
    if config["metrics"] is not None:
        MetricsService(
            reactor, config["metrics"], ProxyCollector("lp", proxy.stats, sessions), "tm3lp"
        ).setServiceParent(proxy)
    SummaryService(
        reactor, "lp", proxy.stats, sessions, config["summary-interval"], stop_wait=config["drain-timeout"] + 5
    ).setServiceParent(proxy)
    if config["redirect"] is not None and transparent is not None:
        # The last child: it starts once every listener listens (the rules
        # need the transparent port, and a listener that cannot listen stops
        # the LP before any rule is in), and stops first.
        iface, ports = config["redirect"]
        RedirectRules(config["rp-ip"], iface, ports, transparent).setServiceParent(proxy)
    return proxy


def options_from_env(environ: Mapping[str, str] | None = None) -> Options:
    """Options for ``tm3lp.tac``, from ``TM3_*`` environment variables.

    Raises ``usage.UsageError`` naming the variable when one is malformed."""
    environ = os.environ if environ is None else environ
    return options_from_environment(
        Options,
        environ,
        ENVIRONMENT,
        {},
        "TM3_REMOTE, TM3_PIPES and one of TM3_SOCKS, TM3_TRANSPARENT or TM3_FORWARD are required",
    )
