"""The Level 4 test bed: TM3 between a client and a web host across an
emulated wide-area link, reusable by tests and benchmarks.

::

    client 10.77.1.2 ----WAN (delay, loss, rate)---- rp 10.77.1.1 | 10.77.2.1 ---- web 10.77.2.2, .3, .4
    (browser, curl, tm3lp: SOCKS5 on          (tm3rp on :6000;             (nginx: HTTP :80 and HTTPS :443
     127.0.0.1:1080, transparent on :6001;     routes between the links)    on each address: three origins)
     tm3-redirect rules for ports 80, 443)

:class:`Level4` starts and stops each piece on its own, so a test can kill and
restart a proxy: :meth:`Level4.start_nginx`, :meth:`Level4.start_rp`,
:meth:`Level4.start_lp`, :meth:`Level4.redirect` (``tm3-redirect on``: the
client then reaches the web host only through TM3). The proxies run as
``twistd -n`` with their log in a file (:meth:`Level4.rp_log`), so a test can
prove that bytes crossed the pipes (the RP's per-connection lines) and that
nothing is left behind (:meth:`Level4.settled`: every connection ended, open
file descriptors back to the baseline taken when the session came up).

Use it through the ``level4`` fixture (tests/conftest.py), or build one from a
:class:`~tests.support.netns.Topology` in a benchmark.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.support.certs import Pair, make_web_pki
from tests.support.netns import Host, Topology
from tests.support.processes import TWISTD, wait_for
from tests.support.wan import WanSpec, WanTopology, build_wan_topology

RP_PORT = 6000
SOCKS_PORT = 1080
TRANSPARENT_PORT = 6001
EXTRA_ORIGINS = ("10.77.2.3", "10.77.2.4")
KEY = "0123456789abcdef0123456789abcdef-level4"  # the bed's own v2 key (a test bed, not a secret)

NGINX_CONF = """
user root;
worker_processes 2;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    types {{ video/mp4 mp4; }}
    log_format tm3 '$remote_addr $server_addr:$server_port "$request" $status $body_bytes_sent "$http_range" $request_time $connection';
    access_log {tmp}/nginx-access.log tm3;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 10000;
    server {{
{listens}
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
        location / {{ add_header Cache-Control "no-store"; add_header Timing-Allow-Origin "*"; }}
    }}
}}
"""


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Proxy:
    """One ``twistd -n`` proxy in a namespace, logging to a file."""

    def __init__(self, host: Host, log: Path, argv: Sequence[str]) -> None:
        self.host = host
        self.log_path = log
        self.argv = list(argv)
        self.proc: subprocess.Popen[str] | None = None
        self.baseline_fds = 0

    def start(self) -> None:
        self.log_path.write_text("")
        self.proc = self.host.popen(
            [TWISTD, "-n", "--pidfile=", "-l", str(self.log_path), *self.argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def fds(self) -> int:
        return open_fds(self.pid)

    def kill(self) -> None:
        """SIGKILL: the proxy dies without a word (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def ended(self) -> int:
        """Connections this proxy logged as ended."""
        return len(re.findall(r"conn \d+ to \S+ ended: ", self.log()))


class Level4:
    """The bed; every ``start_*`` is undone by :meth:`close` (or the topology's)."""

    def __init__(self, topo: Topology, workdir: Path, spec: WanSpec | None = None) -> None:
        self.topo = topo
        self.workdir = workdir
        self.spec = spec if spec is not None else WanSpec(rtt_ms=40, loss=0.005, rate_mbit=50)
        self.t: WanTopology = build_wan_topology(topo, self.spec)
        web_iface = self.t.web.iface_towards(self.t.rp)
        for ip in EXTRA_ORIGINS:
            self.t.web.run(["ip", "addr", "add", f"{ip}/24", "dev", web_iface])
        self.origins = [self.t.web_ip, *EXTRA_ORIGINS]
        self.key_file = workdir / "tm3.key"
        self.key_file.write_text(KEY)
        self.ca, self.cert = make_web_pki(workdir / "pki", self.origins)
        self.rp: Proxy | None = None
        self.lp: Proxy | None = None
        self.nginx: subprocess.Popen[str] | None = None
        self.redirected = False

    # -- hosts ---------------------------------------------------------------------------

    @property
    def client(self) -> Host:
        return self.t.client

    @property
    def web(self) -> Host:
        return self.t.web

    @property
    def rp_host(self) -> Host:
        return self.t.rp

    # -- the web server ------------------------------------------------------------------

    def start_nginx(self, root: Path) -> None:
        """nginx on ports 80 and 443 of every origin, serving ``root``."""
        tmp = self.workdir / "nginx"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / sub).mkdir(parents=True, exist_ok=True)
        listens = "\n".join(
            f"        listen {ip}:80 reuseport;\n        listen {ip}:443 ssl reuseport;" for ip in self.origins
        )
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, listens=listens, cert=self.cert.cert, key=self.cert.key, root=root))
        self.nginx = self.web.popen(["nginx", "-c", str(conf), "-g", "daemon off;"])
        for ip in self.origins:
            self.web.wait_for_port(80, ip)
            self.web.wait_for_port(443, ip)

    def access_log(self) -> list[str]:
        path = self.workdir / "nginx" / "nginx-access.log"
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    @property
    def web_cert(self) -> Pair:
        return self.cert

    # -- the proxies -----------------------------------------------------------------------

    def start_rp(self, pipes: int = 4, *extra: str) -> Proxy:
        if self.rp is None:
            self.rp = Proxy(
                self.rp_host,
                self.workdir / "rp.log",
                ["tm3rp", "--pipes", str(pipes), "--listen", f"tcp:{RP_PORT}:interface={self.t.rp_ip}",
                 "--key-file", str(self.key_file), "--drain-timeout", "0", *extra],
            )  # fmt: skip
        rp = self.rp
        rp.start()
        wait_for(lambda: "listening on" in rp.log(), "the RP to listen")
        return rp

    def start_lp(self, pipes: int = 4, *extra: str) -> Proxy:
        if self.lp is None:
            self.lp = Proxy(
                self.client,
                self.workdir / "lp.log",
                ["tm3lp", "--pipes", str(pipes), "--remote", f"{self.t.rp_ip}:{RP_PORT}",
                 "--key-file", str(self.key_file),
                 "--socks", f"tcp:{SOCKS_PORT}:interface=127.0.0.1", "--transparent", f"tcp:{TRANSPARENT_PORT}",
                 "--drain-timeout", "0", *extra],
            )  # fmt: skip
        self.lp.start()
        self.wait_session()
        return self.lp

    def wait_session(self, timeout: float = 30) -> None:
        """Until the LP's pipes are up (a session line after the last start)."""
        lp = self.lp
        assert lp is not None
        wait_for(lambda: bool(re.search(r"session \d+ up", lp.log())), "the LP's session", timeout)
        lp.baseline_fds = lp.fds()
        if self.rp is not None:
            wait_for(
                lambda: bool(re.search(r"session \d+ up", self.rp.log())) if self.rp else False, "the RP's session"
            )
            self.rp.baseline_fds = self.rp.fds()

    def redirect(self, on: bool = True, ports: Sequence[int] = (80, 443)) -> None:
        """``tm3-redirect on``: the client's connections to ``ports`` go to the
        LP's transparent listener (and so only through TM3)."""
        if on:
            args = ["on", self.t.rp_ip, self.t.tm3.client_iface, *map(str, ports), "--to-port", str(TRANSPARENT_PORT)]
        else:
            args = ["off"]
        out = self.client.run(self.client.python_argv("-m", "tm3.lp.redirect", *args), check=False)
        assert out.returncode in (0, 3), f"tm3-redirect {' '.join(args)}: {out.stdout}{out.stderr}"
        self.redirected = on

    def carried(self, dest_ip: str | None = None) -> int:
        """Connections the RP logged as ended (to ``dest_ip``, if given): proof
        that they crossed the pipes."""
        if self.rp is None:
            return 0
        pattern = rf"conn \d+ to {re.escape(dest_ip)}:\d+ ended: " if dest_ip else r"conn \d+ to \S+ ended: "
        return len(re.findall(pattern, self.rp.log()))

    def settled(self, timeout: float = 10) -> None:
        """Every connection the proxies carried has ended on both, and their
        open file descriptors are back to what they were with the session up."""
        for proxy in (self.rp, self.lp):
            if proxy is None:
                continue
            wait_for(
                lambda p=proxy: p.fds() <= p.baseline_fds,  # type: ignore[misc]
                f"{'RP' if proxy is self.rp else 'LP'} fds back to {proxy.baseline_fds}",
                timeout,
            )

    # -- clients ------------------------------------------------------------------------------

    def curl(
        self, url: str, *args: str, via: str = "transparent", timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """curl on the client: ``via`` "transparent" (the redirect rules must be
        on), "socks" (through the LP's SOCKS5) or "direct" (rules must be off)."""
        argv = ["curl", "-sS", "--cacert", str(self.ca), "--max-time", f"{timeout:g}", *args]
        if via == "socks":
            argv += ["--socks5", f"127.0.0.1:{SOCKS_PORT}"]
        return self.client.run([*argv, url], check=False, timeout=timeout + 10)

    def fetch(self, url: str, via: str = "transparent", timeout: float = 120) -> tuple[str, str]:
        """Download ``url`` on the client as :meth:`curl` does; returns the
        body's sha256 and curl's error text ("" if it succeeded)."""
        socks = f"--socks5 127.0.0.1:{SOCKS_PORT}" if via == "socks" else ""
        script = (
            f"set -o pipefail; curl -sS --fail --cacert {self.ca} --max-time {timeout:g} {socks} '{url}' | sha256sum"
        )
        out = self.client.run(["bash", "-c", script], check=False, timeout=timeout + 10)
        return out.stdout.split()[0] if out.returncode == 0 else "", out.stderr.strip()

    def close(self) -> None:
        if self.redirected:
            self.redirect(False)
        for proxy in (self.lp, self.rp):
            if proxy is not None:
                proxy.stop()
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.terminate()
