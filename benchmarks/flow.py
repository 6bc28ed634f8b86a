"""Per-connection flow control, measured: v1 and v2 side by side. Not a
test, a measurement (issue 7's targets).

Starts the real RP and LP (``twistd -n tm3rp`` / ``tm3lp``, 4 pipes, SOCKS5
on loopback) once for v1 and once for v2 (``--key-file``), with blocking
servers and clients in threads of this process, and measures:

- **slow reader**: one client downloads an endless stream and reads it at
  128 KiB/s; meanwhile 10 KiB echo exchanges, each on a new connection, one
  after another: their p50 / p99 / max and how many timed out (5 s);
- **slow server**: one client uploads without end to a server that reads at
  128 KiB/s; the same exchanges;
- **bulk**: one connection downloads ``--bulk-mib`` MiB (sha256 checked),
  v1 and v2 alternating ``--rounds`` times, and direct TCP for reference.

    .venv/bin/python benchmarks/flow.py [--seconds 8] [--bulk-mib 512] [--rounds 3]

The delayed-path figure (a single connection at 40 ms RTT against direct
TCP) is measured on the emulated wide-area link by ``benchmarks/wan_bulk.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.pattern import Pattern
from tests.support.processes import LISTENING, TWISTD, python_env
from tests.support.threadserver import ThreadServer
from tm3.core.handshake import MAGIC, Hello

KiB = 1024
MiB = 1024 * KiB
HOST = "127.0.0.1"
SLOW_RATE = 128 * KiB
EXCHANGE = 10 * KiB
EXCHANGE_TIMEOUT = 5.0


class Daemon:
    """A twistd child whose output is read (and kept) by a thread."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=python_env(), cwd=Path(__file__).parents[1]
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = regex.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise RuntimeError(f"no {pattern!r} in {self.proc.args[3:6]}:\n{''.join(self.lines[-20:])}")
                self._cond.wait(left)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@contextmanager
def proxies(key: str | None, pipes: int) -> Iterator[int]:
    """RP and LP for v1 (no key) or v2; yields the LP's SOCKS port."""
    extra = ["--key-file", key] if key else []
    rp = Daemon(
        [TWISTD, "-n", "--pidfile=", "tm3rp", "--pipes", str(pipes), "--listen", f"tcp:0:interface={HOST}"]
        + ["--allow-to", "127.0.0.0/8", *extra]
    )
    lp = None
    try:
        rp_port = int(rp.wait_for(LISTENING.decode()).group(1))
        lp = Daemon(
            [TWISTD, "-n", "--pidfile=", "tm3lp", "--remote", f"{HOST}:{rp_port}", "--pipes", str(pipes)]
            + ["--socks", f"tcp:0:interface={HOST}", *extra]
        )
        socks_port = int(lp.wait_for(LISTENING.decode()).group(1))
        lp.wait_for(r"session 1 up")
        yield socks_port
    finally:
        if lp is not None:
            lp.stop()
        rp.stop()


def socks_connect(socks_port: int, port: int, timeout: float = EXCHANGE_TIMEOUT) -> socket.socket:
    s = socket.create_connection((HOST, socks_port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + socket.inet_aton(HOST) + struct.pack(">H", port))
    reply = b""
    while len(reply) < 12:
        chunk = s.recv(12 - len(reply))
        if not chunk:
            raise ConnectionError("the LP closed the SOCKS connection")
        reply += chunk
    if reply[3] != 0:
        raise ConnectionError(f"SOCKS reply {reply[3]}")
    return s


def listener() -> socket.socket:
    s = socket.socket()
    s.bind((HOST, 0))
    s.listen(256)
    return s


# -- servers --------------------------------------------------------------------------


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def endless(conn: socket.socket) -> None:
    chunk = Pattern(1).bytes(256 * KiB)
    while True:
        conn.sendall(chunk)


def slow_sink(conn: socket.socket) -> None:
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    read_at(conn, SLOW_RATE)


def read_at(conn: socket.socket, rate: int, stop: threading.Event | None = None) -> None:
    step = rate // 8
    while stop is None or not stop.is_set():
        got = 0
        while got < step:
            data = conn.recv(step - got)
            if not data:
                return
            got += len(data)
        time.sleep(step / rate)


def send_forever(conn: socket.socket, stop: threading.Event) -> None:
    chunk = Pattern(2).bytes(256 * KiB)
    conn.settimeout(0.5)
    while not stop.is_set():
        try:
            conn.sendall(chunk)
        except TimeoutError:
            continue  # flow control holds us back: as it should


# -- measurements ---------------------------------------------------------------------


def exchanges(socks_port: int, echo_port: int, seconds: float) -> tuple[list[float], int]:
    payload = os.urandom(EXCHANGE)
    times: list[float] = []
    timeouts = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.monotonic()
        try:
            with socks_connect(socks_port, echo_port) as s:
                s.sendall(payload)
                got = b""
                while len(got) < EXCHANGE:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed early")
                    got += chunk
                assert got == payload
            times.append(time.monotonic() - start)
        except (OSError, ConnectionError):
            timeouts += 1
    return times, timeouts


def run_with(background: Callable[[threading.Event], None], socks_port: int, echo_port: int, seconds: float) -> str:
    stop = threading.Event()
    t = threading.Thread(target=background, args=(stop,), daemon=True)
    t.start()
    time.sleep(1.0)  # let the slow connection fill what it can
    times, timeouts = exchanges(socks_port, echo_port, seconds)
    stop.set()
    return summary(times, timeouts)


def summary(times: list[float], timeouts: int) -> str:
    if not times:
        return f"every exchange timed out ({timeouts} x {EXCHANGE_TIMEOUT:g} s)"
    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return (
        f"{len(ms)} exchanges: p50 {statistics.median(ms):.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms;"
        f" {timeouts} timed out"
    )


def slow_reader(socks_port: int, source_port: int) -> Callable[[threading.Event], None]:
    def run(stop: threading.Event) -> None:
        try:
            with socks_connect(socks_port, source_port) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
                s.settimeout(30)
                read_at(s, SLOW_RATE, stop)
        except OSError:
            pass

    return run


def uploader(socks_port: int, sink_port: int) -> Callable[[threading.Event], None]:
    def run(stop: threading.Event) -> None:
        try:
            with socks_connect(socks_port, sink_port) as s:
                send_forever(s, stop)
        except OSError:
            pass

    return run


def bulk(connect: Callable[[], socket.socket], size: int) -> float:
    """MB/s of one download of ``size`` bytes, checked."""
    expected = hashlib.sha256(Pattern(3).bytes(size)).hexdigest()
    start = time.monotonic()
    with connect() as s:
        s.settimeout(60)
        h = hashlib.sha256()
        n = 0
        buf = bytearray(1024 * KiB)
        while n < size:
            k = s.recv_into(buf)
            if not k:
                break
            h.update(memoryview(buf)[:k])
            n += k
    elapsed = time.monotonic() - start
    if n != size or h.hexdigest() != expected:
        raise RuntimeError(f"bulk download broken: {n} of {size} bytes")
    return size / elapsed / 1e6


def sized_source(size: int) -> Callable[[socket.socket], None]:
    def respond(conn: socket.socket) -> None:
        for chunk in Pattern(3).chunks(size, 512 * KiB):
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass

    return respond


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def attacks(key: str, pipes: int, rounds: int, bulk_port: int, size: int) -> str:
    """Intruders on the pipe port of a v2 RP while a download runs: idle
    sockets, v1 pipe sets, forged hellos, the magic alone, garbage."""
    extra = ["--key-file", key, "--hello-wait", "0.2", "--handshake-timeout", "1"]
    rp = Daemon(
        [TWISTD, "-n", "--pidfile=", "tm3rp", "--pipes", str(pipes), "--listen", f"tcp:0:interface={HOST}"]
        + ["--allow-to", "127.0.0.0/8", "--max-pending-pipes", "4096", *extra]
    )
    lp = None
    try:
        rp_port = int(rp.wait_for(LISTENING.decode()).group(1))
        lp = Daemon(
            [TWISTD, "-n", "--pidfile=", "tm3lp", "--remote", f"{HOST}:{rp_port}", "--pipes", str(pipes)]
            + ["--socks", f"tcp:0:interface={HOST}", "--key-file", key]
        )
        socks = int(lp.wait_for(LISTENING.decode()).group(1))
        lp.wait_for(r"session 1 up")
        rss_before = rss_kib(rp.proc.pid)
        result: list[float] = []
        download = threading.Thread(
            target=lambda: result.append(bulk(lambda: socks_connect(socks, bulk_port), size)), daemon=True
        )
        download.start()
        sent = 0
        for _ in range(rounds):
            socks_list = []
            for kind in ("idle", "v1", "forged", "magic", "garbage"):
                for _ in range(pipes if kind == "v1" else 1):
                    s = socket.create_connection((HOST, rp_port), timeout=5)
                    if kind == "forged":
                        hello = Hello(os.urandom(16), os.urandom(16), pipes, 0, 65536).encode()
                        s.sendall(hello + os.urandom(32))
                    elif kind == "magic":
                        s.sendall(MAGIC)
                    elif kind == "garbage":
                        s.sendall(os.urandom(4096))
                    socks_list.append(s)
                    sent += 1
            time.sleep(0.05)
            for s in socks_list:
                s.close()
        download.join(120)
        time.sleep(1.5)
        sessions = sum(1 for line in rp.lines if re.search(r"session \d+ up", line))
        ended = sum(1 for line in rp.lines if re.search(r"session \d+ lost", line))
        refused = sum(1 for line in rp.lines if "refused" in line)
        rss_after = rss_kib(rp.proc.pid)
        done = f"{result[0]:.0f} MB/s" if result else "did NOT complete"
        return (
            f"{sent} intruder sockets: {refused} refused with a log line (the idle ones left before"
            f" --hello-wait); sessions started {sessions}, ended {ended}: {sessions - 1 + ended} takeovers;"
            f" the download {done}; RP RSS {rss_before // 1024} -> {rss_after // 1024} MiB"
        )
    finally:
        if lp is not None:
            lp.stop()
        rp.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="how long each latency scenario runs")
    parser.add_argument("--pipes", type=int, default=4)
    parser.add_argument("--bulk-mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--attack-rounds", type=int, default=200, help="rounds of intruders (9 sockets each)")
    args = parser.parse_args()

    servers = {name: ThreadServer(listener(), fn, conn_timeout=None) for name, fn in
               [("echo", echo), ("source", endless), ("sink", slow_sink)]}  # fmt: skip
    bulk_size = args.bulk_mib * MiB
    bulk_server = ThreadServer(listener(), sized_source(bulk_size), conn_timeout=None)
    with tempfile.TemporaryDirectory() as tmp:
        key = str(Path(tmp) / "tm3.key")
        Path(key).write_text(os.urandom(24).hex())
        print(f"TM3 flow control, v1 and v2 side by side: loopback, {args.pipes} pipes, SOCKS5 clients")
        for version, k in (("v1", None), ("v2", key)):
            with proxies(k, args.pipes) as socks:
                r = run_with(slow_reader(socks, servers["source"].port), socks, servers["echo"].port, args.seconds)
                print(f"  {version} slow reader (128 KiB/s): {r}")
            with proxies(k, args.pipes) as socks:
                r = run_with(uploader(socks, servers["sink"].port), socks, servers["echo"].port, args.seconds)
                print(f"  {version} slow server (128 KiB/s): {r}")
            with proxies(k, args.pipes) as socks:
                print(
                    f"  {version} quiet (no slow peer): {run_with(lambda stop: None, socks, servers['echo'].port, 2)}"
                )
        results: dict[str, list[float]] = {"direct": [], "v1": [], "v2": []}
        with proxies(None, args.pipes) as s1, proxies(key, args.pipes) as s2:
            for _ in range(args.rounds):
                results["direct"].append(bulk(lambda: socket.create_connection((HOST, bulk_server.port)), bulk_size))
                results["v1"].append(bulk(lambda: socks_connect(s1, bulk_server.port), bulk_size))
                results["v2"].append(bulk(lambda: socks_connect(s2, bulk_server.port), bulk_size))
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"  single-connection bulk, {args.bulk_mib} MiB, median of {args.rounds} alternating rounds:")
        for k, v in results.items():
            print(f"    {k:6}: {med[k]:7.1f} MB/s  ({', '.join(f'{x:.0f}' for x in v)})")
        print(f"    v2 / v1 = {med['v2'] / med['v1']:.2f} (target >= 0.9)")
        print(f"  v2 under attack: {attacks(key, args.pipes, args.attack_rounds, bulk_server.port, bulk_size)}")
    for server in [*servers.values(), bulk_server]:
        server.stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
