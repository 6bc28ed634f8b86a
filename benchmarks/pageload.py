"""Page-load time in a real browser, direct and through TM3 with 1 and 4 pipes.
Not a test, a measurement (issue "Level 4 for real").

Builds the Level 4 bed (tests/support/level4.py: ``client --WAN-- rp -- web``
in network namespaces, nginx on three origins), generates the test site
(tests/support/website.py: one page of 120 objects, about 8 MB, over three
origins) and loads its page with Debian's Chromium driven by Playwright
inside the client's namespace (tests/support/browser.py), ``--loads`` times
in each mode:

* ``direct``: no TM3 (the redirect rules off; the client reaches nginx
  through the rp host's routing, across the same WAN);
* ``tm3 1 pipe`` and ``tm3 4 pipes``: transparent mode (the redirect rules
  on, no proxy setting in the browser), the RP and LP (v2, with a key)
  restarted with that many pipes before each load.

The modes alternate within each round, their order rotating from round to
round. Each load is in a fresh browser context (no cache, no open
connections) of one Chromium, after one unrecorded warm-up load; a load that
misses an object or has a failed request is an error, not a time. Prints the
median and p95 (nearest rank: with fewer than 20 loads, the slowest) of the
load time, navigation start to the load event's end, per mode; writes every
sample to ``OUT/pageload.json``. Everything it writes (the site, the bed's
logs, the browser's profile) is under ``--out``, except that Chromium's
profile goes to a fresh directory in the system's temporary directory
(removed at the end) when ``--out`` is too long a path for the UNIX socket
Chromium keeps there. Needs root.

    sudo .venv/bin/python benchmarks/pageload.py --out /tmp/pageload [--loads 10]
        [--rtt-ms 40] [--loss 0.005] [--rate-mbit 50] [--scheme http]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from tests.support.browser import Browser, PageLoad
from tests.support.level4 import Level4
from tests.support.netns import Topology, netns_unavailable_reason
from tests.support.wan import WanSpec, netfilterqueue_missing_reason
from tests.support.website import Site, generate

MODES = {"direct": 0, "tm3 1 pipe": 1, "tm3 4 pipes": 4}


def p95(samples: list[float]) -> float:
    """Nearest rank: the smallest sample with at least 95% at or below it."""
    ordered = sorted(samples)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


def restart_proxies(bed: Level4, pipes: int) -> None:
    """Stop both proxies and start them anew with ``pipes`` pipes."""
    for proxy in (bed.lp, bed.rp):
        if proxy is not None:
            proxy.stop()
    bed.lp = bed.rp = None  # start_* builds them again, with the new count
    bed.start_rp(pipes)
    bed.start_lp(pipes)


def complete(load: PageLoad, site: Site, scheme: str) -> str:
    """Why ``load`` is not a complete load of the page ("" if it is)."""
    missing = {o.url(scheme) for o in site.resources} - load.resource_names()
    if missing:
        return f"{len(missing)} objects missing, e.g. {sorted(missing)[0]}"
    if load.failed or load.errors:
        return f"failed: {[*load.failed, *load.errors][:3]}"
    return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for everything this writes")
    parser.add_argument("--loads", type=int, default=10, help="page loads per mode (default 10)")
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--loss", type=float, default=0.005)
    parser.add_argument("--rate-mbit", type=float, default=50.0, help="0: no rate limit")
    parser.add_argument("--scheme", choices=("http", "https"), default="http")
    args = parser.parse_args()
    why = netns_unavailable_reason() or netfilterqueue_missing_reason()
    if why:
        print(f"cannot build the bed here: {why}")
        return 1
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    spec = WanSpec(rtt_ms=args.rtt_ms, loss=args.loss, rate_mbit=args.rate_mbit or None)
    site = generate(out / "www", video=False)
    url = site.page_url(args.scheme)
    samples: dict[str, list[float]] = {mode: [] for mode in MODES}
    errors: dict[str, list[str]] = {mode: [] for mode in MODES}
    started = time.monotonic()
    with Topology() as topo:
        (out / "bed").mkdir(exist_ok=True)
        bed = Level4(topo, out / "bed", spec)
        topo.add_cleanup(bed.close)
        bed.start_nginx(site.root)
        with Browser(bed.client, out / "browser", trust=bed.web_cert.cert) as browser:
            browser.load(url)  # warm-up: not recorded
            modes = list(MODES)
            for round_ in range(args.loads):
                order = modes[round_ % len(modes) :] + modes[: round_ % len(modes)]
                for mode in order:
                    pipes = MODES[mode]
                    if pipes:
                        restart_proxies(bed, pipes)
                    bed.redirect(bool(pipes))
                    load = browser.load(url)
                    why_not = complete(load, site, args.scheme)
                    if why_not:
                        errors[mode].append(why_not)
                    else:
                        samples[mode].append(load.load_ms)
                    if pipes:
                        bed.settled()
                print(
                    f"round {round_ + 1}/{args.loads}: "
                    + ", ".join(f"{m} {samples[m][-1]:.0f} ms" for m in order if samples[m]),
                    flush=True,
                )
            bed.redirect(False)
    elapsed = time.monotonic() - started

    rate = f"{args.rate_mbit:g} Mbit/s" if args.rate_mbit else "no rate limit"
    print()
    print(
        f"page load (navigation start to load event end) of {url}: {len(site.page_objects())} objects,"
        f" {site.total_bytes / 1e6:.1f} MB, 3 origins; Chromium {browser.version}"
    )
    print(
        f"WAN {args.rtt_ms:g} ms RTT, {100 * args.loss:g}% loss, {rate}; {args.loads} loads per mode,"
        f" modes alternating per round; {elapsed:.0f} s in all"
    )
    print(f"  {'mode':12} {'median':>8} {'p95':>8} {'min':>8} {'max':>8}  (ms)  loads")
    for mode, values in samples.items():
        if values:
            print(
                f"  {mode:12} {statistics.median(values):8.0f} {p95(values):8.0f} {min(values):8.0f}"
                f" {max(values):8.0f}        {len(values)}"
                + (f" ({len(errors[mode])} incomplete)" if errors[mode] else "")
            )
        else:
            print(f"  {mode:12} no complete load: {errors[mode][:3]}")
    (out / "pageload.json").write_text(
        json.dumps(
            {
                "url": url,
                "objects": len(site.page_objects()),
                "bytes": site.total_bytes,
                "wan": {"rtt_ms": args.rtt_ms, "loss": args.loss, "rate_mbit": args.rate_mbit},
                "load_ms": samples,
                "incomplete": errors,
            },
            indent=2,
        )
    )
    return 0 if not any(errors.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
