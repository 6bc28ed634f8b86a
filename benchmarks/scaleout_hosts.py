"""Scale-out over RP hosts: one RP host directly vs two behind HAProxy.

Not a test, a measurement (root): the namespaces of tests/support/scaleout.py,
``--lps`` LP hosts (v2, 3 pipes each) and two RP hosts, each RP host with
nginx on the server address (10.63.0.1:8080) serving a 1 KiB object and a
bulk file. Two set-ups, alternating in every round (the order rotating):

- ``direct``: every LP dials RP host 1 (``--listen tcp:6000``), through the
  ``lb`` namespace's kernel routing only;
- ``haproxy``: every LP dials HAProxy in ``lb`` (contrib/haproxy/haproxy.cfg),
  which spreads them over both RP hosts (``--listen haproxy:tcp:6000``).

Workloads, on all LP hosts at once, each through its own LP:

- ``churn``: ``wrk -c16 -H 'Connection: close'`` for the 1 KiB object: a new
  connection (a SYN on the pipes, a connect on the RP) per request;
  aggregate requests/s;
- ``bulk``: two ``curl`` downloads of the bulk file per LP host; aggregate
  MB/s (all bytes / the time from the first start to the last end).

For every workload it records the CPU seconds each process used (the RPs,
HAProxy, the LPs, nginx; from /proc), since on a small machine they all
share the same cores: two RP hosts here are two processes on the same 2
cores, so the figures show what HAProxy's hop costs more than what a second
host gains. Writes ``scaleout-hosts.json`` and ``scaleout-hosts.md`` to
``--out`` (default bench/results/scaleout-hosts).

    PYTHONPATH=. .venv/bin/python benchmarks/scaleout_hosts.py [--rounds 3] [--lps 3] [--bulk-mib 128]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.support.netns import Topology, netns_unavailable_reason
from tests.support.processes import REPO_ROOT, cpu_seconds
from tests.support.scaleout import SERVER_IP, ScaleOut

NGINX_PORT = 8080
CHURN_PORT = 7002  # each LP's --forward to nginx, on its loopback
MODES = ("direct", "haproxy")

NGINX_CONF = """worker_processes 1;
daemon off;
master_process off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    keepalive_timeout 65;
    server {{ listen {ip}:{port} backlog=4096; root {root}; }}
}}
"""


def start_nginx(bed: ScaleOut, root: Path) -> list[subprocess.Popen[str]]:
    procs = []
    for j, host in enumerate(bed.rp_hosts):
        d = bed.workdir / f"nginx{j + 1}"
        d.mkdir(exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=d, ip=SERVER_IP, port=NGINX_PORT, root=root))
        procs.append(host.popen(["nginx", "-p", str(d), "-e", f"{d}/error.log", "-c", str(conf)]))
    for host in bed.rp_hosts:
        host.wait_for_port(NGINX_PORT, SERVER_IP)
    return procs


def start_mode(bed: ScaleOut, mode: str, lps: int) -> dict[str, int]:
    """The proxies for ``mode``, up; their pids by name."""
    forward = ["--forward", f"tcp:{CHURN_PORT}:interface=127.0.0.1:{SERVER_IP}:{NGINX_PORT}"]
    pids = {}
    if mode == "direct":
        pids["rp1"] = bed.start_rp(0, proxied=False).pid
    else:
        for j in range(len(bed.rp_hosts)):
            pids[f"rp{j + 1}"] = bed.start_rp(j).pid
        pids["haproxy"] = bed.start_haproxy().pid
    for i in range(lps):
        pids[f"lp{i + 1}"] = bed.start_lp(i, *forward, direct_to=0 if mode == "direct" else None).pid
    for i in range(lps):
        bed.wait_lp_sessions(i)
    return pids


def stop_mode(bed: ScaleOut) -> None:
    bed.close()
    bed.rps = [None] * len(bed.rps)
    bed.lps = [None] * len(bed.lps)
    bed.haproxy = None


def run_all(bed: ScaleOut, lps: int, argv_for: Any, timeout: float) -> tuple[list[str], float]:
    """``argv_for(i)`` on every LP host at once: their outputs and the wall time."""
    start = time.monotonic()
    procs = [bed.lp_hosts[i].popen(argv_for(i)) for i in range(lps)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{p.args}: exit {p.returncode}: {out}{err}")
        outs.append(out)
    return outs, time.monotonic() - start


def churn(bed: ScaleOut, lps: int, seconds: float) -> dict[str, float]:
    argv = ["wrk", "-t1", "-c16", f"-d{seconds:g}s", "--timeout", "5s", "-H", "Connection: close",
            f"http://127.0.0.1:{CHURN_PORT}/1k.bin"]  # fmt: skip
    outs, _ = run_all(bed, lps, lambda i: argv, seconds + 60)
    rps, errors = 0.0, 0
    for out in outs:
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if m is None:
            raise RuntimeError(f"wrk said:\n{out}")
        rps += float(m.group(1))
        se = re.search(r"Socket errors: connect (\d+), read \d+, write (\d+), timeout (\d+)", out)
        errors += sum(int(g) for g in se.groups()) if se else 0
    return {"conns_per_s": rps, "errors": errors}


def bulk(bed: ScaleOut, lps: int, mib: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{CHURN_PORT}/bulk.bin"
    script = f"for k in 1 2; do curl -sS --fail -o /dev/null -w '%{{size_download}}\\n' {url} & done; wait"  # two downloads per LP host
    outs, wall = run_all(bed, lps, lambda i: ["bash", "-c", script], 600)
    total = sum(int(x) for out in outs for x in out.split())
    expected = 2 * lps * mib * 1024 * 1024
    if total != expected:
        raise RuntimeError(f"bulk: {total} bytes arrived, {expected} expected")
    return {"mb_per_s": total / wall / 1e6, "seconds": wall}


def measured(pids: dict[str, int], work: Any) -> dict[str, Any]:
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = dict(work())
    result["cpu"] = {name: round(cpu_seconds(pid) - before[name], 2) for name, pid in pids.items()}
    return result


def git_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT)
    return done.stdout.strip()


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = []
    for mode in MODES:
        runs = [r for r in result["runs"] if r["mode"] == mode]
        c = statistics.median(r["churn"]["conns_per_s"] for r in runs)
        b = statistics.median(r["bulk"]["mb_per_s"] for r in runs)
        names = list(runs[0]["churn"]["cpu"])
        cpu_c = ", ".join(f"{n} {statistics.median(r['churn']['cpu'][n] for r in runs):.1f}" for n in names)
        cpu_b = ", ".join(f"{n} {statistics.median(r['bulk']['cpu'][n] for r in runs):.1f}" for n in names)
        errs = sum(r["churn"]["errors"] for r in runs)
        total_c = statistics.median(sum(r["churn"]["cpu"].values()) for r in runs)
        total_b = statistics.median(sum(r["bulk"]["cpu"].values()) for r in runs)
        rows.append((mode, c, b, cpu_c, cpu_b, errs, total_c, total_b))
    direct = rows[0]
    lines = [
        "# Scale-out over RP hosts: one RP host directly vs two behind HAProxy",
        "",
        f"{cfg['lps']} LP hosts (v2, 3 pipes each), all at once; medians of {cfg['rounds']} rounds, the set-ups "
        f"alternating; commit {result['commit']}, {result['date']}. churn: wrk -c16 per LP host, a new "
        f"connection per 1 KiB request, {cfg['churn_seconds']:g} s; bulk: two {cfg['bulk_mib']} MiB downloads "
        "per LP host.",
        "",
        "| set-up | churn conn/s | vs direct | bulk MB/s | vs direct | churn errors | CPU s churn / bulk |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, c, b, _, _, errs, total_c, total_b in rows:
        lines.append(
            f"| {mode} | {c:.0f} | {c / direct[1]:.2f} | {b:.0f} | {b / direct[2]:.2f} | {errs} "
            f"| {total_c:.1f} / {total_b:.1f} |"
        )
    lines += ["", "CPU seconds per process during each workload (medians):", ""]
    lines += ["| set-up | churn | bulk |", "|---|---|---|"]
    for mode, _, _, cpu_c, cpu_b, *_ in rows:
        lines.append(f"| {mode} | {cpu_c} | {cpu_b} |")
    lines += [
        "",
        "Notes: every namespace shares the one machine's "
        f'{cfg["cpus"]} cores, so the two "RP hosts" are two processes on the same cores, beside HAProxy, '
        "the LPs, nginx and the clients (wrk, curl: not counted in the CPU columns), and other work on the "
        "machine disturbs them. So this shows overhead more than gain: HAProxy's hop costs its own CPU "
        "(its column) and a second relay in the path. What gain there is comes from two RP processes using "
        "both cores where one RP (one Python thread) leaves the second core to the others; on separate "
        "machines each RP host brings its own cores, and what one RP host can carry is the limit that "
        'scale-out lifts. "CPU s": all the processes above together, during the workload.',
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--table"]:  # rewrite the table from a saved JSON
        path = Path(sys.argv[2])
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lps", type=int, default=3)
    parser.add_argument("--churn-seconds", type=float, default=5)
    parser.add_argument("--bulk-mib", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results" / "scaleout-hosts")
    args = parser.parse_args()
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    missing = [tool for tool in ("haproxy", "wrk", "nginx", "curl") if shutil.which(tool) is None]
    if missing:
        print(f"cannot run: missing {', '.join(missing)} (apt-get install haproxy wrk nginx-light curl)")
        return 2
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tm3-scaleout-") as scratch, Topology() as topo:
        work = Path(scratch)
        root = work / "www"
        root.mkdir()
        (root / "1k.bin").write_bytes(os.urandom(1024))
        with (root / "bulk.bin").open("wb") as f:
            for _ in range(args.bulk_mib):
                f.write(os.urandom(1024 * 1024))
        bed = ScaleOut(topo, work, lps=args.lps, rps=2)
        topo.add_cleanup(bed.close)
        nginx = {f"nginx{j + 1}": proc.pid for j, proc in enumerate(start_nginx(bed, root))}
        for rnd in range(args.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for mode in order:
                pids = {**start_mode(bed, mode, args.lps), **nginx}
                try:
                    run = {"round": rnd, "mode": mode}
                    run["churn"] = measured(pids, lambda: churn(bed, args.lps, args.churn_seconds))
                    run["bulk"] = measured(pids, lambda: bulk(bed, args.lps, args.bulk_mib))
                finally:
                    stop_mode(bed)
                print(
                    f"round {rnd + 1} {mode:8} churn {run['churn']['conns_per_s']:7.0f} conn/s "
                    f"(errors {run['churn']['errors']}), bulk {run['bulk']['mb_per_s']:6.1f} MB/s",
                    flush=True,
                )
                for what in ("churn", "bulk"):
                    print(f"    cpu s during {what}: {run[what]['cpu']}", flush=True)
                runs.append(run)
    result = {
        "commit": git_commit(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "config": {
            "rounds": args.rounds,
            "lps": args.lps,
            "pipes": 3,
            "churn_seconds": args.churn_seconds,
            "bulk_mib": args.bulk_mib,
            "cpus": os.cpu_count(),
        },
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaleout-hosts.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (args.out / "scaleout-hosts.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
