"""TM3 under packet loss: not a test, a measurement that prints a table.

Builds the client / rp / server namespaces of ``tests/support/netns.py`` and makes the
client<->rp link lossy: iptables ``statistic --mode random`` DROP rules in the
client namespace on eth0, both OUTPUT (client -> rp) and INPUT (rp -> client),
so each direction loses about P of its packets. Optionally both ends of that
link get a ``tc tbf`` rate limit so the link, not the CPU, is the bottleneck.

For each loss rate, three paths are measured with ``tm3-testclient``:

* ``direct``: client -> server straight through the rp (which only routes);
* ``tm3 1p`` / ``tm3 4p``: client -> LP (127.0.0.1:7000, client namespace)
  -> N pipes over the lossy link -> RP (rp namespace) -> server.

Workloads: ``small`` (many request/response exchanges over parallel
connections) and ``bulk`` (a few 1 MB responses). Each client run is bounded
by ``--timeout`` and a subprocess timeout; everything started runs inside the
namespaces, which are deleted on exit (also on errors and Ctrl-C).

    sudo /work/venv/bin/python benchmarks/loss.py [--loss 0 0.5 2] [--rate 100mbit]
        [--pipes 1 4] [--run-timeout 60]
"""

from __future__ import annotations

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.level4 import Proxy
from tests.support.netns import Host, TM3Topology, Topology, build_tm3_topology, netns_unavailable_reason

SERVER_PORT = 5001
LP_PORT = 7000
RP_PORT = 6000

WORKLOADS = {
    # name: (count, request size, response size, parallel)
    "small": (10000, 200, 2000, 16),
    "bulk": (40, 100, 1_000_000, 4),
}

REQS = re.compile(r"requests/s: ([\d.]+)")
THRU = re.compile(r"throughput: ([\d.]+) MB/s")
LAT = re.compile(r"latency ms: min ([\d.]+)\s+median ([\d.]+)\s+p99 ([\d.]+)\s+max ([\d.]+)")
COMPLETED = re.compile(r"completed: (\d+) of (\d+)")


def set_loss(t: TM3Topology, percent: float) -> None:
    """Replace the drop rules in the client namespace with ``percent`` % each way."""
    c, iface = t.client, t.client_iface
    c.run(["iptables", "-w", "10", "-F", "OUTPUT"])
    c.run(["iptables", "-w", "10", "-F", "INPUT"])
    p = f"{percent / 100:.6f}"
    for chain, flag in (("OUTPUT", "-o"), ("INPUT", "-i")):
        # A target-less rule first, so its counter is every tcp packet on the link.
        c.run(["iptables", "-w", "10", "-A", chain, flag, iface, "-p", "tcp"])
        if percent > 0:
            c.run(
                [
                    "iptables",
                    "-w",
                    "10",
                    "-A",
                    chain,
                    flag,
                    iface,
                    "-p",
                    "tcp",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    p,
                    "-j",
                    "DROP",
                ]
            )


def read_counters(t: TM3Topology) -> tuple[int, int]:
    """(tcp packets seen, packets dropped) on the link since the last zeroing; zeroes them."""
    seen = dropped = 0
    for chain in ("OUTPUT", "INPUT"):
        out = t.client.run(["iptables", "-w", "10", "-nvxL", chain, "-Z"]).stdout
        for line in out.splitlines()[2:]:
            f = line.split()
            if len(f) >= 3 and f[0].isdigit():
                if f[2] == "DROP":
                    dropped += int(f[0])
                else:
                    seen += int(f[0])
    return seen, dropped


def set_rate(t: TM3Topology, rate: str) -> None:
    """tbf on both ends of the client<->rp link (each end shapes its egress)."""
    for host, iface in ((t.client, t.client_iface), (t.rp, t.rp.iface_towards(t.client))):
        host.run(
            ["tc", "qdisc", "replace", "dev", iface, "root", "tbf", "rate", rate, "burst", "64kb", "latency", "50ms"]
        )


def run_client(host: Host, target: str, port: int, workload: str, timeout: float) -> dict[str, object]:
    count, req, resp, par = WORKLOADS[workload]
    argv = host.python_argv(
        "-m",
        "tm3.tools.testclient",
        target,
        str(port),
        str(count),
        str(req),
        str(resp),
        "--parallel",
        str(par),
        "--timeout",
        str(timeout),
    )
    try:
        done = host.run(argv, check=False, timeout=timeout + 15)
        out = done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        return {"ok": False, "err": "hung"}
    res: dict[str, object] = {"ok": done.returncode == 0 and "OK: all" in out}
    if m := REQS.search(out):
        res["rps"] = float(m.group(1))
    if m := THRU.search(out):
        res["mbps"] = float(m.group(1))
    if m := LAT.search(out):
        res["med"], res["p99"], res["max"] = (float(m.group(i)) for i in (2, 3, 4))
    if m := COMPLETED.search(out):
        res["done"] = f"{m.group(1)}/{m.group(2)}"
    if not res["ok"]:
        fail = [ln for ln in out.splitlines() if "FAILED" in ln or "rror" in ln]
        res["err"] = (fail[-1] if fail else out.strip()[-120:])[:120]
    return res


def start_tm3(t: TM3Topology, pipes: int, logdir: Path) -> list[Proxy]:
    rp = Proxy(
        t.rp,
        logdir / f"rp-{pipes}.log",
        ["tm3rp", "--pipes", str(pipes), "--listen", f"tcp:{RP_PORT}:interface={t.rp_ip}"],
    )
    rp.start()
    t.rp.wait_for_port(RP_PORT, t.rp_ip, timeout=15)
    lp = Proxy(
        t.client,
        logdir / f"lp-{pipes}.log",
        ["tm3lp", "--remote", f"{t.rp_ip}:{RP_PORT}", "--pipes", str(pipes),
         "--forward", f"tcp:{LP_PORT}:interface=127.0.0.1:{t.server_ip}:{SERVER_PORT}"],
    )  # fmt: skip
    lp.start()
    t.client.wait_for_port(LP_PORT, timeout=15)
    return [rp, lp]


def fmt(r: dict[str, object] | None, workload: str) -> str:
    if r is None:
        return "-"
    if not r["ok"] and "rps" not in r:
        return f"FAIL ({r.get('err', '?')})"[:60]
    main = f"{r['rps']:8.1f} req/s" if workload == "small" else f"{r['mbps']:7.2f} MB/s"
    lat = f"med {r.get('med', 0):7.1f} p99 {r.get('p99', 0):7.1f} max {r.get('max', 0):7.1f}"
    flag = "" if r["ok"] else f" FAIL {r.get('done', '')}"
    return f"{main} | {lat} | drop {r.get('drop', '?')}{flag}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--loss", type=float, nargs="+", default=[0.0, 0.5, 2.0], help="drop %% each way")
    ap.add_argument("--rate", default="100mbit", help="tbf rate on the client<->rp link; 'none' to skip")
    ap.add_argument("--pipes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--run-timeout", type=float, default=60, help="deadline of one client run (s)")
    args = ap.parse_args()

    reason = netns_unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2

    # SIGTERM -> exception, so the `with` below still tears everything down.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: dict[tuple[str, float, str], dict[str, object]] = {}
    started = time.monotonic()
    logdir = Path(tempfile.mkdtemp(prefix="tm3-loss-"))
    with Topology() as topo:
        t = build_tm3_topology(topo)
        if args.rate != "none":
            set_rate(t, args.rate)
        t.server.popen(
            t.server.python_argv("-m", "tm3.tools.testserver", str(SERVER_PORT), "--interface", t.server_ip),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        t.server.wait_for_port(SERVER_PORT, t.server_ip, timeout=15)

        paths: list[tuple[str, int | None]] = [("direct", None)] + [(f"tm3 {n}p", n) for n in args.pipes]
        for name, pipes in paths:
            procs: list[Proxy] = []
            try:
                if pipes is None:
                    target, port = t.server_ip, SERVER_PORT
                else:
                    set_loss(t, 0)
                    procs = start_tm3(t, pipes, logdir)
                    target, port = "127.0.0.1", LP_PORT
                    run_client(t.client, target, port, "small", 20)  # warm-up: pipes up
                for loss in args.loss:
                    set_loss(t, loss)
                    for wl in args.workloads:
                        read_counters(t)
                        r = run_client(t.client, target, port, wl, args.run_timeout)
                        seen, dropped = read_counters(t)
                        r["drop"] = f"{dropped}/{seen}"
                        results[(name, loss, wl)] = r
                        print(
                            f"  [{time.monotonic() - started:5.0f}s] {name:7} loss {loss:4}% {wl:5}: {fmt(r, wl)}",
                            file=sys.stderr,
                            flush=True,
                        )
                        if pipes is not None and any(p.proc is None or p.proc.poll() is not None for p in procs):
                            print(f"  {name}: a proxy exited; logs in {logdir}", file=sys.stderr)
                            break
            finally:
                set_loss(t, 0)
                for proxy in procs:
                    proxy.stop()

    print()
    print(
        f"TM3 under loss on the client<->rp link (drop each way; tbf {args.rate}); "
        f"latency in ms per request; "
        f"drop = tcp packets dropped / seen on the link"
    )
    for wl in args.workloads:
        count, req, resp, par = WORKLOADS[wl]
        print(f"\n{wl}: {count} x {req}/{resp} bytes, --parallel {par}")
        print(f"{'loss':>6}  {'path':8} result")
        for loss in args.loss:
            for name, _ in paths:
                print(f"{loss:5.1f}%  {name:8} {fmt(results.get((name, loss, wl)), wl)}")
    print(f"\ntotal {time.monotonic() - started:.0f}s; proxy logs in {logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
