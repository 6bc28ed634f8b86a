"""``tm3lp --redirect IFACE:PORTS``: the iptables rules of ``tm3-redirect``
for exactly as long as the LP runs.

:class:`RedirectRules` is a child service of the LP, started after its
transparent listener (the rules point at the port that listener got) and so
stopped before it: the rules go when the LP stops, whether by
``stopService``, SIGTERM or SIGINT through ``twistd``. A LP killed outright
leaves them; the next start replaces them (``install`` removes any previous
set first), and the systemd unit runs ``tm3-redirect off`` after every stop.

The rules themselves, and how they are installed and removed, are
:mod:`tm3.lp.redirect`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python import usage

from tm3.cli import cannot_start
from tm3.listening import ListeningService
from tm3.lp import redirect
from tm3.lp.redirect import Iptables, IptablesError


def parse_redirect(text: str) -> tuple[str, tuple[int, ...]]:
    """``IFACE:PORT[,PORT...]`` (``eth0:80,443``) -> (iface, ports); the
    interface must exist. Raises ``usage.UsageError`` naming ``--redirect``."""
    iface, sep, ports_text = text.strip().rpartition(":")
    ports = [p.strip() for p in ports_text.split(",")]
    if not sep or not iface or not all(ports):
        raise usage.UsageError(f"--redirect must be IFACE:PORT[,PORT...] (like eth0:80,443), not {text!r}")
    try:
        redirect.validate_interface(iface)
        parsed = tuple(dict.fromkeys(redirect.parse_port(p) for p in ports))
    except redirect.UsageError as e:
        raise usage.UsageError(f"--redirect: {e}") from None
    return iface, parsed


class RedirectRules(Service):
    """Installs the redirect rules at start, for the port ``listener``
    listens on, and removes them at stop."""

    log = Logger()

    def __init__(
        self,
        rp_ip: str,
        iface: str,
        ports: Sequence[int],
        listener: ListeningService,
        find_iptables: Callable[[], Iptables] = Iptables.find,
    ) -> None:
        self.rp_ip = rp_ip
        self.iface = iface
        self.ports = tuple(ports)
        self.listener = listener
        self.find_iptables = find_iptables
        self.iptables: Iptables | None = None

    def startService(self) -> None:
        super().startService()
        port = self.listener.port
        to_port = getattr(port.getHost(), "port", None) if port is not None else None
        if not isinstance(to_port, int):
            cannot_start("tm3lp", "--redirect: the transparent listener has no TCP port to redirect to")
        try:
            config = redirect.make_config(self.rp_ip, self.iface, self.ports, to_port)
            iptables = self.find_iptables()
            replaced = redirect.install(iptables, config)
        except (redirect.UsageError, IptablesError) as e:
            cannot_start("tm3lp", f"--redirect: {e}")
        self.iptables = iptables
        self.log.info(
            "iptables: redirecting TCP ports {ports} (local, and forwarded from {iface}) to port {to_port}; "
            "{rp_ip} exempt{replaced}",
            ports=",".join(str(p) for p in self.ports),
            iface=self.iface,
            to_port=to_port,
            rp_ip=self.rp_ip,
            replaced=" (replacing rules left by an earlier run)" if replaced else "",
        )

    def stopService(self) -> Any:
        super().stopService()
        iptables, self.iptables = self.iptables, None
        if iptables is None:
            return None
        try:
            redirect.remove(iptables)
        except IptablesError as e:
            self.log.error("iptables: cannot remove the redirect rules ({why}); run `tm3-redirect off`", why=e)
        else:
            self.log.info("iptables: redirect rules removed")
        return None
