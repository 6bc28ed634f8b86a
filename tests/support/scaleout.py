"""Several RP hosts behind HAProxy, in network namespaces: the bed of
``tests/test_scaleout_haproxy.py`` and ``benchmarks/scaleout_hosts.py``.

::

    lp1 10.61.1.2 --+                        +-- 10.62.1.2 rp1 (tm3rp --listen haproxy:tcp:6000;
    lp2 10.61.2.2 --+-- lb (HAProxy :6000) --+                  tm3-testserver on 10.63.0.1:7000)
    lp3 10.61.3.2 --+   10.61.N.1, 10.62.N.1  +-- 10.62.2.2 rp2 (the same)
    ...             (routes between the links)

Each LP host dials HAProxy at its own link's address (``lb_ip(i)``) and
forwards ``127.0.0.1:7001`` to the server address 10.63.0.1:7000, which every
RP host has on its loopback with a ``tm3-testserver`` behind it: whichever RP
carries a connection reaches "the" server, so the LPs need not know where
they land. ``lb`` also routes, so an LP can dial an RP directly
(``direct=True``: the one-host baseline of the benchmark).

HAProxy runs ``contrib/haproxy/haproxy.cfg`` as it is, with the bed's RPs on
its server lines (:func:`haproxy_config`), in the foreground (``haproxy -db``).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.level4 import Proxy
from tests.support.netns import Host, Topology
from tests.support.processes import REPO_ROOT, wait_for

SAMPLE = REPO_ROOT / "contrib" / "haproxy" / "haproxy.cfg"
PORT = 6000  # HAProxy's and the RPs' pipe port
SERVER_IP = "10.63.0.1"
SERVER_PORT = 7000
FORWARD_PORT = 7001  # each LP's --forward listener, on its loopback
KEY = "0123456789abcdef0123456789abcdef-scaleout"  # the bed's own v2 key (a test bed, not a secret)
UP = re.compile(r"session \d+ up \(v(\d)\): \d+ pipes? from (.*)")
PEER = re.compile(r"pipe (\S+):\d+ \(#\d+\)")


def haproxy_config(servers: list[tuple[str, str]], sample: Path = SAMPLE) -> str:
    """The sample configuration with ``servers`` ((name, "ip:port")) on its
    server lines instead of the sample's."""
    lines = sample.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("server "))
    indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
    rest = [line for line in lines[first:] if not line.strip().startswith("server ")]
    return "\n".join([*lines[:first], *(f"{indent}server {n} {a}" for n, a in servers), *rest]) + "\n"


class ScaleOut:
    """The bed; every process it starts is stopped with the topology."""

    def __init__(self, topo: Topology, workdir: Path, lps: int = 4, rps: int = 2) -> None:
        self.topo = topo
        self.workdir = workdir
        self.lb = topo.add_host("lb")
        self.rp_hosts: list[Host] = []
        self.lp_hosts: list[Host] = []
        for j in range(1, rps + 1):
            host = topo.add_host(f"rp{j}")
            link = topo.link(self.lb, host, f"10.62.{j}.0/24")
            topo.set_default_route(host, link.address_of(self.lb))
            host.run(["ip", "addr", "add", f"{SERVER_IP}/32", "dev", "lo"])
            self.rp_hosts.append(host)
        for i in range(1, lps + 1):
            host = topo.add_host(f"lp{i}")
            link = topo.link(self.lb, host, f"10.61.{i}.0/24")
            topo.set_default_route(host, link.address_of(self.lb))
            self.lp_hosts.append(host)
        topo.enable_forwarding(self.lb)
        self.key_file = workdir / "tm3.key"
        self.key_file.write_text(KEY)
        self.rps: list[Proxy | None] = [None] * rps
        self.lps: list[Proxy | None] = [None] * lps
        self.haproxy: subprocess.Popen[str] | None = None
        self.haproxy_log = workdir / "haproxy.log"

    # -- addresses -------------------------------------------------------------------

    def lp_ip(self, i: int) -> str:
        return self.lp_hosts[i].address_towards(self.lb)

    def lb_ip(self, i: int) -> str:
        """HAProxy's address as LP ``i`` sees it."""
        return self.lb.address_towards(self.lp_hosts[i])

    def rp_ip(self, j: int) -> str:
        return self.rp_hosts[j].address_towards(self.lb)

    # -- processes ---------------------------------------------------------------------

    def start_servers(self) -> None:
        for host in self.rp_hosts:
            host.popen(
                host.python_argv("-m", "tm3.tools.testserver", "--interface", SERVER_IP, str(SERVER_PORT)),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for host in self.rp_hosts:
            host.wait_for_port(SERVER_PORT, SERVER_IP)

    def start_rp(self, j: int, *extra: str, proxied: bool = True, pipes: int = 3) -> Proxy:
        """RP ``j`` with a key and v1 allowed, taking pipes only from the LPs'
        networks (10.61.0.0/16: HAProxy's 10.62.j.1 is outside it)."""
        listen = f"{'haproxy:' if proxied else ''}tcp:{PORT}:interface={self.rp_ip(j)}"
        tag = "proxied" if proxied else "direct"
        rp = self.rps[j] = Proxy(
            self.rp_hosts[j],
            self.workdir / f"rp{j + 1}-{tag}.log",
            ["tm3rp", "--pipes", str(pipes), "--listen", listen, "--key-file", str(self.key_file), "--allow-v1",
             "--allow-from", "10.61.0.0/16", "--drain-timeout", "0", "--summary-interval", "0",
             "--metrics", "tcp:9100:interface=127.0.0.1", *extra],
        )  # fmt: skip
        rp.start()
        wait_for(lambda: "listening on" in rp.log(), f"rp{j + 1} to listen")
        return rp

    def start_haproxy(self) -> subprocess.Popen[str]:
        cfg = self.workdir / "haproxy.cfg"
        servers = [(f"rp{j + 1}", f"{self.rp_ip(j)}:{PORT}") for j in range(len(self.rp_hosts))]
        cfg.write_text(haproxy_config(servers))
        with self.haproxy_log.open("w") as log:
            self.haproxy = self.lb.popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
        self.lb.wait_for_port(PORT, self.lb_ip(0))
        return self.haproxy

    def stop_haproxy(self) -> None:
        proc = self.haproxy
        if proc is not None and proc.poll() is None:
            proc.terminate()  # this process only: the one this bed started
            proc.wait(10)

    def start_lp(self, i: int, *extra: str, v1: bool = False, pipes: int = 3, direct_to: int | None = None) -> Proxy:
        """LP ``i`` through HAProxy (or straight to RP ``direct_to``): v2 with
        the key, or ``v1`` (no key: the reference LP's protocol)."""
        remote = f"{self.lb_ip(i) if direct_to is None else self.rp_ip(direct_to)}:{PORT}"
        key = [] if v1 else ["--key-file", str(self.key_file)]
        lp = self.lps[i] = Proxy(
            self.lp_hosts[i],
            self.workdir / f"lp{i + 1}.log",
            ["tm3lp", "--pipes", str(pipes), "--remote", remote, *key, "--drain-timeout", "0",
             "--summary-interval", "0",
             "--forward", f"tcp:{FORWARD_PORT}:interface=127.0.0.1:{SERVER_IP}:{SERVER_PORT}", *extra],
        )  # fmt: skip
        lp.start()
        return lp

    def lp_sessions(self, i: int) -> int:
        lp = self.lps[i]
        return 0 if lp is None else len(re.findall(r"session \d+ up", lp.log()))

    def wait_lp_sessions(self, i: int, n: int = 1, timeout: float = 30) -> None:
        wait_for(lambda: self.lp_sessions(i) >= n, f"lp{i + 1}'s session #{n}", timeout)

    # -- what the RPs say -------------------------------------------------------------------

    def sessions_up(self, j: int) -> list[tuple[int, list[str]]]:
        """Every session RP ``j`` logged up: (protocol version, each pipe's source address)."""
        rp = self.rps[j]
        if rp is None:
            return []
        return [(int(m[1]), PEER.findall(m[2])) for m in UP.finditer(rp.log())]

    def metrics(self, j: int) -> dict[str, float]:
        """RP ``j``'s unlabelled ``tm3_*`` samples (from its --metrics)."""
        out = self.rp_hosts[j].run(["curl", "-sS", "--max-time", "5", "http://127.0.0.1:9100/metrics"]).stdout
        return {m[1]: float(m[2]) for m in re.finditer(r"^(tm3_\w+)\{role=\"rp\"\} (\S+)$", out, re.M)}

    def client(self, i: int, count: int, req: int, resp: int, parallel: int = 1, timeout: float = 60) -> str:
        """``tm3-testclient`` on LP host ``i`` through its LP; its output (it checks every byte)."""
        host = self.lp_hosts[i]
        argv = host.python_argv("-m", "tm3.tools.testclient", "127.0.0.1", str(FORWARD_PORT), str(count), str(req),
                                str(resp), "--parallel", str(parallel), "--timeout", f"{timeout:g}")  # fmt: skip
        done = host.run(argv, check=False, timeout=timeout + 10)
        assert done.returncode == 0, f"lp{i + 1}: testclient failed: {done.stdout}{done.stderr}"
        return done.stdout

    def close(self) -> None:
        for proxy in [*self.lps, *self.rps]:
            if proxy is not None:
                proxy.stop()
        self.stop_haproxy()
