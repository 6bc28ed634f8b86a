"""``tm3-redirect``: steer chosen TCP ports into the local proxy with iptables.

This module owns the host-side plumbing of TM3's transparent mode, the job the
original TM3 did with a kernel module (``tm3_mod.pl RP_IP IFACE PORT...``,
undone with ``rmmod tm3``). It installs nat-table ``REDIRECT`` rules so that
TCP connections to the chosen destination ports land on the local proxy's
transparent listener, which then reads the real destination back with
:func:`tm3.lp.origdst.original_destination_of`.

Everything lives in two chains of our own, ``TM3_OUTPUT`` and
``TM3_PREROUTING``, each entered by a single jump from the built-in chain, so
``off`` can remove exactly what ``on`` added without touching anyone else's
rules, and ``on`` can replace a previous set instead of stacking a second one.

The rule text is built by pure functions (:func:`build_install_rules`,
:func:`build_removal_rules`, :func:`classify`) that tests exercise without
root; :class:`Iptables` and :func:`main` are the thin part that runs them.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from enum import Enum

from attrs import frozen

from tm3.cli import version_line
from tm3.core.addresses import NotIPv4, parse_ipv4

__all__ = [
    "CHAINS",
    "DEFAULT_TO_PORT",
    "OUTPUT_CHAIN",
    "PREROUTING_CHAIN",
    "EXIT_FAILED",
    "EXIT_NOT_INSTALLED",
    "EXIT_OK",
    "EXIT_USAGE",
    "Iptables",
    "IptablesError",
    "RedirectConfig",
    "State",
    "UsageError",
    "build_install_rules",
    "build_removal_rules",
    "classify",
    "installed_rules",
    "interface_exists",
    "main",
    "make_config",
    "parse_rp_ip",
    "parse_port",
    "validate_interface",
]

PROG = "tm3-redirect"
TABLE = "nat"
OUTPUT_CHAIN = "TM3_OUTPUT"
PREROUTING_CHAIN = "TM3_PREROUTING"
#: Our chain -> the built-in chain that jumps into it.
CHAINS: dict[str, str] = {OUTPUT_CHAIN: "OUTPUT", PREROUTING_CHAIN: "PREROUTING"}
#: The local proxy's transparent listener port.
DEFAULT_TO_PORT = 6001

# Bounded, so a stuck xtables lock held by someone else becomes an error
# message instead of a hung command.
_WAIT_ARGS = ("-w", "10")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: ``status`` when nothing is installed (the LSB "not running" code).
EXIT_NOT_INSTALLED = 3

_IFNAMSIZ = 16


class UsageError(Exception):
    """An argument or the environment is wrong; the message is one line."""


class IptablesError(Exception):
    """An iptables command failed; the message includes its stderr."""


@frozen
class RedirectConfig:
    """A validated ``tm3-redirect on`` request."""

    rp_ip: ipaddress.IPv4Address
    iface: str
    ports: tuple[int, ...]
    to_port: int = DEFAULT_TO_PORT


# --- validation (pure, apart from the interface lookup, which is injectable) --


def parse_rp_ip(text: str) -> ipaddress.IPv4Address:
    """Parse the remote proxy's address; it must be a unicast IPv4 address."""
    try:
        address = parse_ipv4(text)
    except NotIPv4:
        raise UsageError(f"RP_IP {text!r} is not an IPv4 address (dotted quad, e.g. 192.0.2.7)") from None
    if address.is_unspecified or address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        raise UsageError(f"RP_IP {text} is not a unicast address")
    return address


def parse_port(text: str | int, what: str = "PORT") -> int:
    """Parse a TCP port number, 1..65535."""
    try:
        port = int(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not a number (1..65535)") from None
    if not 1 <= port <= 65535:
        raise UsageError(f"{what} {port} is out of range (1..65535)")
    return port


def interface_exists(name: str) -> bool:
    """Whether ``name`` is a network interface in this network namespace."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def validate_interface(name: str, exists: Callable[[str], bool] = interface_exists) -> str:
    """Check that ``name`` is a plausible interface name and that it exists."""
    if not name or len(name) >= _IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise UsageError(f"IFACE {name!r} is not a valid interface name")
    if not exists(name):
        raise UsageError(
            f"IFACE {name!r} does not exist (see `ip link`); it names the interface forwarded client traffic arrives on"
        )
    return name


def make_config(
    rp_ip: str,
    iface: str,
    ports: Iterable[str | int],
    to_port: str | int = DEFAULT_TO_PORT,
    exists: Callable[[str], bool] = interface_exists,
) -> RedirectConfig:
    """Validate the ``on`` arguments into a :class:`RedirectConfig`.

    Duplicate ports are dropped (first occurrence kept), so the rule list has
    no duplicates either.
    """
    target = parse_port(to_port, "--to-port")
    unique: dict[int, None] = {}
    for text in ports:
        unique[parse_port(text)] = None
    if not unique:
        raise UsageError("give at least one PORT to redirect")
    if target in unique:
        # Traffic already headed for the proxy's port is exempt (see
        # build_install_rules), so this PORT would silently do nothing.
        raise UsageError(f"PORT {target} is the proxy's own port (--to-port); it cannot also be redirected")
    return RedirectConfig(
        rp_ip=parse_rp_ip(rp_ip),
        iface=validate_interface(iface, exists),
        ports=tuple(unique),
        to_port=target,
    )


# --- rule building (pure) ----------------------------------------------------


def _chain_rules(chain: str, config: RedirectConfig) -> list[list[str]]:
    add = ["-t", TABLE, "-A", chain]
    rules = [
        ["-t", TABLE, "-N", chain],
        # The LP's own pipes go to the RP, often on a redirected port: never
        # send them back into the LP.
        [*add, "-d", f"{config.rp_ip}/32", "-j", "RETURN"],
        [*add, "-d", "127.0.0.0/8", "-j", "RETURN"],
        # Connections to this host itself (any of its addresses) are not
        # transit traffic; redirecting them would hijack local services.
        [*add, "-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN"],
        # Already bound for the proxy: leave it alone rather than rewrite.
        [*add, "-p", "tcp", "--dport", str(config.to_port), "-j", "RETURN"],
    ]
    rules.extend(
        [*add, "-p", "tcp", "--dport", str(port), "-j", "REDIRECT", "--to-ports", str(config.to_port)]
        for port in config.ports
    )
    return rules


def build_install_rules(config: RedirectConfig) -> list[list[str]]:
    """The iptables argument vectors (after ``iptables -w 10``) for ``on``.

    Chains are filled before the jumps into them are inserted, so no packet
    ever sees a half-built chain. Jumps are inserted at position 1 so the
    redirect wins over NAT rules other software appended.
    """
    return [
        *_chain_rules(OUTPUT_CHAIN, config),
        *_chain_rules(PREROUTING_CHAIN, config),
        ["-t", TABLE, "-I", "OUTPUT", "1", "-p", "tcp", "-j", OUTPUT_CHAIN],
        ["-t", TABLE, "-I", "PREROUTING", "1", "-i", config.iface, "-p", "tcp", "-j", PREROUTING_CHAIN],
    ]


def _tokens(line: str) -> list[str]:
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


def _is_jump_to_ours(tokens: Sequence[str]) -> bool:
    if len(tokens) < 2 or tokens[0] != "-A" or tokens[1] in CHAINS:
        return False
    for i, token in enumerate(tokens[:-1]):
        if token in ("-j", "--jump") and tokens[i + 1] in CHAINS:
            return True
    return False


def _is_ours(tokens: Sequence[str]) -> bool:
    if len(tokens) >= 2 and tokens[0] in ("-N", "-A") and tokens[1] in CHAINS:
        return True
    return _is_jump_to_ours(tokens)


def installed_rules(listing: str) -> list[str]:
    """The lines of ``iptables -t nat -S`` output that ``tm3-redirect`` owns."""
    return [line for line in listing.splitlines() if _is_ours(_tokens(line))]


def build_removal_rules(listing: str) -> list[list[str]]:
    """The argument vectors that undo whatever ``on`` left, from ``-t nat -S``.

    Works from what is actually installed rather than from a config, so it
    also removes a set installed with a different IFACE, or left half-built
    by an interrupted ``on``. Jumps go first: a chain still referenced cannot
    be deleted.
    """
    jumps: list[list[str]] = []
    chains: list[str] = []
    for line in listing.splitlines():
        tokens = _tokens(line)
        if _is_jump_to_ours(tokens):
            jumps.append(["-t", TABLE, "-D", *tokens[1:]])
        elif len(tokens) == 2 and tokens[0] == "-N" and tokens[1] in CHAINS:
            chains.append(tokens[1])
    flushes = [["-t", TABLE, "-F", chain] for chain in chains]
    deletes = [["-t", TABLE, "-X", chain] for chain in chains]
    return [*jumps, *flushes, *deletes]


class State(Enum):
    """How much of a rule set is present."""

    ABSENT = "not installed"
    INSTALLED = "installed"
    PARTIAL = "partially installed (run `tm3-redirect off` to clean up)"


def classify(listing: str) -> State:
    """Whether both chains and both jumps into them are present."""
    chains: set[str] = set()
    jumped: set[str] = set()
    for line in listing.splitlines():
        tokens = _tokens(line)
        if len(tokens) == 2 and tokens[0] == "-N" and tokens[1] in CHAINS:
            chains.add(tokens[1])
        elif _is_jump_to_ours(tokens):
            jumped.update(t for t in tokens if t in CHAINS)
    if not chains and not jumped:
        return State.ABSENT
    if chains == jumped == set(CHAINS):
        return State.INSTALLED
    return State.PARTIAL


# --- the thin runner ---------------------------------------------------------


class Iptables:
    """Runs ``iptables -w 10 ARGS...`` and turns failures into exceptions."""

    def __init__(self, executable: str) -> None:
        self.executable = executable

    @classmethod
    def find(cls) -> Iptables:
        """Locate ``iptables`` on PATH, or raise :class:`UsageError`."""
        found = shutil.which("iptables")
        if found is None:
            raise UsageError("iptables not found on PATH (install it, e.g. `apt-get install iptables`)")
        return cls(found)

    def run(self, args: Sequence[str]) -> str:
        """Run one command; return its stdout."""
        try:
            done = subprocess.run(
                [self.executable, *_WAIT_ARGS, *args],
                capture_output=True,
                text=True,
                check=False,
            )
        except OSError as e:
            raise IptablesError(f"cannot run {self.executable}: {e}") from e
        if done.returncode != 0:
            reason = " ".join(done.stderr.split()) or f"exit {done.returncode}"
            raise IptablesError(f"`iptables {shlex.join(args)}` failed: {reason}")
        return done.stdout

    def listing(self) -> str:
        """The whole nat table as ``iptables -S`` rule specs."""
        return self.run(["-t", TABLE, "-S"])

    def run_all(self, rules: Iterable[Sequence[str]]) -> int:
        """Run rules in order, stopping at the first failure; return the count."""
        count = 0
        for rule in rules:
            self.run(rule)
            count += 1
        return count


def remove(iptables: Iptables) -> int:
    """Remove everything ``on`` installed; return how many commands it took."""
    return iptables.run_all(build_removal_rules(iptables.listing()))


def install(iptables: Iptables, config: RedirectConfig) -> bool:
    """Replace any previous rule set with ``config``'s; True if one existed.

    On failure the partial set is removed again before the error propagates,
    so a failed ``on`` leaves the table as clean as ``off`` would.
    """
    replaced = remove(iptables) > 0
    try:
        iptables.run_all(build_install_rules(config))
    except IptablesError:
        try:
            remove(iptables)
        except IptablesError:
            pass  # the original error is the one worth reporting
        raise
    return replaced


# --- command line ------------------------------------------------------------

_DESCRIPTION = """\
Redirect TCP connections for chosen destination ports into the TM3 local
proxy's transparent listener (the iptables equivalent of the original TM3
`tm3_mod.pl RP_IP IFACE PORT...` / `rmmod tm3`)."""

_EPILOG = f"""\
what `on` installs (IPv4, nat table, chains {OUTPUT_CHAIN} and {PREROUTING_CHAIN}):
  - connections made by this host (OUTPUT) and connections forwarded through
    it that arrive on IFACE (PREROUTING -i IFACE) whose TCP destination port
    is one of PORT... are REDIRECTed to local port --to-port;
  - never redirected: traffic to RP_IP (the proxy's own pipes), to 127.0.0.0/8
    or any other local address, and traffic already bound for --to-port.
  `on` replaces a previous set; `off` removes exactly what `on` added.

notes:
  - forwarded traffic (this host as a router for clients behind IFACE) also
    needs IP forwarding: sysctl -w net.ipv4.ip_forward=1 (not changed here).
  - REDIRECT sends forwarded connections to IFACE's primary address, so the
    local proxy must listen on 0.0.0.0:PORT, not only on 127.0.0.1.
  - IPv6 traffic is not redirected.

exit status: 0 ok; 1 an iptables command failed; 2 bad arguments, not root,
or iptables missing; 3 `status` found nothing installed."""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_line(PROG))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    on = commands.add_parser(
        "on",
        help="install (or replace) the redirect rules",
        description="Install (or replace) the redirect rules.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    on.add_argument("rp_ip", metavar="RP_IP", help="remote proxy address (never redirected)")
    on.add_argument("iface", metavar="IFACE", help="interface forwarded client traffic arrives on")
    on.add_argument("ports", metavar="PORT", nargs="+", help="destination TCP port(s) to redirect")
    on.add_argument(
        "--to-port",
        metavar="P",
        default=str(DEFAULT_TO_PORT),
        help=f"local proxy's transparent listener port (default {DEFAULT_TO_PORT})",
    )
    commands.add_parser("off", help="remove the redirect rules (idempotent)")
    commands.add_parser("status", help=f"print the installed rules (exit {EXIT_NOT_INSTALLED} if none)")
    return parser


def _require_root() -> None:
    if os.geteuid() != 0:
        raise UsageError("must be run as root: changing iptables needs CAP_NET_ADMIN (try sudo)")


def _on(iptables: Iptables, config: RedirectConfig) -> int:
    replaced = install(iptables, config)
    ports = ",".join(str(p) for p in config.ports)
    print(
        f"{PROG}: {'replaced previous rules; ' if replaced else ''}"
        f"redirecting TCP ports {ports} (local, and forwarded from "
        f"{config.iface}) to local port {config.to_port}; "
        f"{config.rp_ip} exempt"
    )
    return EXIT_OK


def _off(iptables: Iptables) -> int:
    if remove(iptables) == 0:
        print(f"{PROG}: nothing installed")
    else:
        print(f"{PROG}: rules removed")
    return EXIT_OK


def _status(iptables: Iptables) -> int:
    listing = iptables.listing()
    state = classify(listing)
    print(f"{PROG}: {state.value}")
    for line in installed_rules(listing):
        print(line)
    return EXIT_NOT_INSTALLED if state is State.ABSENT else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tm3-redirect`` console script."""
    args = _build_parser().parse_args(argv)
    try:
        config = None
        if args.command == "on":
            config = make_config(args.rp_ip, args.iface, args.ports, args.to_port)
        _require_root()
        iptables = Iptables.find()
        if config is not None:
            return _on(iptables, config)
        if args.command == "off":
            return _off(iptables)
        return _status(iptables)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except IptablesError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
