"""Eyeball the emulated WAN link: build it, measure it, print the figures.

Not a test (nothing is asserted): it builds ``client --WAN-- rp -- web``
(``tests/support/wan.py``) with the given round trip, loss and rate, then
measures from the client:

* RTT: ``ping -U`` to web (across the WAN and the plain rp -- web veth);
* loss: numbered UDP datagrams each way, against the binomial range the
  target predicts, and what the loss rules counted;
* throughput: ``iperf3`` TCP each way, with the delay daemons' CPU use
  while it ran;
* the daemons' own figures at the end (packets, most held at once, how late
  releases were).

Everything runs inside throwaway namespaces, deleted on exit.

    sudo .venv/bin/python benchmarks/wan_check.py [--rtt-ms 40] [--loss 0.01]
        [--rate-mbit 100] [--seconds 5] [--pings 100] [--datagrams 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from tests.support.netns import Topology, netns_unavailable_reason
from tests.support.wan import WanSpec, WanTopology, build_wan_topology
from tests.support.wanprobe import binomial_interval, iperf3, ping_rtts, udp_sequence


def measure_rtt(t: WanTopology, spec: WanSpec, count: int) -> None:
    rtts = ping_rtts(t.client, t.web_ip, count=count, interval=0.02)
    if not rtts:
        print(f"rtt: no replies to {count} pings")
        return
    rtts.sort()
    p99 = rtts[min(len(rtts) - 1, int(0.99 * len(rtts)))]
    median = statistics.median(rtts)
    print(
        f"rtt ms (ping -U, {len(rtts)}/{count} replies): min {rtts[0]:.3f}  median {median:.3f}  "
        f"mean {statistics.fmean(rtts):.3f}  p99 {p99:.3f}  max {rtts[-1]:.3f}  "
        f"(target {spec.rtt_ms:g}, median {median - spec.rtt_ms:+.3f})"
    )


def measure_loss(t: WanTopology, spec: WanSpec, count: int) -> None:
    lo, hi = binomial_interval(count, spec.loss, tail=1e-6)
    for sender, receiver, address, ingress in (
        (t.client, t.web, t.web_ip, t.rp),
        (t.web, t.client, t.client_ip, t.client),
    ):
        t.wan.ingress_counters(ingress, reset=True)
        got = udp_sequence(sender, receiver, address, count)
        c = t.wan.ingress_counters(ingress)
        lost = count - len(got)
        in_order = got == sorted(got)
        print(
            f"loss {sender.name}->{receiver.name}: {lost}/{count} = {100 * lost / count:.2f}% "
            f"(target {100 * spec.loss:g}%, expected {lo}..{hi}); rule dropped {c.dropped} of {c.arrived}, "
            f"queue overflow {c.overflowed}, {'in order' if in_order else 'REORDERED'}"
        )


def measure_rate(t: WanTopology, seconds: float) -> None:
    for reverse in (False, True):
        label = "web->client" if reverse else "client->web"
        before = t.wan.daemon_cpu_seconds()
        start = time.monotonic()
        r = iperf3(t.client, t.web, t.web_ip, seconds=seconds, omit=1, reverse=reverse)
        elapsed = time.monotonic() - start
        after = t.wan.daemon_cpu_seconds()
        cpu = "  ".join(f"{name} {100 * (after[name] - before[name]) / elapsed:.0f}%" for name in sorted(after))
        rtt = f", mean rtt {r.mean_rtt_ms:.1f} ms" if r.mean_rtt_ms else ""
        print(
            f"tcp {label}: {r.bits_per_second / 1e6:.1f} Mbit/s, {r.retransmits} retransmits{rtt}"
            + (f"; delay daemons' cpu {cpu}" if cpu else "")
        )
    overflow = "  ".join(f"{h.name} {t.wan.ingress_counters(h).overflowed}" for h in (t.client, t.rp))
    print(f"delay queue overflows so far (kernel drops, not the loss rule): {overflow}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, default=40.0, help="round trip added by the link (default 40)")
    parser.add_argument("--loss", type=float, default=0.0, help="loss probability per packet, each way (e.g. 0.01)")
    parser.add_argument("--rate-mbit", type=float, default=None, help="rate limit each way in Mbit/s (default none)")
    parser.add_argument(
        "--queue-ms", type=float, default=None, help="rate limiter's queue in ms (default: one RTT, >= 20)"
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 run length, after 1 s omitted (default 5)")
    parser.add_argument("--pings", type=int, default=100, help="pings for the RTT (default 100)")
    parser.add_argument(
        "--datagrams", type=int, default=2000, help="UDP datagrams each way for the loss (default 2000)"
    )
    args = parser.parse_args(argv)
    reason = netns_unavailable_reason()
    if reason is not None:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    spec = WanSpec(rtt_ms=args.rtt_ms, loss=args.loss, rate_mbit=args.rate_mbit, queue_ms=args.queue_ms)
    print(f"link: {spec}")
    with Topology() as topo:
        t = build_wan_topology(topo, spec)
        measure_rtt(t, spec, args.pings)
        measure_loss(t, spec, args.datagrams)
        measure_rate(t, args.seconds)
        t.wan.check()
        t.wan.close()
        for name, stats in sorted(t.wan.daemon_stats().items()):
            print(f"delay daemon {name}: {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
