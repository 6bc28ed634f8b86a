"""Transparent mode for real, across three network namespaces.

    client 10.77.1.2 (unmodified clients, tm3lp --transparent, tm3-redirect)
       |  eth0
    rp 10.77.1.1 / 10.77.2.1 (tm3rp; forwards, so the client can also reach
       |                      the server directly once the rules are off)
    server 10.77.2.2 (tm3-testserver, an HTTP server)

The clients connect to the *server's* address; iptables on the client host
redirects them to the LP, whose pipes carry them to the RP, which connects to
the server. The RP's per-connection log lines prove the bytes crossed the
pipes; after ``tm3-redirect off`` the same clients reach the server directly
and the RP sees nothing new.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.support.level4 import Proxy
from tests.support.netns import TM3Topology
from tests.support.processes import wait_for
from tm3.lp.redirect import installed_rules

pytestmark = pytest.mark.netns

TESTPORT = 8080
HTTPPORT = 8081
LP_PORT = 6001


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def conn_lines(log: str, dest: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(rf"conn \d+ to {re.escape(dest)} ended: (\w+)", line)]


def start_servers_and_rp(t: TM3Topology, tmp_path: Path, pipes: int = 4) -> tuple[Proxy, bytes]:
    """tm3-testserver and an HTTP server (serving a random blob, returned)
    on the server host; an RP on the rp host."""
    # A file for curl to fetch, served from the server host.
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(3 * 1024 * 1024 + 17)
    (www / "blob.bin").write_bytes(blob)
    t.server.popen(t.server.python_argv("-m", "tm3.tools.testserver", str(TESTPORT), "--interface", t.server_ip))
    t.server.popen(
        t.server.python_argv("-m", "http.server", str(HTTPPORT), "--bind", t.server_ip, "--directory", str(www))
    )
    t.server.wait_for_port(TESTPORT, t.server_ip)
    t.server.wait_for_port(HTTPPORT, t.server_ip)

    rp = Proxy(t.rp, tmp_path / "rp.log", ["tm3rp", "--pipes", str(pipes), "--listen", f"tcp:6000:interface={t.rp_ip}"])
    rp.start()
    wait_for(lambda: "listening on" in rp.log(), "the RP to listen")
    return rp, blob


@pytest.fixture
def system(tm3_topology: TM3Topology, tmp_path: Path):  # type: ignore[no-untyped-def]
    t = tm3_topology
    rp, blob = start_servers_and_rp(t, tmp_path)
    lp = Proxy(
        t.client,
        tmp_path / "lp.log",
        ["tm3lp", "--pipes", "4", "--remote", f"{t.rp_ip}:6000", "--transparent", f"tcp:{LP_PORT}"],
    )
    lp.start()
    wait_for(lambda: "session 1 up" in lp.log(), "the LP's pipes to come up")
    rp_log, lp_log = rp.log_path, lp.log_path
    return t, rp_log, lp_log, hashlib.sha256(blob).hexdigest()


def redirect(t: TM3Topology, *args: str) -> str:
    out = t.client.run(t.client.python_argv("-m", "tm3.lp.redirect", *args), check=False)
    assert out.returncode in (0, 3), f"tm3-redirect {' '.join(args)} failed: {out.stdout}{out.stderr}"
    return out.stdout + out.stderr


def test_transparent_mode_end_to_end(system) -> None:  # type: ignore[no-untyped-def]
    t, rp_log, lp_log, blob_digest = system
    redirect(t, "on", t.rp_ip, t.client_iface, str(TESTPORT), str(HTTPPORT), "--to-port", str(LP_PORT))
    assert "TM3_OUTPUT" in redirect(t, "status")

    # The original experiment, unmodified client, aimed at the server's address.
    client = t.client.run(
        t.client.python_argv("-m", "tm3.tools.testclient", t.server_ip, str(TESTPORT), "10", "4096", "4096"),
        check=False,
    )
    assert client.returncode == 0, client.stdout + client.stderr
    assert "OK: all 10 responses verified" in client.stdout
    parallel = t.client.run(
        t.client.python_argv(
            "-m", "tm3.tools.testclient", t.server_ip, str(TESTPORT), "200", "1000", "50000", "--parallel", "8"
        ),
        check=False,
    )
    assert parallel.returncode == 0, parallel.stdout + parallel.stderr

    # curl, unmodified, downloads a file by its real URL.
    got = t.client.run(
        ["sh", "-c", f"curl -sS --max-time 30 http://{t.server_ip}:{HTTPPORT}/blob.bin | sha256sum"], check=False
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.split()[0] == blob_digest

    # The bytes crossed the pipes: the RP opened those connections, the LP carried them.
    dest = f"{t.server_ip}:{TESTPORT}"
    wait_for(lambda: len(conn_lines(read(rp_log), dest)) >= 1 + 8, "the RP's connection log lines")
    rp_lines = conn_lines(read(rp_log), dest)
    assert all("ended: fin" in line for line in rp_lines), rp_lines
    assert any("up 41120 B, down 40960 B" in line for line in rp_lines), rp_lines  # the 10 x 4096 exchange
    # Each proxy logs a connection once it is over both ways, which can be a
    # moment after the client is done: wait for the line, then count.
    http = f"{t.server_ip}:{HTTPPORT}"
    wait_for(lambda: conn_lines(read(rp_log), http), "the RP's line for curl's connection")
    assert len(conn_lines(read(rp_log), http)) == 1
    wait_for(lambda: len(conn_lines(read(lp_log), dest)) >= 9, "the LP's connection log lines")
    before_off = len(conn_lines(read(rp_log), dest))

    # Off: the same client now reaches the server directly, not through TM3.
    redirect(t, "off")
    assert "not installed" in redirect(t, "status").lower() or "nothing" in redirect(t, "status").lower()
    direct = t.client.run(
        t.client.python_argv("-m", "tm3.tools.testclient", t.server_ip, str(TESTPORT), "10", "4096", "4096"),
        check=False,
    )
    assert direct.returncode == 0, direct.stdout + direct.stderr
    time.sleep(0.5)
    assert len(conn_lines(read(rp_log), dest)) == before_off, "traffic still went through the RP after off"


def test_connection_to_the_listener_itself_is_refused_not_looped(system) -> None:  # type: ignore[no-untyped-def]
    """A client that connects straight to the LP's transparent port (not
    redirected) must be reset, not carried back to the LP through the RP."""
    t, rp_log, lp_log, _ = system
    before = read(rp_log).count("ended:")
    result = t.client.run(
        t.client.python_argv(
            "-m", "tm3.tools.testclient", t.client_ip, str(LP_PORT), "1", "10", "10", "--timeout", "5"
        ),
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    wait_for(lambda: "cannot tell where this connection was going" in read(lp_log), "the LP's log line")
    assert read(rp_log).count("ended:") == before


def nat_rules(t: TM3Topology) -> str:
    return t.client.run(["iptables", "-w", "10", "-t", "nat", "-S"]).stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_lp_redirect_rules_live_exactly_as_long_as_the_lp(tm3_topology: TM3Topology, tmp_path: Path, sig: int) -> None:
    """``tm3lp --redirect IFACE:PORTS`` installs tm3-redirect's rules once it
    listens, the redirected traffic crosses the pipes, and the rules are gone
    when twistd stops on SIGTERM or SIGINT."""
    t = tm3_topology
    rp, _ = start_servers_and_rp(t, tmp_path, pipes=2)
    assert "TM3_" not in nat_rules(t)
    lp = Proxy(
        t.client,
        tmp_path / "lp.log",
        ["tm3lp", "--pipes", "2", "--remote", f"{t.rp_ip}:6000", "--transparent", f"tcp:{LP_PORT}",
         "--redirect", f"{t.client_iface}:{TESTPORT},{HTTPPORT}"],
    )  # fmt: skip
    lp.start()
    wait_for(lambda: "session 1 up" in lp.log(), "the LP's pipes to come up")
    rules = installed_rules(nat_rules(t))
    assert f"-A PREROUTING -i {t.client_iface} -p tcp -j TM3_PREROUTING" in rules, rules
    assert f"-A TM3_OUTPUT -d {t.rp_ip}/32 -j RETURN" in rules, rules
    for port in (TESTPORT, HTTPPORT):
        assert f"-A TM3_OUTPUT -p tcp -m tcp --dport {port} -j REDIRECT --to-ports {LP_PORT}" in rules, rules
    assert "iptables: redirecting TCP ports" in lp.log()

    client = t.client.run(
        t.client.python_argv("-m", "tm3.tools.testclient", t.server_ip, str(TESTPORT), "10", "4096", "4096"),
        check=False,
    )
    assert client.returncode == 0, client.stdout + client.stderr
    dest = f"{t.server_ip}:{TESTPORT}"
    wait_for(lambda: conn_lines(rp.log(), dest), "the RP's line for the carried connection")
    carried = len(conn_lines(rp.log(), dest))

    assert lp.proc is not None
    lp.proc.send_signal(sig)
    assert lp.proc.wait(15) is not None
    assert "iptables: redirect rules removed" in lp.log(), lp.log()
    assert "Traceback" not in lp.log()
    assert "TM3_" not in nat_rules(t)
    # Without the rules (and the LP), the same client reaches the server directly.
    direct = t.client.run(
        t.client.python_argv("-m", "tm3.tools.testclient", t.server_ip, str(TESTPORT), "10", "4096", "4096"),
        check=False,
    )
    assert direct.returncode == 0, direct.stdout + direct.stderr
    time.sleep(0.5)
    assert len(conn_lines(rp.log(), dest)) == carried

    # They were tm3-redirect's rules, to the line.
    redirect(t, "on", t.rp_ip, t.client_iface, str(TESTPORT), str(HTTPPORT), "--to-port", str(LP_PORT))
    assert installed_rules(nat_rules(t)) == rules
    redirect(t, "off")
