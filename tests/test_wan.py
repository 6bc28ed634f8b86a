"""The emulated WAN link (tests/support/wan.py, tests/support/delayd.py):
its round trip, loss rate, order and rate, measured with real packets
between namespaces; and the delay line's logic without any.

The netns tests skip where namespaces cannot be made (not root, no ``ip``)
but fail where they can and the delay daemon cannot run (netfilterqueue
missing): CI installs it with ``scripts/setup``.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
from collections.abc import Callable

import pytest

from tests.support.delayd import DelayLine, Oversleep, WallClock, main
from tests.support.netns import NetnsError, Topology
from tests.support.wan import WanLink, WanSpec, WanTopology, netfilterqueue_missing_reason
from tests.support.wanprobe import binomial_interval, iperf3, ping_rtts, udp_sequence

MakeWan = Callable[[WanSpec], WanTopology]


# -- the delay line, no packets -------------------------------------------


class FakePacket:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    def accept(self) -> None:
        self.log.append(self.name)


def test_delay_line_releases_each_packet_when_due_in_arrival_order() -> None:
    log: list[str] = []
    line = DelayLine(0.020)
    line.push(1.000, FakePacket("a", log))
    line.push(1.001, FakePacket("b", log))
    line.push(1.001, FakePacket("c", log))
    assert line.next_due() == pytest.approx(1.020)
    assert line.release_due(1.0199) == 0
    assert line.release_due(1.0200) == 1
    assert log == ["a"]
    assert line.release_due(1.0215) == 2
    assert log == ["a", "b", "c"]
    assert line.next_due() is None
    assert (line.packets, line.max_held, line.released) == (3, 3, 3)
    assert line.late_max == pytest.approx(0.0005)


def test_delay_line_never_lets_a_packet_overtake_the_one_ahead() -> None:
    # The daemon stamps a packet itself when the kernel gave no stamp; a
    # kernel-stamped packet behind it may then look older than it.
    log: list[str] = []
    line = DelayLine(0.010)
    line.push(2.000, FakePacket("daemon-stamped", log))
    line.push(1.995, FakePacket("kernel-stamped", log))
    assert line.release_due(2.009) == 0
    assert line.release_due(2.010) == 2
    assert log == ["daemon-stamped", "kernel-stamped"]


def test_delay_line_release_all_lets_everything_through_in_order() -> None:
    log: list[str] = []
    line = DelayLine(1.0)
    for i in range(5):
        line.push(float(i), FakePacket(str(i), log))
    assert line.release_all() == 5
    assert log == ["0", "1", "2", "3", "4"]
    assert len(line) == 0


def test_delay_line_lateness_quantiles() -> None:
    line = DelayLine(0.0)
    log: list[str] = []
    for i in range(100):
        line.push(float(i), FakePacket("p", log))
        # 99 releases 5 us late, one 2 ms late
        line.release_due(i + (0.002 if i == 50 else 0.000005))
    assert line.late_quantile(0.5) == pytest.approx(10e-6)
    assert line.late_quantile(1.0) == pytest.approx(2.01e-3)
    assert "late_p99_us=10 " in line.stats()


def test_delay_line_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError):
        DelayLine(-0.001)


def test_oversleep_learns_the_usual_lateness_and_ignores_huge_outliers() -> None:
    o = Oversleep(initial=0.0, ceiling=1e-3)
    for _ in range(200):
        o.observe(150e-6)
    assert o.margin == pytest.approx(150e-6, rel=0.01)
    o.observe(5.0)  # a descheduled VM: counted as the ceiling only
    assert o.margin < 210e-6  # one sixteenth of (ceiling - 150 us) added
    o.observe(-1.0)
    assert o.margin >= 0


def test_wall_clock_offset_comes_from_the_tightest_reading() -> None:
    # wall = monotonic + 1000, but the first reading is split by a 500 us
    # preemption between its wall and monotonic reads.
    mono = iter([10.0, 10.001, 10.002])
    wall = iter([1010.0, 1010.0005, 1010.001, 1010.001, 1010.002, 1010.002])
    clock = WallClock(wall=lambda: next(wall), monotonic=lambda: next(mono), tries=3)
    assert clock.offset == pytest.approx(1000.0, abs=1e-9)
    assert clock.spread == pytest.approx(0.0, abs=1e-9)
    assert clock.to_monotonic(1010.5) == pytest.approx(10.5)


def test_delayd_rejects_bad_arguments() -> None:
    with pytest.raises(SystemExit):
        main(["--queue", "1", "--delay-ms", "-5"])
    with pytest.raises(SystemExit):
        main(["--queue", "70000", "--delay-ms", "5"])


def test_wan_spec_validation_and_tbf_parameters() -> None:
    with pytest.raises(ValueError):
        WanSpec(loss=1.0)
    with pytest.raises(ValueError):
        WanSpec(rtt_ms=-1)
    with pytest.raises(ValueError):
        WanSpec(rate_mbit=0)
    # 50 Mbit/s: 2 ms of burst (12500 bytes), a round trip of queue
    assert WanSpec(rtt_ms=40, rate_mbit=50).tbf_args() == [
        "rate",
        "50000000bit",
        "burst",
        "12500",
        "latency",
        "40ms",
    ]
    # slow and short: at least two frames of burst, at least 20 ms of queue
    assert WanSpec(rate_mbit=1).tbf_args()[3:] == ["3028", "latency", "20ms"]


def test_binomial_interval_brackets_the_mean_like_a_normal_approximation() -> None:
    lo, hi = binomial_interval(2000, 0.05, tail=1e-6)
    sd = math.sqrt(2000 * 0.05 * 0.95)
    assert lo < 100 < hi
    # 1e-6 per tail is about 4.75 standard deviations
    assert 4 * sd < 100 - lo < 5 * sd
    assert 4 * sd < hi - 100 < 5.5 * sd
    assert binomial_interval(100, 0.0) == (0, 0)


# -- the link, with real packets ------------------------------------------


@pytest.mark.netns
def test_netfilterqueue_is_installed_where_namespaces_work(topology: Topology) -> None:
    # `topology` skips where namespaces are impossible; here they work, so
    # the delay daemon must be able to run.
    assert netfilterqueue_missing_reason() is None


@pytest.mark.netns
def test_ping_round_trip_is_the_target(make_wan_topology: MakeWan) -> None:
    t = make_wan_topology(WanSpec(rtt_ms=40))
    to_web = ping_rtts(t.client, t.web_ip, count=50, interval=0.02)
    to_rp = ping_rtts(t.client, t.rp_ip, count=20, interval=0.02)
    rp_to_web = ping_rtts(t.rp, t.web_ip, count=10, interval=0.02)
    t.wan.check()
    assert len(to_web) == 50 and len(to_rp) == 20
    for rtts in (to_web, to_rp):
        # Never early (each end holds a packet 20 ms from the moment it sees
        # it); late by the daemons' wake-ups and ping's own time, under 1 ms.
        assert min(rtts) >= 40.0, rtts
        assert statistics.median(rtts) <= 41.0, rtts
    # rp <-> web is not the WAN link
    assert statistics.median(rp_to_web) < 1.0, rp_to_web


@pytest.mark.netns
def test_loss_rate_is_the_target_each_way_and_nothing_else_is_lost(make_wan_topology: MakeWan) -> None:
    n, p = 2000, 0.05
    t = make_wan_topology(WanSpec(rtt_ms=10, loss=p))
    lo, hi = binomial_interval(n, p, tail=1e-6)
    for sender, receiver, address in ((t.client, t.web, t.web_ip), (t.web, t.client, t.client_ip)):
        # the end of the WAN link where this direction's packets arrive
        ingress = t.rp if receiver is t.web else t.client
        t.wan.ingress_counters(ingress, reset=True)
        got = udp_sequence(sender, receiver, address, n)
        counters = t.wan.ingress_counters(ingress)
        lost = n - len(got)
        assert lo <= lost <= hi, f"{sender.name}->{receiver.name}: lost {lost} of {n}, expected {lo}..{hi}"
        # Every loss is the loss rule's doing: nothing overflowed, nothing
        # else went missing, and what arrived stayed in order.
        assert counters.arrived == n
        assert counters.dropped == lost
        assert counters.overflowed == 0
        assert got == sorted(got)
    t.wan.check()


@pytest.mark.netns
def test_back_to_back_datagrams_arrive_all_and_in_order(wan_topology: WanTopology) -> None:
    n = 5000
    t = wan_topology  # 40 ms, no loss
    # All sent at once, so thousands are held in each daemon together.
    there = udp_sequence(t.client, t.web, t.web_ip, n, burst=n)
    back = udp_sequence(t.web, t.client, t.client_ip, n, burst=n)
    t.wan.check()
    assert there == list(range(n))
    assert back == list(range(n))
    t.wan.close()
    held = t.wan.daemon_stats()
    assert set(held) == {"client", "rp"}
    assert all(int(dict(kv.split("=") for kv in s.split())["max_held"]) > 100 for s in held.values()), held


@pytest.mark.netns
def test_rate_limit_is_reached_and_not_exceeded(make_wan_topology: MakeWan) -> None:
    rate = 50e6
    t = make_wan_topology(WanSpec(rtt_ms=40, rate_mbit=rate / 1e6))
    # Goodput is at most 1448/1514 of the frame rate tbf counts (TCP, IP,
    # timestamps, Ethernet headers); one round trip of buffer lets one TCP
    # flow keep the link nearly full.
    up = iperf3(t.client, t.web, t.web_ip, seconds=3, omit=1)
    assert 0.85 * rate <= up.bits_per_second <= rate, up
    assert up.mean_rtt_ms >= 40, up
    # And without the delay, the other way (web -> client, shaped at the rp).
    t.wan.reconfigure(WanSpec(rate_mbit=rate / 1e6))
    down = iperf3(t.client, t.web, t.web_ip, seconds=3, omit=1, reverse=True)
    assert 0.85 * rate <= down.bits_per_second <= rate, down
    t.wan.check()


@pytest.mark.netns
def test_a_dead_delay_daemon_stops_the_link(make_wan_topology: MakeWan) -> None:
    t = make_wan_topology(WanSpec(rtt_ms=10))
    assert len(ping_rtts(t.client, t.web_ip, count=3, interval=0.05)) == 3
    os.kill(t.wan.daemon_pids()["rp"], signal.SIGKILL)
    # No --queue-bypass: with nobody on the queue the kernel drops, so a
    # test notices instead of running on a link without its delay.
    assert ping_rtts(t.client, t.web_ip, count=3, interval=0.05) == []
    with pytest.raises(NetnsError, match="delay daemon on rp"):
        t.wan.check()


@pytest.mark.netns
def test_a_daemon_that_cannot_start_fails_the_link_with_its_error(topology: Topology) -> None:
    a, b = topology.add_host("a"), topology.add_host("b")
    wan = WanLink(topology.link(a, b, "10.77.9.0/24"), WanSpec(rtt_ms=10))
    wan.ends[1].queue_num = 70000  # out of range: delayd refuses it
    with pytest.raises(NetnsError, match=r"(?s)delay daemon on b:eth0 did not start.*--queue must be 0\.\.65535"):
        wan.start()


@pytest.mark.netns
def test_closing_the_link_leaves_a_plain_veth(make_wan_topology: MakeWan) -> None:
    t = make_wan_topology(WanSpec(rtt_ms=20, loss=0.01, rate_mbit=100))
    t.wan.close()
    for host in (t.client, t.rp):
        assert "TM3WAN" not in host.run(["iptables", "-t", "raw", "-S"]).stdout
        assert "tbf" not in host.run(["tc", "qdisc", "show"]).stdout
    assert statistics.median(ping_rtts(t.client, t.web_ip, count=10, interval=0.02)) < 1.0
    t.wan.close()  # twice is fine
