"""An emulated wide-area link between two namespaces: delay, random loss and
a rate limit on one :class:`~tests.support.netns.Link` of a topology.

This kernel has no netem (and no fq), so each property is built from what it
does have, at both ends of the veth pair:

* **delay**: each end sends the packets *arriving* on its interface to an
  NFQUEUE, served by :mod:`tests.support.delayd` inside that end's namespace,
  which holds each packet RTT/2 and then accepts it, in arrival order. Delay
  on ingress, not egress: a packet held on the sender's side still counts
  against TCP small queues (it is not freed until it leaves the device), and
  with 20 ms held there TCP runs at about 2 Mbit/s. On ingress the sender has
  long let go of it.
* **loss**: an iptables ``statistic --mode random`` DROP, also on ingress at
  each end, so each direction loses ``loss`` of its packets. On ingress
  because a DROP in OUTPUT is reported to the sender (``sendto`` fails with
  EPERM, TCP sees a local error), which a lossy wire never does. The DROP
  comes before the queue: a lost packet costs the daemon nothing.
* **rate**: ``tc qdisc ... root tbf`` on each end's egress, so the order on
  the way is shaper, wire (the loss), propagation (the delay), as on a real
  link. Its burst is 2 ms at the rate but at least two full frames; its queue
  (tbf's ``latency``) defaults to one round trip, at least 20 ms: the classic
  one bandwidth-delay product of buffer, enough for one TCP flow to fill the
  link.
* **offloads off** (``ethtool -K IF tso off gso off gro off``) on both ends,
  so packets cross the link as MTU-sized frames: loss and delay then hit
  what a real wire would carry, not 64 KiB super-packets.

The iptables rules live in the ``raw`` table's PREROUTING, in a chain of
their own per interface (``TM3WAN-<iface>``): PREROUTING sees both packets for
the host and packets it forwards (one rule where INPUT and FORWARD would need
two), ``raw`` comes before connection tracking and NAT (the packet reaches
conntrack and TM3's REDIRECT rules only after its time on the "wire"), and a
chain of our own survives tools that flush the filter table's chains (as
``benchmarks/loss.py`` does). The NFQUEUE rule has no ``--queue-bypass``: if
a daemon dies, the link stops carrying anything instead of quietly losing its
delay. IPv4 only (the topologies are IPv4; IPv6 neighbour discovery on the
veths is neither delayed nor dropped).

Use::

    t = build_wan_topology(topo, WanSpec(rtt_ms=40, loss=0.01, rate_mbit=50))
    t.client.run(["ping", "-U", "-c", "5", t.web_ip])      # ~40 ms
    t.wan.reconfigure(WanSpec(rtt_ms=80))                   # change it live
    t.wan.ingress_counters(t.rp)                            # client->rp packets seen / dropped

or on any link of a :class:`~tests.support.netns.Topology`::

    wan = WanLink(topo.link_between("a", "b"), WanSpec(rtt_ms=10)).start()

The link undoes itself when the topology closes (or on :meth:`WanLink.close`).
Note that ``ping`` without ``-U`` reports the RTT less the receiving end's
half of the delay: the kernel stamps a packet on arrival, before the queue.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import select
import signal
import subprocess
import time

from attrs import frozen

from tests.support.netns import Host, Link, NetnsError, TM3Topology, Topology, build_tm3_topology
from tests.support.processes import cpu_seconds

__all__ = [
    "IngressCounters",
    "WanLink",
    "WanSpec",
    "WanTopology",
    "build_wan_topology",
    "netfilterqueue_missing_reason",
]

#: Bytes a frame takes in tbf's accounting (Ethernet header included) at MTU 1500.
FRAME_BYTES = 1514
_READY_TIMEOUT = 15.0
_queue_numbers = itertools.count(100)


@frozen
class WanSpec:
    """What the link should look like. All-zero (the default) is a plain veth."""

    #: Round-trip time added by the link, in ms; each direction gets half.
    rtt_ms: float = 0.0
    #: Probability that a packet is lost, in each direction independently (0..1).
    loss: float = 0.0
    #: Rate limit in each direction, in Mbit/s (Ethernet frames, headers
    #: included), or None for none.
    rate_mbit: float | None = None
    #: How long the rate limiter may queue a packet (tbf ``latency``), in ms;
    #: None: one round trip, at least 20 ms.
    queue_ms: float | None = None

    def __attrs_post_init__(self) -> None:
        if self.rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, not {self.rtt_ms}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), not {self.loss}")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise ValueError(f"rate_mbit must be > 0, not {self.rate_mbit}")
        if self.queue_ms is not None and self.queue_ms <= 0:
            raise ValueError(f"queue_ms must be > 0, not {self.queue_ms}")

    @property
    def one_way_delay_ms(self) -> float:
        return self.rtt_ms / 2

    def tbf_args(self) -> list[str]:
        """``tc qdisc ... tbf`` parameters for :attr:`rate_mbit` (which must be set)."""
        if self.rate_mbit is None:
            raise ValueError("no rate set")
        rate_bps = self.rate_mbit * 1e6
        burst = max(2 * FRAME_BYTES, int(rate_bps / 8 * 0.002))
        queue_ms = self.queue_ms if self.queue_ms is not None else max(self.rtt_ms, 20.0)
        return ["rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", f"{queue_ms:g}ms"]


@frozen
class IngressCounters:
    """What arrived on one end of the link since the last reset."""

    #: IPv4 packets that arrived on the interface (before the loss).
    arrived: int
    #: Of these, dropped by the loss rule.
    dropped: int
    #: Dropped by the kernel because the delay daemon's queue was full
    #: (``queue_dropped``) or its socket overflowed (``user_dropped``);
    #: since the daemon started, not resettable.
    overflowed: int


def netfilterqueue_missing_reason() -> str | None:
    """Why the delay daemon cannot run with this Python, or None if it can."""
    if importlib.util.find_spec("netfilterqueue") is None:
        return (
            "the delay daemon needs the netfilterqueue package in this Python: "
            "run scripts/setup as root (it installs libnetfilter-queue-dev and netfilterqueue)"
        )
    return None


class _End:
    """One end of the link: a host, its interface, and its delay daemon."""

    def __init__(self, host: Host, iface: str) -> None:
        self.host = host
        self.iface = iface
        self.chain = f"TM3WAN-{iface}"
        self.queue_num = next(_queue_numbers)
        self.daemon: subprocess.Popen[str] | None = None
        #: The daemon's last ``delayd stats`` line, once it has stopped.
        self.last_stats: str | None = None

    def iptables(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.host.run(["iptables", "-w", "10", "-t", "raw", *args], check=check)


class WanLink:
    """Delay, loss and a rate limit on a veth :class:`Link`; see the module docstring.

    :meth:`start` applies the spec (and registers :meth:`close` with the
    topology), :meth:`reconfigure` changes it in place, :meth:`close` takes it
    all away again, leaving a plain veth pair.
    """

    def __init__(self, link: Link, spec: WanSpec | None = None) -> None:
        self.link = link
        self.spec = spec or WanSpec()
        self.ends = (_End(link.a, link.a_iface), _End(link.b, link.b_iface))
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        a, b = self.link.a, self.link.b
        return f"WanLink({a.name}:{self.link.a_iface} <-> {b.name}:{self.link.b_iface}, {self.spec})"

    def __enter__(self) -> WanLink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- life cycle -------------------------------------------------------

    def start(self) -> WanLink:
        """Turn offloads off and apply :attr:`spec`; return ``self``."""
        if self._started:
            raise NetnsError(f"{self!r} already started")
        self._started = True
        self.link.a.topology.add_cleanup(self.close)
        for end in self.ends:
            end.host.run(["ethtool", "-K", end.iface, "tso", "off", "gso", "off", "gro", "off"])
            end.iptables("-N", end.chain)
            end.iptables("-A", "PREROUTING", "-i", end.iface, "-j", end.chain)
        self._apply(self.spec, restart_daemons=True)
        return self

    def reconfigure(self, spec: WanSpec) -> None:
        """Change the link to ``spec``. A new delay restarts the daemons (the
        packets they hold are let through at once)."""
        if not self._started or self._closed:
            raise NetnsError(f"{self!r} is not running")
        restart = spec.rtt_ms != self.spec.rtt_ms
        self._apply(spec, restart_daemons=restart)

    def close(self) -> None:
        """Remove the rules, the rate limit and the daemons. Safe to call twice.

        The rules go first, so nothing new reaches a daemon; each daemon then
        lets through what it still holds, reports its stats (kept in
        :meth:`daemon_stats`) and exits.
        """
        if self._closed or not self._started:
            return
        self._closed = True
        for end in self.ends:
            end.iptables("-D", "PREROUTING", "-i", end.iface, "-j", end.chain, check=False)
            end.iptables("-F", end.chain, check=False)
            end.iptables("-X", end.chain, check=False)
            end.host.run(["tc", "qdisc", "del", "dev", end.iface, "root"], check=False)
        for end in self.ends:
            self._stop_daemon(end)

    # -- what it did ------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`NetnsError` if a delay daemon has died (the link is down then)."""
        for end in self.ends:
            if end.daemon is not None and end.daemon.poll() is not None:
                _, err = end.daemon.communicate()
                raise NetnsError(
                    f"delay daemon on {end.host.name}:{end.iface} exited with {end.daemon.returncode}: "
                    f"{(err or '').strip()}"
                )

    def ingress_counters(self, host: Host, reset: bool = False) -> IngressCounters:
        """Packets that arrived at ``host``'s end of the link (so sent by the other end)."""
        end = self._end(host)
        args = ["-nvxL", end.chain] + (["-Z"] if reset else [])
        rules = [line.split() for line in end.iptables(*args).stdout.splitlines()[2:] if line.strip()]
        # The chain is always: count everything, DROP at random, [NFQUEUE].
        arrived = int(rules[0][0])
        dropped = int(rules[1][0])
        return IngressCounters(arrived=arrived, dropped=dropped, overflowed=self._overflowed(end))

    def daemon_pids(self) -> dict[str, int]:
        """Host name -> pid of its delay daemon (while the delay is on)."""
        return {e.host.name: e.daemon.pid for e in self.ends if e.daemon is not None}

    def daemon_cpu_seconds(self) -> dict[str, float]:
        """Host name -> CPU seconds its delay daemon has used so far."""
        return {name: cpu_seconds(pid) for name, pid in self.daemon_pids().items()}

    def daemon_stats(self) -> dict[str, str]:
        """Host name -> the last ``delayd stats`` line of its daemon (after it stopped)."""
        return {e.host.name: e.last_stats for e in self.ends if e.last_stats is not None}

    # -- the work ---------------------------------------------------------

    def _end(self, host: Host) -> _End:
        for end in self.ends:
            if end.host is host:
                return end
        raise NetnsError(f"host {host.name} is not on {self!r}")

    def _apply(self, spec: WanSpec, restart_daemons: bool) -> None:
        if spec.rtt_ms > 0 and restart_daemons:
            reason = netfilterqueue_missing_reason()
            if reason is not None:
                raise NetnsError(reason)
        for end in self.ends:
            # Without a queue rule packets pass undelayed while daemons change.
            end.iptables("-F", end.chain)
            if restart_daemons:
                self._stop_daemon(end)
                if spec.rtt_ms > 0:
                    self._start_daemon(end, spec.one_way_delay_ms)
            end.iptables("-A", end.chain)  # no target: counts every arrival
            lose = ["-m", "statistic", "--mode", "random", "--probability", f"{spec.loss:.6f}"]
            end.iptables("-A", end.chain, *lose, "-j", "DROP")
            if spec.rtt_ms > 0:
                end.iptables("-A", end.chain, "-j", "NFQUEUE", "--queue-num", str(end.queue_num))
            if spec.rate_mbit is not None:
                end.host.run(["tc", "qdisc", "replace", "dev", end.iface, "root", "tbf", *spec.tbf_args()])
            else:
                end.host.run(["tc", "qdisc", "del", "dev", end.iface, "root"], check=False)
        self.spec = spec

    def _start_daemon(self, end: _End, delay_ms: float) -> None:
        argv = end.host.python_argv(
            "-m", "tests.support.delayd", "--queue", str(end.queue_num), "--delay-ms", f"{delay_ms:g}"
        )
        proc = end.host.popen(argv)
        end.daemon = proc
        assert proc.stdout is not None
        deadline = time.monotonic() + _READY_TIMEOUT
        fd = proc.stdout.fileno()
        line = ""
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            line = proc.stdout.readline()
            if line.startswith("delayd ready"):
                return
            if not line:  # EOF: it died
                break
        err = self._stop_daemon(end)
        raise NetnsError(
            f"delay daemon on {end.host.name}:{end.iface} did not start "
            f"(exit {proc.returncode}, said {line.strip()!r}): {err.strip()}"
        )

    def _stop_daemon(self, end: _End) -> str:
        """Stop ``end``'s daemon, if any; keep its stats line; return its stderr."""
        proc, end.daemon = end.daemon, None
        if proc is None:
            return ""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        for line in (out or "").splitlines():
            if line.startswith("delayd stats "):
                end.last_stats = line.removeprefix("delayd stats ")
        return err or ""

    def _overflowed(self, end: _End) -> int:
        text = end.host.run(["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
        for line in text.splitlines():
            f = line.split()
            if len(f) >= 7 and f[0] == str(end.queue_num):
                return int(f[5]) + int(f[6])
        return 0


@frozen
class WanTopology:
    """``client`` --WAN-- ``rp`` -- ``web``: the transparent-mode layout
    (:class:`TM3Topology`, its server host named ``web``) with the
    client<->rp link made a :class:`WanLink`. The rp<->web link stays a plain
    veth (the RP and the web server are close)."""

    tm3: TM3Topology
    wan: WanLink

    @property
    def topology(self) -> Topology:
        return self.tm3.topology

    @property
    def client(self) -> Host:
        return self.tm3.client

    @property
    def rp(self) -> Host:
        return self.tm3.rp

    @property
    def web(self) -> Host:
        return self.tm3.server

    @property
    def client_ip(self) -> str:
        return self.tm3.client_ip

    @property
    def rp_ip(self) -> str:
        """The RP's address on the WAN (what the client and LP use)."""
        return self.tm3.rp_ip

    @property
    def web_ip(self) -> str:
        return self.tm3.server_ip


def build_wan_topology(topo: Topology, spec: WanSpec | None = None) -> WanTopology:
    """Add client, rp and web hosts to ``topo`` and make client<->rp a WAN link."""
    t = build_tm3_topology(topo, server_name="web")
    wan = WanLink(topo.link_between(t.client, t.rp), spec).start()
    return WanTopology(tm3=t, wan=wan)
