"""Measurements across a link of a namespace topology: round trips with
``ping``, numbered UDP datagrams (loss and order), TCP throughput with
``iperf3``, and the binomial bounds a loss count is judged by.

Used by ``tests/test_wan.py`` to check :mod:`tests.support.wan` and by
``benchmarks/wan_check.py`` to print what a link does. All traffic stays
inside the topology's namespaces.
"""

from __future__ import annotations

import json
import math
import re
import socket
import struct
import time

from attrs import frozen

from tests.support.netns import Host, NetnsError

__all__ = [
    "IperfResult",
    "binomial_interval",
    "iperf3",
    "ping_rtts",
    "udp_sequence",
]

_PING_TIME = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")
# Python 3.11's socket module lacks it; root may exceed net.core.rmem_max with it.
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SEQ = struct.Struct("!I")


def ping_rtts(host: Host, address: str, count: int = 50, interval: float = 0.02) -> list[float]:
    """Round trips in ms of ``count`` pings from ``host`` to ``address`` (lost ones left out).

    ``-U`` times each ping in user space: without it ping uses the kernel's
    receive stamp, taken before an ingress delay, and misses that half.
    """
    done = host.run(
        ["ping", "-U", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", "2", address],
        check=False,
        timeout=count * interval + 30,
    )
    if done.returncode not in (0, 1):  # 1: some replies missing
        raise NetnsError(f"ping {address} from {host.name} failed: {done.stderr.strip() or done.stdout.strip()}")
    return [float(m.group(2)) for m in _PING_TIME.finditer(done.stdout)]


def udp_sequence(
    sender: Host,
    receiver: Host,
    address: str,
    count: int,
    port: int = 9999,
    size: int = 100,
    burst: int = 50,
    gap: float = 0.001,
    quiet: float = 1.0,
) -> list[int]:
    """Send datagrams numbered 0..count-1 from ``sender`` to ``address:port``
    on ``receiver``; return the numbers received, in the order received.

    Datagrams go out ``burst`` at a time with ``gap`` seconds between bursts
    (``burst=count`` sends them back to back). Receiving stops once nothing
    has arrived for ``quiet`` seconds after the last one was sent.
    """
    rx = receiver.make_socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = sender.make_socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # Everything sent may be in flight at once; the receiver reads only
        # after sending, so its buffer must hold it all.
        rx.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 * 1024 * 1024)
        rx.bind(("0.0.0.0", port))
        padding = b"\0" * max(0, size - _SEQ.size)
        for i in range(count):
            tx.sendto(_SEQ.pack(i) + padding, (address, port))
            if (i + 1) % burst == 0 and gap > 0:
                time.sleep(gap)
        got: list[int] = []
        rx.settimeout(quiet)
        while True:
            try:
                data = rx.recv(65536)
            except TimeoutError:
                break
            got.append(_SEQ.unpack_from(data)[0])
        return got
    finally:
        rx.close()
        tx.close()


@frozen
class IperfResult:
    """One ``iperf3`` TCP run."""

    #: Goodput the receiver saw (omitted warm-up left out), in bit/s.
    bits_per_second: float
    #: TCP retransmissions at the sender.
    retransmits: int
    #: Mean smoothed RTT at the sender, in ms (0 if not reported).
    mean_rtt_ms: float


def iperf3(
    client: Host,
    server: Host,
    server_address: str,
    seconds: float = 4,
    omit: float = 1,
    reverse: bool = False,
    port: int = 5201,
) -> IperfResult:
    """Run ``iperf3`` with its server on ``server`` and its client on ``client``.

    Data flows client -> server, or server -> client with ``reverse``. The
    first ``omit`` seconds (slow start) are left out of the figure.
    """
    srv = server.popen(["iperf3", "-s", "-1", "-B", server_address, "-p", str(port)])
    try:
        _wait_listening(server, port)
        argv = ["iperf3", "-c", server_address, "-p", str(port), "-t", f"{seconds:g}", "-O", f"{omit:g}", "-J"]
        if reverse:
            argv.append("-R")
        done = client.run(argv, check=False, timeout=seconds + omit + 30)
        try:
            report = json.loads(done.stdout)
        except json.JSONDecodeError:
            raise NetnsError(f"iperf3 gave no report: {done.stderr.strip() or done.stdout.strip()}") from None
        if "error" in report:
            raise NetnsError(f"iperf3: {report['error']}")
        end = report["end"]
        streams = end.get("streams", [])
        rtts = [s["sender"].get("mean_rtt", 0) for s in streams if "sender" in s]
        return IperfResult(
            bits_per_second=float(end["sum_received"]["bits_per_second"]),
            retransmits=int(end["sum_sent"].get("retransmits", 0)),
            mean_rtt_ms=(sum(rtts) / len(rtts) / 1000) if rtts else 0.0,
        )
    finally:
        if srv.poll() is None:
            srv.terminate()
        srv.communicate(timeout=10)


def _wait_listening(host: Host, port: int, timeout: float = 10) -> None:
    # Polled with ss, not by connecting: a probe connection would be the
    # one-off server's only client.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout.strip():
            return
        time.sleep(0.05)
    raise NetnsError(f"iperf3 server on {host.name} not listening on {port} after {timeout}s")


def binomial_interval(n: int, p: float, tail: float = 1e-6) -> tuple[int, int]:
    """The counts ``lo..hi`` of a Binomial(n, p) outside which each tail has
    probability at most ``tail``: a count of lost packets outside them says
    the loss rate is not ``p`` (wrongly once in 1/(2*tail) runs)."""
    log_p = math.log(p) if p > 0 else -math.inf
    log_q = math.log1p(-p) if p < 1 else -math.inf

    def pmf(k: int) -> float:
        if p == 0:
            return 1.0 if k == 0 else 0.0
        log = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
        return math.exp(log)

    probs = [pmf(k) for k in range(n + 1)]
    lo, acc = 0, 0.0
    while lo < n and acc + probs[lo] <= tail:
        acc += probs[lo]
        lo += 1
    hi, acc = n, 0.0
    while hi > 0 and acc + probs[hi] <= tail:
        acc += probs[hi]
        hi -= 1
    return lo, hi
