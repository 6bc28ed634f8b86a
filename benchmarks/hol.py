"""The head-of-line experiment: page-load time direct and through TM3 with 1,
4 and 8 pipes, across delay and loss, alone and beside a bulk download. Not a
test, a measurement.

Builds the Level 4 bed once (tests/support/level4.py: ``client --WAN-- rp --
web`` in network namespaces, nginx on three origins) and changes the WAN
link in place (``WanLink.reconfigure``) from cell to cell: every RTT in
``--rtt`` times every loss in ``--loss``, at ``--rate-mbit`` (50), each with
and without a bulk download (``--bulk``). The three namespaces use cubic
congestion control (``--cc``: the kernel's default here is BBR, which
shrugs off random loss and so hides what this measures) and do not cache
TCP metrics between connections (``tcp_no_metrics_save``), so a load does
not inherit the ssthresh a previous one left behind.

Workloads (``--workloads``):

* ``browser``: Chromium (tests/support/browser.py) loads the generated
  site's page (tests/support/website.py: 120 objects, about 7.5 MB, over the
  three origins) in a fresh browser context; the time is navigation start
  to the load event's end; a load missing an object or with a failed
  request is an error, not a time (as in benchmarks/pageload.py).
* ``script``: benchmarks/hol_client.py in the client namespace fetches 100
  of the site's objects (its stylesheets, scripts and the first images in
  page order: 1 KiB to 800 KiB) over 6 persistent HTTP/1.1 connections per
  origin, every body checked by size and sha256; the time is the first
  connect started to the last byte of the last object (handshakes count, as
  in a browser; the JSON also has ``request_ms``, from the first request
  sent).

Paths (``--paths``), alternating within each round, their order rotating
from round to round: ``direct`` (the redirect rules off: the client's own
connections cross the WAN), and ``1``, ``4``, ``8``: TM3 in transparent
mode (the bed's redirect rules on, for both workloads, so neither client
knows about TM3), the RP and LP (v2, with the bed's key) started afresh with
that many pipes before each load, ``--proxy-args`` appended to both
``twistd`` command lines.

Bulk (``--bulk on``): one HTTP download of a large (sparse) file from the
first origin, over the same path as the load, started ``--bulk-lead``
seconds before it and stopped after it; its throughput over the load's
window is reported in Mbit/s (the browser's window is from the load's call
to navigation start plus the load time).

Writes under ``--out`` (default bench/results): ``hol.json`` (every sample,
errors included, the conditions, ``--label``, the git commit, the date),
``hol.md`` (a table: median and p95 per condition and path, the bulk's
throughput, and the ratios 4 pipes / 1 pipe and 4 pipes / direct of the
p95) and ``hol.png`` (p95 against loss, a panel per RTT, bulk and
workload). Everything else (the site, the proxies' and nginx's logs, the
browser's profile) goes to ``OUT/scratch``. A failure in one load or one
cell is recorded as an error and the run goes on. Needs root; run from the
checkout's root with ``PYTHONPATH=.``, so the proxies, the bed and the
clients are this checkout's (the venv may point at another one):

    sudo PYTHONPATH=. .venv/bin/python benchmarks/hol.py [--quick] [--rtt 0,40,100] [--loss 0,0.5,1,2]
        [--bulk off,on] [--paths direct,1,4,8] [--workloads browser,script] [--reps 5]
        [--proxy-args "..."] [--label NAME] [--out bench/results]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from attrs import asdict, define, frozen

from tests.support.level4 import Level4
from tests.support.netns import Topology, netns_unavailable_reason
from tests.support.processes import REPO_ROOT
from tests.support.wan import WanSpec, netfilterqueue_missing_reason
from tests.support.website import Site, WebObject, generate

CLIENT = str(REPO_ROOT / "benchmarks" / "hol_client.py")
BULK_PATH = "/bulk.bin"
BULK_BYTES = 16 << 30  # sparse: never read to its end at 50 Mbit/s
SCRIPT_OBJECTS = 100
CONNECTIONS_PER_ORIGIN = 6
PATH_NAMES = {"direct": "direct", "1": "1 pipe", "4": "4 pipes", "8": "8 pipes"}
FULL: dict[str, Any] = {
    "rtt": [0.0, 40.0, 100.0],
    "loss": [0.0, 0.5, 1.0, 2.0],
    "bulk": ["off", "on"],
    "paths": list(PATH_NAMES),
    "workloads": ["browser", "script"],
    "reps": 5,
}
QUICK: dict[str, Any] = {**FULL, "rtt": [40.0], "loss": [0.0, 1.0], "bulk": ["on"], "workloads": ["script"], "reps": 3}


@frozen
class Cell:
    rtt_ms: float
    loss_percent: float
    bulk: bool

    def __str__(self) -> str:
        return f"rtt {self.rtt_ms:g} ms, loss {self.loss_percent:g}%, bulk {'on' if self.bulk else 'off'}"


@define
class Sample:
    rtt_ms: float
    loss_percent: float
    bulk: bool
    workload: str
    path: str
    round: int
    load_ms: float | None = None
    request_ms: float | None = None
    bulk_mbit: float | None = None
    error: str = ""
    #: The machine's 1-minute load average after the load: the delay daemons
    #: and proxies are Python, so a busy machine shows up in the times.
    load1: float | None = None


def p95(samples: Sequence[float]) -> float:
    """Nearest rank: the smallest sample with at least 95% at or below it."""
    ordered = sorted(samples)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def csv_of(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--rtt", type=csv_of(float), help="ms, comma-separated (default 0,40,100)")
    parser.add_argument("--loss", type=csv_of(float), help="%% each way (default 0,0.5,1,2)")
    parser.add_argument("--bulk", type=csv_of(str), help="off,on (default both)")
    parser.add_argument("--paths", type=csv_of(str), help="direct,1,4,8 (the default)")
    parser.add_argument("--workloads", type=csv_of(str), help="browser,script (the default)")
    parser.add_argument("--reps", type=int, help="loads per path, workload and cell (default 5)")
    parser.add_argument("--rate-mbit", type=float, default=50.0)
    parser.add_argument("--proxy-args", default="", help="appended to both twistd tm3rp and tm3lp")
    parser.add_argument("--label", default="", help="a name for this run, kept in hol.json")
    parser.add_argument("--cc", default="cubic", help="TCP congestion control in the namespaces")
    parser.add_argument("--bulk-lead", type=float, default=2.0, help="s the bulk runs before the load")
    parser.add_argument("--timeout", type=float, default=180.0, help="s one load may take")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: rtt 40, loss 0,1, bulk on, script, 3 reps (unless given)"
    )
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    bad = (
        [b for b in args.bulk if b not in ("off", "on")]
        + [p for p in args.paths if p not in PATH_NAMES]
        + [w for w in args.workloads if w not in ("browser", "script")]
    )
    if bad:
        parser.error(f"unknown values: {bad}")
    return args


def unavailable_reason(workloads: Sequence[str]) -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces, iptables, tc)"
    why = netns_unavailable_reason() or netfilterqueue_missing_reason()
    if why:
        return why
    if "browser" in workloads and not Path("/usr/bin/chromium").exists():
        return "the browser workload needs /usr/bin/chromium (or run with --workloads script)"
    return None


def git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# -- the bed ---------------------------------------------------------------------------------


class Bench:
    """The bed, the site, the clients; one :meth:`measure` per load."""

    def __init__(self, bed: Level4, site: Site, scratch: Path, args: argparse.Namespace) -> None:
        self.bed = bed
        self.site = site
        self.args = args
        self.proxy_args = shlex.split(args.proxy_args)
        self.browser: Any = None
        self.pipes = 0  # the proxies running now (0: none)
        objects = [o for o in site.resources if o.size < 1 << 20][:SCRIPT_OBJECTS]
        self.script_objects = objects
        self.spec_file = scratch / "page-spec.json"
        self.spec_file.write_text(
            json.dumps(
                {
                    "objects": [
                        {"origin": o.origin, "path": o.path, "size": o.size, "sha256": sha256_of(site.root, o)}
                        for o in objects
                    ],
                    "connections_per_origin": CONNECTIONS_PER_ORIGIN,
                    "timeout": args.timeout,
                }
            )
        )

    def set_path(self, pipes: int) -> None:
        """Proxies with ``pipes`` pipes, started afresh, and the redirect on;
        or (0) no proxies and the redirect off."""
        bed = self.bed
        for proxy in (bed.lp, bed.rp):
            if proxy is not None:
                proxy.stop()
        bed.lp = bed.rp = None  # start_* builds them again, with the new count
        if pipes:
            bed.start_rp(pipes, *self.proxy_args)
            bed.start_lp(pipes, *self.proxy_args)
        if bed.redirected != bool(pipes):
            bed.redirect(bool(pipes))
        self.pipes = pipes

    def measure(self, workload: str, pipes: int, bulk: bool, sample: Sample) -> None:
        self.set_path(pipes)
        download = self.start_bulk() if bulk else None
        window = (0.0, 0.0)
        try:
            if download is not None:
                time.sleep(self.args.bulk_lead)
                if download.poll() is not None:
                    raise RuntimeError(f"the bulk download ended early: {download.communicate()[0].strip()[:200]}")
            if workload == "script":
                window = self.script_load(sample)
            else:
                window = self.browser_load(sample)
        finally:
            if download is not None:
                result = self.stop_bulk(download)
                if result.get("error") and not sample.error:
                    sample.error = f"bulk: {result['error']}"
                if window[1] > window[0] and result.get("samples"):
                    sample.bulk_mbit = bytes_between(result["samples"], *window) * 8 / (window[1] - window[0]) / 1e6

    def script_load(self, sample: Sample) -> tuple[float, float]:
        client = self.bed.client
        done = client.run(
            client.python_argv(CLIENT, "page", str(self.spec_file)), check=False, timeout=self.args.timeout + 30
        )
        if done.returncode != 0:
            raise RuntimeError(f"page client exit {done.returncode}: {done.stderr.strip()[-300:]}")
        result = json.loads(done.stdout)
        if result["errors"]:
            sample.error = "; ".join(result["errors"][:3])
            return 0.0, 0.0
        sample.load_ms = result["load_ms"]
        sample.request_ms = result["request_ms"]
        return result["start"], result["end"]

    def browser_load(self, sample: Sample) -> tuple[float, float]:
        url = self.site.page_url("http")
        started = time.monotonic()
        load = self.browser.load(url)
        missing = {o.url("http") for o in self.site.resources} - load.resource_names()
        if missing:
            sample.error = f"{len(missing)} objects missing, e.g. {sorted(missing)[0]}"
        elif load.failed or load.errors:
            sample.error = f"failed: {[*load.failed, *load.errors][:3]}"
        else:
            sample.load_ms = load.load_ms
        return started, started + load.load_ms / 1000

    def start_bulk(self) -> subprocess.Popen[str]:
        client = self.bed.client
        return client.popen(
            client.python_argv(CLIENT, "bulk", self.bed.origins[0], BULK_PATH),
            stdin=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    @staticmethod
    def stop_bulk(proc: subprocess.Popen[str]) -> dict[str, Any]:
        try:
            out, _ = proc.communicate("", timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": "the bulk client did not stop"}
        try:
            result: dict[str, Any] = json.loads(out)
        except ValueError:
            return {"error": f"the bulk client said {out.strip()[:200]!r} (exit {proc.returncode})"}
        return result


def sha256_of(root: Path, obj: WebObject) -> str:
    return hashlib.sha256((root / obj.path[1:]).read_bytes()).hexdigest()


def bytes_between(samples: list[list[float]], start: float, end: float) -> float:
    """Bytes the download read between ``start`` and ``end`` (monotonic s),
    interpolated between its (time, bytes so far) samples."""

    def at(t: float) -> float:
        if t <= samples[0][0]:
            return samples[0][1]
        for (t0, b0), (t1, b1) in zip(samples, samples[1:]):
            if t0 <= t <= t1:
                return b0 + (b1 - b0) * ((t - t0) / (t1 - t0) if t1 > t0 else 1)
        return samples[-1][1]

    return at(end) - at(start)


ALLOWED_CC = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")


@contextmanager
def cc_allowed(cc: str) -> Iterator[None]:
    """Let namespaces use ``cc``: outside the root namespace the kernel takes
    as default only an algorithm on this (global) list, and Debian allows
    only reno and bbr. Adding one changes no default; the list is put back
    afterwards."""
    before = ALLOWED_CC.read_text().split()
    if cc in before:
        yield
        return
    print(f"adding {cc} to {ALLOWED_CC} ({' '.join(before)}) for the run", flush=True)
    ALLOWED_CC.write_text(" ".join([*before, cc]))
    try:
        yield
    finally:
        ALLOWED_CC.write_text(" ".join(before))


def set_tcp(bed: Level4, cc: str) -> None:
    for host in (bed.client, bed.rp_host, bed.web):
        host.run(["sysctl", "-q", "-w", f"net.ipv4.tcp_congestion_control={cc}", "net.ipv4.tcp_no_metrics_save=1"])


# -- results ------------------------------------------------------------------------------------


def summary(samples: list[Sample]) -> dict[str, Any]:
    times = [s.load_ms for s in samples if s.load_ms is not None]
    bulk = [s.bulk_mbit for s in samples if s.bulk_mbit is not None and s.load_ms is not None]
    return {
        "n": len(times),
        "errors": sum(1 for s in samples if s.error),
        "median": statistics.median(times) if times else None,
        "p95": p95(times) if times else None,
        "bulk_mbit": statistics.median(bulk) if bulk else None,
    }


def groups(samples: list[Sample]) -> dict[tuple[str, float, float, bool], dict[str, list[Sample]]]:
    """(workload, rtt, loss, bulk) -> path -> samples, in the order first seen."""
    out: dict[tuple[str, float, float, bool], dict[str, list[Sample]]] = {}
    for s in samples:
        out.setdefault((s.workload, s.rtt_ms, s.loss_percent, s.bulk), {}).setdefault(s.path, []).append(s)
    return out


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def markdown(samples: list[Sample], meta: dict[str, Any]) -> str:
    lines = [
        f"# Head-of-line experiment{': ' + meta['label'] if meta['label'] else ''}",
        "",
        f"{meta['date']}, commit {meta['commit']}; WAN {meta['rate_mbit']:g} Mbit/s, {meta['cc']};"
        f" {meta['reps']} loads per path and cell; proxy args: `{meta['proxy_args'] or '(none)'}`.",
        "Page load in ms (median and p95, nearest rank); bulk: the download's median throughput during the loads.",
        "Ratios are of the p95.",
    ]
    loads = [s.load1 for s in samples if s.load1 is not None]
    if loads:
        lines.append(
            f"Machine load (1-minute average, after each load): median {statistics.median(loads):.1f},"
            f" max {max(loads):.1f} on {os.cpu_count()} CPUs."
        )
    lines += [
        "",
        "| workload | RTT ms | loss % | bulk | path | n | median | p95 | bulk Mbit/s | errors | 4p/1p | 4p/direct |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (workload, rtt, loss, bulk), paths in groups(samples).items():
        stats = {path: summary(ss) for path, ss in paths.items()}
        four = stats.get("4 pipes", {}).get("p95")
        for path in [p for p in PATH_NAMES.values() if p in stats]:
            st = stats[path]
            ratios = ["", ""]
            if path == "4 pipes":
                ratios = [
                    _ratio(four, stats.get("1 pipe", {}).get("p95")),
                    _ratio(four, stats.get("direct", {}).get("p95")),
                ]
            mbit = "-" if st["bulk_mbit"] is None else f"{st['bulk_mbit']:.1f}"
            lines.append(
                f"| {workload} | {rtt:g} | {loss:g} | {'on' if bulk else 'off'} | {path} | {st['n']} |"
                f" {_ms(st['median'])} | {_ms(st['p95'])} | {mbit} | {st['errors'] or ''} | {ratios[0]} | {ratios[1]} |"
            )
    return "\n".join(lines) + "\n"


def plot(samples: list[Sample], path: Path) -> str:
    """p95 against loss: a row per (workload, bulk), a column per RTT, a line per path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no hol.png: matplotlib is missing (pip install -e '.[bench]')"
    g = groups(samples)
    rows = sorted({(w, b) for w, _, _, b in g})
    rtts = sorted({r for _, r, _, _ in g})
    fig, axes = plt.subplots(
        len(rows), len(rtts), figsize=(4.2 * len(rtts), 3.2 * len(rows)), squeeze=False, sharex=True
    )
    for i, (workload, bulk) in enumerate(rows):
        for j, rtt in enumerate(rtts):
            ax = axes[i][j]
            for name in PATH_NAMES.values():
                points = sorted(
                    (loss, summary(paths[name])["p95"])
                    for (w, r, loss, b), paths in g.items()
                    if (w, r, b) == (workload, rtt, bulk) and name in paths
                )
                points = [(x, y) for x, y in points if y is not None]
                if points:
                    ax.plot([x for x, _ in points], [y / 1000 for _, y in points], marker="o", label=name)
            ax.set_title(f"{workload}, RTT {rtt:g} ms, bulk {'on' if bulk else 'off'}", fontsize=9)
            ax.set_xlabel("loss %")
            ax.set_ylabel("p95 page load (s)")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return ""


def write_results(out: Path, samples: list[Sample], meta: dict[str, Any]) -> str:
    (out / "hol.json").write_text(json.dumps({**meta, "samples": [asdict(s) for s in samples]}, indent=1))
    table = markdown(samples, meta)
    (out / "hol.md").write_text(table)
    return table


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    scratch = out / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    cells = [
        Cell(rtt, loss, bulk == "on") for rtt in args.rtt for loss in args.loss for bulk in args.bulk
    ]  # rtt outermost: a new delay restarts the delay daemons
    paths = [PATH_NAMES[p] for p in args.paths]
    pipes_of = {PATH_NAMES[p]: (0 if p == "direct" else int(p)) for p in args.paths}
    meta: dict[str, Any] = {
        "label": args.label,
        "commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
        "rate_mbit": args.rate_mbit,
        "cc": args.cc,
        "reps": args.reps,
        "proxy_args": args.proxy_args,
        "bulk_lead_s": args.bulk_lead,
        "mode": "transparent (tm3-redirect), both workloads",
        "script": {"objects": SCRIPT_OBJECTS, "connections_per_origin": CONNECTIONS_PER_ORIGIN},
        "cells": [],
    }
    samples: list[Sample] = []
    site = generate(scratch / "www", video=False)
    with open(site.root / BULK_PATH[1:], "wb") as f:
        f.truncate(BULK_BYTES)
    started = time.monotonic()
    (scratch / "bed").mkdir(exist_ok=True)
    with cc_allowed(args.cc), Topology() as topo:
        bed = Level4(topo, scratch / "bed", WanSpec(cells[0].rtt_ms, cells[0].loss_percent / 100, args.rate_mbit))
        topo.add_cleanup(bed.close)
        set_tcp(bed, args.cc)
        bed.start_nginx(site.root)
        bench = Bench(bed, site, scratch, args)
        objs = bench.script_objects
        meta["script"]["bytes"] = sum(o.size for o in objs)
        meta["script"]["sizes"] = [min(o.size for o in objs), max(o.size for o in objs)]
        meta["browser"] = {"objects": len(site.resources) + 1, "bytes": site.total_bytes}
        print(
            f"script: {len(objs)} objects, {meta['script']['bytes'] / 1e6:.1f} MB; browser: "
            f"{len(site.resources) + 1} objects, {site.total_bytes / 1e6:.1f} MB; {len(cells)} cells",
            flush=True,
        )
        try:
            if "browser" in args.workloads:
                from tests.support.browser import Browser

                bench.browser = Browser(bed.client, scratch / "browser", trust=bed.web_cert.cert, timeout=args.timeout)
                meta["browser"]["chromium"] = bench.browser.version
            for n, cell in enumerate(cells):
                cell_started = time.monotonic()
                cell_meta: dict[str, Any] = {**asdict(cell), "error": ""}
                meta["cells"].append(cell_meta)
                try:
                    bed.t.wan.reconfigure(WanSpec(cell.rtt_ms, cell.loss_percent / 100, args.rate_mbit))
                    bed.t.wan.check()
                    for workload in args.workloads:  # warm-up: not recorded
                        bench.set_path(0)
                        warm = Sample(cell.rtt_ms, cell.loss_percent, False, workload, "direct", -1)
                        (bench.script_load if workload == "script" else bench.browser_load)(warm)
                    for round_ in range(args.reps):
                        k = round_ % len(paths)
                        order = paths[k:] + paths[:k]
                        for workload in args.workloads:
                            for path in order:
                                s = Sample(cell.rtt_ms, cell.loss_percent, cell.bulk, workload, path, round_)
                                try:
                                    bench.measure(workload, pipes_of[path], cell.bulk, s)
                                except Exception as e:  # one load's failure is a result, not the end
                                    s.error = s.error or f"{type(e).__name__}: {e}"[:500]
                                s.load1 = os.getloadavg()[0]
                                samples.append(s)
                                took = f"{s.load_ms:.0f} ms" if s.load_ms is not None else f"ERROR {s.error[:120]}"
                                bulk = f", bulk {s.bulk_mbit:.1f} Mbit/s" if s.bulk_mbit is not None else ""
                                print(
                                    f"[{time.monotonic() - started:6.0f}s] cell {n + 1}/{len(cells)} ({cell})"
                                    f" {workload} round {round_ + 1}/{args.reps} {path}: {took}{bulk}",
                                    flush=True,
                                )
                        write_results(out, samples, meta)
                except Exception as e:  # a broken cell is recorded; the next may work
                    cell_meta["error"] = f"{type(e).__name__}: {e}"[:500]
                    print(f"cell {cell}: ERROR {cell_meta['error']}", flush=True)
                cell_meta["seconds"] = round(time.monotonic() - cell_started, 1)
                write_results(out, samples, meta)
        finally:
            if bench.browser is not None:
                bench.browser.close()
            try:
                bench.set_path(0)
            finally:
                meta["seconds"] = round(time.monotonic() - started, 1)
                write_results(out, samples, meta)
    # The delay daemons' last words (how late they released packets), now that the topology has closed.
    meta["delayd"] = bed.t.wan.daemon_stats()
    table = write_results(out, samples, meta)
    why_no_plot = plot(samples, out / "hol.png")
    print()
    print(table)
    print(why_no_plot or f"wrote {out / 'hol.json'}, {out / 'hol.md'}, {out / 'hol.png'}")
    per_cell = [c["seconds"] for c in meta["cells"] if "seconds" in c]
    if per_cell:
        print(f"{meta['seconds']:.0f} s in all; per cell {min(per_cell):.0f}-{max(per_cell):.0f} s")
    return 1 if any(s.error for s in samples) or any(c["error"] for c in meta["cells"]) else 0


def main() -> int:
    args = parse_args()
    why = unavailable_reason(args.workloads)
    if why:
        print(f"hol.py: cannot run: {why}", file=sys.stderr)
        return 2
    # SIGTERM -> KeyboardInterrupt, so the finally blocks and the topology still tear down.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
