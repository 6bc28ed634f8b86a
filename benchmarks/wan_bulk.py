"""One connection across an emulated wide-area link: TM3 v1 and v2 against
direct TCP. Not a test, a measurement (issue 7: a single v2 connection at
40 ms RTT should reach at least 0.8x direct).

Builds ``client --WAN-- rp -- web`` in network namespaces
(``tests/support/wan.py``: delay by NFQUEUE daemons on ingress, rate by
``tbf``), runs the RP (``twistd tm3rp``) on ``rp``, the LP (SOCKS5) on
``client`` and a source server on ``web``, then downloads ``--mib`` MiB
from the client, sha256 checked: directly, through TM3 v1 and through TM3 v2
(``--key-file``), alternating for ``--rounds`` rounds. Prints MB/s, the
medians and the ratios. Needs root.

    sudo .venv/bin/python benchmarks/wan_bulk.py [--rtt-ms 40] [--rate-mbit 100]
        [--loss 0] [--mib 64] [--rounds 3] [--pipes 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tests.support.netns import Host, Topology, netns_unavailable_reason
from tests.support.processes import TWISTD
from tests.support.wan import WanSpec, build_wan_topology, netfilterqueue_missing_reason

WEB_PORT = 8000
SOCKS = "127.0.0.1:1080"

SERVER = """
import socket, sys
from tests.support.pattern import Pattern
size = int(sys.argv[1])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[2]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    with c:
        try:
            for chunk in Pattern(3).chunks(size, 512 * 1024):
                c.sendall(chunk)
            c.shutdown(socket.SHUT_WR)
            while c.recv(65536):
                pass
        except OSError:
            pass
"""

CLIENT = """
import hashlib, socket, struct, sys, time
from tests.support.pattern import Pattern
host, port, size, via = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = time.monotonic()
if via == "direct":
    s = socket.create_connection((host, port), timeout=120)
else:
    sh, sp = via.split(":")
    s = socket.create_connection((sh, int(sp)), timeout=120)
    s.sendall(b"\\x05\\x01\\x00\\x05\\x01\\x00\\x01" + socket.inet_aton(host) + struct.pack(">H", port))
    r = b""
    while len(r) < 12:
        r += s.recv(12 - len(r))
    assert r[1] == 0 and r[3] == 0, r
h = hashlib.sha256(); n = 0; buf = bytearray(1 << 20)
while True:
    k = s.recv_into(buf)
    if not k:
        break
    h.update(memoryview(buf)[:k]); n += k
elapsed = time.monotonic() - start
ok = n == size and h.hexdigest() == hashlib.sha256(Pattern(3).bytes(size)).hexdigest()
print(f"{size / elapsed / 1e6:.3f} {'ok' if ok else 'BAD'}")
"""


def wait_line(proc: subprocess.Popen[str], needle: str, timeout: float = 30) -> None:
    """Read ``proc``'s stdout until a line contains ``needle`` (then keep draining it)."""
    assert proc.stdout is not None
    found = threading.Event()
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if needle in line:
                found.set()

    threading.Thread(target=read, daemon=True).start()
    if not found.wait(timeout):
        raise RuntimeError(f"no {needle!r} from {proc.args}:\n{''.join(lines[-20:])}")


def proxies(t: object, pipes: int, key: str | None, rp_port: int, socks_port: int) -> list[subprocess.Popen[str]]:
    extra = ["--key-file", key] if key else []
    rp_host: Host = t.rp  # type: ignore[attr-defined]
    client: Host = t.client  # type: ignore[attr-defined]
    rp = rp_host.popen(
        [TWISTD, "-n", "--pidfile=", "tm3rp", "--pipes", str(pipes), "--listen", f"tcp:{rp_port}", *extra],
        stderr=subprocess.STDOUT,
    )
    wait_line(rp, "listening on")
    lp = client.popen(
        [TWISTD, "-n", "--pidfile=", "tm3lp", "--remote", f"{t.rp_ip}:{rp_port}", "--pipes", str(pipes)]  # type: ignore[attr-defined]
        + ["--socks", f"tcp:{socks_port}:interface=127.0.0.1", *extra],
        stderr=subprocess.STDOUT,
    )
    wait_line(lp, "session 1 up")
    return [lp, rp]


def download(client: Host, web_ip: str, size: int, via: str) -> float:
    out = client.run(client.python_argv("-c", CLIENT, web_ip, str(WEB_PORT), str(size), via), timeout=300)
    rate, verdict = out.stdout.split()
    if verdict != "ok":
        raise RuntimeError(f"download via {via} corrupted")
    return float(rate)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="0: no rate limit")
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pipes", type=int, default=4)
    args = parser.parse_args()
    why = netns_unavailable_reason() or netfilterqueue_missing_reason()
    if why:
        print(f"cannot build the emulated link here: {why}")
        return 1
    size = args.mib * 1024 * 1024
    spec = WanSpec(rtt_ms=args.rtt_ms, loss=args.loss, rate_mbit=args.rate_mbit or None)
    with tempfile.TemporaryDirectory() as tmp, Topology() as topo:
        key = str(Path(tmp) / "tm3.key")
        Path(key).write_text(os.urandom(24).hex())
        os.chmod(tmp, 0o755)
        t = build_wan_topology(topo, spec)
        server = t.web.popen(t.web.python_argv("-c", SERVER, str(size), str(WEB_PORT)), stderr=subprocess.STDOUT)
        wait_line(server, "ready")
        procs = proxies(t, args.pipes, None, 6000, 1080) + proxies(t, args.pipes, key, 6001, 1081)
        time.sleep(0.5)
        results: dict[str, list[float]] = {"direct": [], "v1": [], "v2": []}
        paths = {"direct": "direct", "v1": "127.0.0.1:1080", "v2": "127.0.0.1:1081"}
        for _ in range(args.rounds):
            for name, via in paths.items():
                results[name].append(download(t.client, t.web_ip, size, via))
        for p in procs:
            p.terminate()
        med = {k: statistics.median(v) for k, v in results.items()}
        rate = f"{args.rate_mbit:g} Mbit/s" if args.rate_mbit else "no rate limit"
        print(
            f"one connection, {args.mib} MiB, across {args.rtt_ms:g} ms RTT, {rate}, {100 * args.loss:g}% loss;"
            f" TM3 with {args.pipes} pipes; median of {args.rounds} alternating rounds (MB/s):"
        )
        for k, v in results.items():
            print(f"  {k:6}: {med[k]:7.2f}  ({', '.join(f'{x:.2f}' for x in v)})")
        print(
            f"  v2 / direct = {med['v2'] / med['direct']:.2f} (target >= 0.8); v1 / direct = {med['v1'] / med['direct']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
