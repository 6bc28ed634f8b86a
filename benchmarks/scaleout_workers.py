"""RP scale-out over processes: ``tm3rp --workers 1`` against ``--workers 2``.

Not a test, a measurement. Many LPs (``--lps``, 8 by default), each its own
v2 session (``twistd tm3lp --key-file``, 2 pipes, two ``--forward``s: to
nginx and to the bulk server), against one RP on 127.0.0.1, started afresh
for each configuration; the configurations alternate within one run (the
order flips every round) and the figures are medians over rounds:

- ``churn``: one ``wrk`` per LP at once, ``Connection: close`` (a new carried
  connection per request, so a SYN and a FIN through the RP each time), a
  1 KiB object from nginx: the sum of requests/s;
- ``bulk``: one download per LP at once (``--bulk-size`` each, every byte
  checked): the aggregate MB/s (all bytes / the time until the last ends);
- during each: the CPU each party used (utime + stime from ``/proc``: the RP's
  front and workers, the LPs, the client side), as cores (CPU s / wall s).

The machine's cores are shared by everything here (LPs, RP, nginx, wrk and
this process, which checks the bulk bytes); the CPU columns say where they
went. It reuses ``benchmarks/efficiency.py``'s servers, workloads and
process handling, and writes ``workers.json`` and ``workers.md`` to
``--out`` (``bench/results/scaleout``).

    .venv/bin/python benchmarks/scaleout_workers.py                    # about 4 minutes
    .venv/bin/python benchmarks/scaleout_workers.py --rounds 1 --seconds 5 --bulk-size 16MiB

Needs wrk and nginx (``apt-get install wrk nginx-light``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from efficiency import (  # benchmarks/efficiency.py
    HOST,
    Child,
    MiB,
    Servers,
    bulk,
    cpu_seconds,
    git_commit,
    raise_nofile,
    wait_listening,
    wrk,
)

from tests.support.ports import free_port
from tests.support.processes import TWISTD
from tm3.options import parse_size

CONFIGS = (1, 2)  # --workers


class System:
    """One RP (``--workers``) and ``lps`` LPs, each forwarding to nginx and to the bulk server."""

    def __init__(self, workers: int, lps: int, servers: Servers, scratch: Path, key: Path) -> None:
        self.workers = workers
        self.rp_port = free_port()
        common = ["--pipes", "2", "--key-file", str(key), "--summary-interval", "0"]
        rp = [TWISTD, "-n", "--pidfile=", "tm3rp", "--listen", f"tcp:{self.rp_port}:interface={HOST}:backlog=1024"]
        self.rp = Child(
            f"rp-w{workers}", [*rp, "--allow-to", f"{HOST}/32", "--workers", str(workers), *common], scratch
        )
        wait_listening(self.rp_port, [self.rp])
        if workers > 1:
            for i in range(1, workers + 1):
                self.rp.wait_for(rf"worker {i}: taking pipes from the front")
        self.lps: list[Child] = []
        self.web_ports: list[int] = []
        self.bulk_ports: list[int] = []
        for i in range(lps):
            web, data = free_port(), free_port()
            argv = [TWISTD, "-n", "--pidfile=", "tm3lp", "--remote", f"{HOST}:{self.rp_port}", *common]
            argv += ["--forward", f"tcp:{web}:interface={HOST}:backlog=1024:{HOST}:{servers.nginx_port}"]
            argv += ["--forward", f"tcp:{data}:interface={HOST}:{HOST}:{servers.bulk_port}"]
            self.lps.append(Child(f"lp{i}-w{workers}", argv, scratch))
            self.web_ports.append(web)
            self.bulk_ports.append(data)
        for lp, web in zip(self.lps, self.web_ports):
            lp.wait_for(r" up \(v2\)")
            wait_listening(web, [lp])

    def rp_pids(self) -> list[int]:
        """The front (or single RP) and its workers."""
        return [self.rp.pid, *(int(p) for p in re.findall(r"worker \d+ started \(pid (\d+)\)", self.rp.text()))]

    def cpu(self) -> dict[str, float]:
        return {
            "rp": sum(_cpu(p) for p in self.rp_pids()),
            "rp_front": _cpu(self.rp.pid) if self.workers > 1 else 0.0,
            "lps": sum(_cpu(lp.pid) for lp in self.lps),
            "client": _cpu(os.getpid()),  # this process, and the wrk runs it has reaped
        }

    def sessions_per_worker(self) -> dict[str, int]:
        text = self.rp.text()
        if self.workers == 1:
            return {"1": len(re.findall(r"session \d+ up", text))}
        return {str(i): len(re.findall(rf"worker {i}: session \d+ up", text)) for i in range(1, self.workers + 1)}

    def stop(self) -> None:
        for lp in self.lps:
            lp.stop()
        self.rp.stop()


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def measured(system: System, run: Any) -> dict[str, Any]:
    """``run()``'s figures, and the CPU each party used meanwhile, in cores."""
    cpu0, t0 = system.cpu(), time.perf_counter()
    out: dict[str, Any] = run()
    wall = time.perf_counter() - t0
    cpu1 = system.cpu()
    for k in cpu0:
        out[f"cpu_{k}"] = (cpu1[k] - cpu0[k]) / wall
    out["wall_s"] = wall
    return out


def churn(system: System, seconds: float, connections: int) -> dict[str, Any]:
    results: list[dict[str, float]] = []
    lock = threading.Lock()

    def one(port: int) -> None:
        r = wrk(port, connections, seconds, close=True, threads=1)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(p,)) for p in system.web_ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "churn_rps": sum(r["rps"] for r in results),
        "churn_errors": sum(r["errors"] for r in results),
        "churn_p99_ms_max": max(r.get("p99_ms", 0.0) for r in results),
    }


def bulk_all(system: System, servers: Servers, size: int) -> dict[str, Any]:
    errors: list[BaseException] = []

    def one(port: int) -> None:
        try:
            bulk(servers, port, "D", size)
        except BaseException as e:  # reported below
            errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(p,)) for p in system.bulk_ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"bulk: {errors[0]}")
    return {"bulk_MBps": len(system.bulk_ports) * size / 1e6 / seconds}


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs if key in r)


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "# RP scale-out: `--workers 1` vs `--workers 2`",
        "",
        f"{cfg['lps']} LPs (v2, 2 pipes each, one session each) on 127.0.0.1, {cfg['cores']} cores shared by "
        f"everything; medians of {cfg['rounds']} rounds, configurations alternating. Churn: one `wrk -t1 "
        f"-c{cfg['churn_connections']}` per LP, `Connection: close`, 1 KiB from nginx, {cfg['seconds']:g} s. "
        f"Bulk: one {cfg['bulk_size'] // MiB} MiB download per LP at once, every byte checked. CPU in cores "
        "(CPU s / wall s) while each ran. Commit " + result["commit"][:12] + ", " + result["date"] + ".",
        "",
        "| workers | churn req/s | churn p99 ms (worst LP) | churn: RP CPU (front) | churn: LPs CPU | churn: client CPU "
        "| bulk MB/s | bulk: RP CPU (front) | bulk: LPs CPU | bulk: client CPU | sessions per worker |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for w in cfg["workers"]:
        s = result["summary"][str(w)]
        lines.append(
            f"| {w} | {s['churn_rps']:.0f} | {s['churn_p99_ms_max']:.1f} "
            f"| {s['churn_cpu_rp']:.2f} ({s['churn_cpu_rp_front']:.2f}) | {s['churn_cpu_lps']:.2f} "
            f"| {s['churn_cpu_client']:.2f} | {s['bulk_MBps']:.0f} | {s['bulk_cpu_rp']:.2f} "
            f"({s['bulk_cpu_rp_front']:.2f}) | {s['bulk_cpu_lps']:.2f} | {s['bulk_cpu_client']:.2f} "
            f"| {s['sessions_per_worker']} |"
        )
    lines += [
        "",
        "Reading it: the front handles pipes only (accept, peek, pass), never a carried connection, so its CPU is "
        "nil in both workloads; what `--workers 2` can add is a second process for the sessions. On this machine "
        "the RP alone does not fill a core (the LPs, nginx, wrk and this process's byte checks share the same 2 "
        "cores), so the gain is bounded by the cores left over, not by the RP; the load average before each run "
        "(below) says how busy the machine was with other work at the time.",
    ]
    lines += ["", "Every round:", ""]
    for r in result["runs"]:
        lines.append(
            f"- round {r['round']}, --workers {r['workers']}: churn {r['churn_rps']:.0f} req/s "
            f"({r['churn_errors']} errors), bulk {r['bulk_MBps']:.0f} MB/s; load average before: {r['load_1m']:.2f}"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0, help="churn duration per configuration")
    p.add_argument("--churn-connections", type=int, default=4, help="wrk connections per LP")
    p.add_argument("--bulk-size", default="64MiB", help="download per LP (a size: 64MiB)")
    p.add_argument("--markdown", action="store_true", help="only rewrite workers.md from --out's workers.json")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "bench/results/scaleout")
    args = p.parse_args()
    if args.markdown:
        (args.out / "workers.md").write_text(markdown(json.loads((args.out / "workers.json").read_text())))
        return 0
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None]
    if missing:
        print(f"missing: {', '.join(missing)} (apt-get install wrk nginx-light)", file=sys.stderr)
        return 1
    size = parse_size("bulk-size", args.bulk_size, MiB)
    raise_nofile()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tm3-scaleout-") as tmp:
        scratch = Path(tmp)
        key = scratch / "tm3.key"
        key.write_text(os.urandom(24).hex() + "\n")
        servers = Servers(scratch)
        try:
            for rnd in range(args.rounds):
                order = CONFIGS if rnd % 2 == 0 else tuple(reversed(CONFIGS))
                for workers in order:
                    system = System(workers, args.lps, servers, scratch, key)
                    try:
                        # Others' load on the shared machine, for the record.
                        r: dict[str, Any] = {"round": rnd + 1, "workers": workers, "load_1m": os.getloadavg()[0]}
                        c = measured(system, lambda s=system: churn(s, args.seconds, args.churn_connections))
                        r.update({k if k.startswith("churn") else f"churn_{k}": v for k, v in c.items()})
                        b = measured(system, lambda s=system: bulk_all(s, servers, size))
                        r.update({k if k.startswith("bulk") else f"bulk_{k}": v for k, v in b.items()})
                        r["sessions_per_worker"] = system.sessions_per_worker()
                    finally:
                        system.stop()
                    runs.append(r)
                    print(
                        f"round {rnd + 1} --workers {workers}: churn {r['churn_rps']:.0f} req/s "
                        f"(RP {r['churn_cpu_rp']:.2f} cores), bulk {r['bulk_MBps']:.0f} MB/s "
                        f"(RP {r['bulk_cpu_rp']:.2f} cores), sessions {r['sessions_per_worker']}",
                        flush=True,
                    )
        finally:
            servers.close()
    summary: dict[str, dict[str, Any]] = {}
    for w in CONFIGS:
        mine = [r for r in runs if r["workers"] == w]
        s: dict[str, Any] = {k: median(mine, k) for k in mine[0] if isinstance(mine[0][k], float)}
        s["sessions_per_worker"] = mine[-1]["sessions_per_worker"]
        summary[str(w)] = s
    result = {
        "commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {
            "lps": args.lps,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "churn_connections": args.churn_connections,
            "bulk_size": size,
            "workers": list(CONFIGS),
            "cores": os.cpu_count(),
        },
        "summary": summary,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "workers.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "workers.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
