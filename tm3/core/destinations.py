"""Where the RP may connect on an LP's behalf (pure, no I/O).

Without a policy an RP is an open relay into its own host and network: a SYN
to 127.0.0.1 reaches services bound to the RP host's loopback, 169.254.169.254
is a cloud's metadata service, and the RP's own pipe port lets one user's
connection become a pipe of someone's session. So some destinations are
denied unless the operator allows them:

- ``127.0.0.0/8`` (loopback), ``0.0.0.0/8`` ("this host"), ``169.254.0.0/16``
  (link-local: cloud metadata), ``224.0.0.0/4`` (multicast),
  ``255.255.255.255/32`` (broadcast);
- the RP's own pipe port on any of the RP host's addresses (the caller
  says which addresses are its own: that needs the kernel). No rule can
  allow this one: it would let a carried connection join a session as a pipe.

The operator's rules (``--allow-to`` / ``--deny-to CIDR[:PORTS]``) come next,
in the order given, and the first that matches decides; a destination no rule
matches is checked against the other built-in denials, and allowed if none
matches. To allow only some destinations, end with ``--deny-to 0.0.0.0/0``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from attrs import frozen

from tm3.core.addresses import NotIPv4, parse_ipv4


class BadRule(ValueError):
    """A rule that is not ``CIDR[:PORTS]``."""


@frozen
class Rule:
    allow: bool
    network: ipaddress.IPv4Network
    ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges; empty: every port
    text: str = ""

    def matches(self, address: ipaddress.IPv4Address, port: int) -> bool:
        if address not in self.network:
            return False
        return not self.ports or any(low <= port <= high for low, high in self.ports)

    def __str__(self) -> str:
        return f"{'--allow-to' if self.allow else '--deny-to'} {self.text}"


def parse_rule(text: str, allow: bool) -> Rule:
    """``CIDR[:PORTS]``: ``10.0.0.0/8``, ``192.0.2.7`` (one host),
    ``127.0.0.1/32:8080``, ``0.0.0.0/0:25,465,587``, ``10.1.0.0/16:8000-8999``."""
    net_text, sep, ports_text = text.strip().partition(":")
    try:
        if "/" in net_text:
            parse_ipv4(net_text.split("/", 1)[0])  # the strict form of the address part
            network = ipaddress.IPv4Network(net_text, strict=False)
        else:
            network = ipaddress.IPv4Network(parse_ipv4(net_text))
    except (NotIPv4, ValueError) as e:
        raise BadRule(f"{text!r} is not CIDR[:PORTS] ({e})") from None
    ports: list[tuple[int, int]] = []
    if sep:
        for item in ports_text.split(","):
            low_text, dash, high_text = item.strip().partition("-")
            try:
                low = int(low_text, 10)
                high = int(high_text, 10) if dash else low
            except ValueError:
                raise BadRule(f"{text!r}: ports must be N, N-M or a comma-separated list of them") from None
            if not 0 <= low <= high <= 65535:
                raise BadRule(f"{text!r}: port range {item.strip()!r} is outside 0..65535 or reversed")
            ports.append((low, high))
    return Rule(allow, network, tuple(ports), text.strip())


BUILT_IN_DENIALS: tuple[Rule, ...] = tuple(
    parse_rule(text, allow=False)
    for text in ("127.0.0.0/8", "0.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32")
)


@frozen
class Verdict:
    allowed: bool
    rule: str  # what decided, for the log line


class DestinationPolicy:
    """Decides each destination; see the module doc for the order."""

    def __init__(
        self,
        rules: Iterable[Rule] = (),
        own_ports: Iterable[int] = (),
        is_own_address: Callable[[str], bool] | None = None,
    ) -> None:
        self.rules = tuple(rules)
        self.own_ports = set(own_ports)
        self.is_own_address = is_own_address

    def check(self, host: str, port: int) -> Verdict:
        if port in self.own_ports and self.is_own_address is not None and self.is_own_address(host):
            return Verdict(False, f"the RP's own pipe port {port} (never allowed)")
        address = ipaddress.IPv4Address(host)
        for rule in self.rules:
            if rule.matches(address, port):
                return Verdict(rule.allow, str(rule))
        for rule in BUILT_IN_DENIALS:
            if rule.matches(address, port):
                return Verdict(False, f"built-in denial of {rule.text} (allow it with --allow-to)")
        return Verdict(True, "no rule denies it")
