"""The loopback efficiency suite: TM3 against the relays it should keep up with.

Not a test, a measurement. One command measures, on 127.0.0.1 and in one run,
these peers, alternating (the order rotates every round; the figures are the
median over rounds):

- ``direct``: client to server, no relay;
- ``pf1``, ``pf2``: Twisted's own forwarder (``twistd -n portforward``), one
  hop and two chained: the Python relay limit, the same work without framing;
- ``haproxy`` (TCP mode, as shipped) and ``socat`` (``fork``): the C relays;
- ``tm3-<n>p-<payload>``: ``twistd tm3lp --forward`` -> ``twistd tm3rp`` with
  1, 4 and 8 pipes at the default 4096-byte payload and at the largest
  (``--max-payload 65525`` on both proxies), protocol v2 with a key (the
  product configuration); ``tm3-v1-4p-4096`` is the same without a key.

and these workloads:

- ``bulk``: 1 GiB down and 1 GiB up on one connection (a pattern of prime
  period, every byte checked), MB/s; and the relay's CPU seconds per GiB
  over both (utime + stime of all its processes, from ``/proc``);
- ``keepalive``: ``wrk`` against nginx, a 1 KiB object over 64 kept-alive
  connections: requests/s, p50 and p99 latency;
- ``churn``: the same with ``Connection: close`` over 32 connections (a new
  connection per request): requests/s;
- ``memory``: 10,000 connections held open through a freshly started relay:
  RSS per connection of each of its processes (after - before, from ``/proc``);
  once per peer, in the first round (not socat: it forks per connection).

It writes ``efficiency.json`` (every run, the medians, git commit and date),
``efficiency.md`` (the table and the issue's targets as ratios: target /
measured / met?) and ``efficiency.png`` to ``--out`` (``bench/results``).

    .venv/bin/python benchmarks/efficiency.py                 # about 20 minutes on the 2-core machine
    .venv/bin/python benchmarks/efficiency.py --quick         # about 4 minutes: 256 MiB, 1 round, 2,000 held
    .venv/bin/python benchmarks/efficiency.py --peers direct pf2 'tm3-4p-*' --workloads bulk
    .venv/bin/python benchmarks/efficiency.py --proxy-args "--initial-window 1MiB" --label win1m
    .venv/bin/python benchmarks/efficiency.py --profile /tmp/prof   # py-spy on LP and RP under a bulk download

Needs haproxy, socat, wrk and nginx (``apt-get install haproxy socat wrk
nginx-light``) and matplotlib (the ``bench`` extra); it installs nothing
and says what is missing. Scratch files (configurations, logs) go to a
temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import resource
import selectors
import shlex
import shutil
import signal
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
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the checkout's tests and tm3 first
    sys.path.insert(0, str(REPO))

from tests.support.pattern import Pattern  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.processes import TWISTD, python_env  # noqa: E402

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
HOST = "127.0.0.1"
MAX_PAYLOAD = 65525  # the largest --max-payload either proxy takes (README)
NOFILE = 65536
CHUNK = 512 * KiB  # client/server I/O size: big, and below the pattern's period
INSTALL = "apt-get install haproxy socat wrk nginx-light"


# -- peers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One way from the client to the server."""

    name: str
    kind: str  # direct, pf, haproxy, socat, tm3
    hops: int = 1
    pipes: int = 0
    payload: int = 4096
    v2: bool = True
    memory: bool = True  # measured by the memory workload

    @property
    def tm3(self) -> bool:
        return self.kind == "tm3"


def all_peers() -> list[Peer]:
    peers = [
        Peer("direct", "direct", memory=False),
        Peer("pf1", "pf", hops=1),
        Peer("pf2", "pf", hops=2),
        Peer("haproxy", "haproxy"),
        Peer("socat", "socat", memory=False),
    ]
    for payload in (4096, MAX_PAYLOAD):
        for pipes in (1, 4, 8):
            peers.append(Peer(f"tm3-{pipes}p-{payload}", "tm3", pipes=pipes, payload=payload))
    peers.append(Peer("tm3-v1-4p-4096", "tm3", pipes=4, payload=4096, v2=False))
    return peers


# -- processes ------------------------------------------------------------------------


def raise_nofile() -> int:
    """RLIMIT_NOFILE as high as we may (the hard limit, unless we may raise it
    to NOFILE): this process's, and so its children's. Returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, NOFILE), max(hard, NOFILE)))
    except (ValueError, OSError):  # no CAP_SYS_RESOURCE: up to the hard limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    """In the child: die with the benchmark, and many descriptors."""
    raise_nofile()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Child:
    """A process we started, its output in a log file in the scratch directory."""

    def __init__(self, name: str, argv: list[str], scratch: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log = scratch / f"{name}-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO,
                env=env or python_env(),
                preexec_fn=_child_setup,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 30) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not regex.search(self.text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no {pattern!r} (exit {self.proc.poll()}):\n{self.text()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (``/proc/net/tcp``: no connect, no side effect)."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":
            return True
    return False


def wait_listening(port: int, children: list[Child], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        for c in children:
            if c.proc.poll() is not None:
                raise RuntimeError(f"{c.name} exited {c.proc.returncode}:\n{c.text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {port} after {timeout} s")
        time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """utime + stime, with reaped children's (socat's forks), of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


@dataclass
class Running:
    """A started peer: the port the client connects to, and its processes by role."""

    port: int
    children: dict[str, Child] = field(default_factory=dict)

    @property
    def pids(self) -> dict[str, int]:
        return {role: c.pid for role, c in self.children.items()}

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids.values())

    def check_alive(self) -> None:
        for c in self.children.values():
            if c.proc.poll() is not None:
                raise RuntimeError(f"{c.name} exited {c.proc.returncode}:\n{c.text()[-3000:]}")

    def stop(self) -> None:
        for c in reversed(list(self.children.values())):
            c.stop()


class Starter:
    """Starts peers towards one server port, with this run's key and extra TM3 arguments."""

    def __init__(self, scratch: Path, proxy_args: list[str], profile_args: dict[str, list[str]] | None = None) -> None:
        self.scratch = scratch
        self.proxy_args = proxy_args
        self.key = scratch / "tm3.key"
        self.key.write_text(os.urandom(24).hex() + "\n")  # 48 characters
        self.profile_args = profile_args or {}

    @contextmanager
    def started(self, peer: Peer, dest: int) -> Iterator[Running]:
        run = Running(dest)
        try:
            self._start(peer, dest, run)
            yield run
        finally:
            run.stop()

    def _start(self, peer: Peer, dest: int, run: Running) -> None:
        s = self.scratch
        if peer.kind == "direct":
            return
        if peer.kind == "pf":
            to = dest
            for hop in range(peer.hops, 0, -1):  # the hop next to the server first
                port = free_port()
                argv = [TWISTD, "-n", "--pidfile=", "portforward", "-p", f"tcp:{port}:interface={HOST}:backlog=1024"]
                run.children[f"pf{hop}"] = c = Child(f"pf{hop}", [*argv, "-h", HOST, "-d", str(to)], s)
                wait_listening(port, [c])
                to = port
            run.port = to
        elif peer.kind == "haproxy":
            run.port = free_port()
            cfg = s / f"haproxy-{run.port}.cfg"
            maxconn = (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 100) // 2  # two sockets a connection
            cfg.write_text(
                f"global\n  maxconn {maxconn}\n"
                "defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 1h\n  timeout server 1h\n"
                f"listen relay\n  bind {HOST}:{run.port}\n  server s1 {HOST}:{dest}\n"
            )
            run.children["haproxy"] = c = Child("haproxy", ["haproxy", "-db", "-f", str(cfg)], s)
            wait_listening(run.port, [c])
        elif peer.kind == "socat":
            run.port = free_port()
            listen = f"TCP-LISTEN:{run.port},bind={HOST},fork,reuseaddr,backlog=1024"
            run.children["socat"] = c = Child("socat", ["socat", listen, f"TCP:{HOST}:{dest}"], s)
            wait_listening(run.port, [c])
        elif peer.kind == "tm3":
            rp_port, run.port = free_port(), free_port()
            common = ["--pipes", str(peer.pipes), "--max-payload", str(peer.payload)]
            if peer.v2:
                common += ["--key-file", str(self.key)]
            common += self.proxy_args
            rp = [*self._twistd("rp"), "tm3rp", "--listen", f"tcp:{rp_port}:interface={HOST}"]
            run.children["rp"] = c = Child("rp", [*rp, "--allow-to", f"{HOST}/32", *common], s)
            wait_listening(rp_port, [c])
            lp = [*self._twistd("lp"), "tm3lp", "--remote", f"{HOST}:{rp_port}"]
            forward = f"tcp:{run.port}:interface={HOST}:{HOST}:{dest}"
            run.children["lp"] = c = Child("lp", [*lp, "--forward", forward, *common], s)
            c.wait_for(r" up \(v\d\)")
            wait_listening(run.port, [c])
        else:
            raise ValueError(peer.kind)

    def _twistd(self, role: str) -> list[str]:
        return [TWISTD, "-n", "--pidfile=", *self.profile_args.get(role, [])]


# -- servers --------------------------------------------------------------------------


class Doubled:
    """The pattern twice over, so any window of up to one period is one slice."""

    def __init__(self, seed: int = 7) -> None:
        self.bytes = Pattern(seed).bytes(2 * Pattern.PERIOD)
        self.view = memoryview(self.bytes)

    def window(self, offset: int, n: int) -> memoryview:
        start = offset % Pattern.PERIOD
        return self.view[start : start + n]

    def matches(self, offset: int, data: bytes) -> bool:
        return self.bytes.startswith(data, offset % Pattern.PERIOD)  # a memcmp, no copy


def send_pattern(sock: socket.socket, pattern: Doubled, size: int) -> None:
    offset = 0
    while offset < size:
        n = min(CHUNK, size - offset)
        sock.sendall(pattern.window(offset, n))
        offset += n


def receive_pattern(sock: socket.socket, pattern: Doubled, size: int) -> tuple[int, int | None]:
    """Reads ``size`` bytes (or to EOF): (bytes read, offset of the first wrong
    chunk or None). The size is known, so no half-close is needed: Twisted's
    forwarder turns one into a full close."""
    offset = 0
    bad = None
    while offset < size and (data := sock.recv(min(CHUNK, size - offset))):
        if bad is None and not pattern.matches(offset, data):
            bad = offset
        offset += len(data)
    return offset, bad


def recv_exact(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        data = sock.recv(n - len(got))
        if not data:
            break
        got += data
    return got


def recv_line(sock: socket.socket) -> bytes:
    got = b""
    while not got.endswith(b"\n"):
        data = sock.recv(256)
        if not data:
            break
        got += data
    return got


class Servers:
    """The bulk server, the connection holder (threads of this process) and nginx."""

    HEADER = struct.Struct("!cQ")  # b"D" (send me SIZE) or b"U" (I send SIZE), SIZE

    def __init__(self, scratch: Path) -> None:
        self.pattern = Doubled()
        self.stop = threading.Event()
        self._listeners: list[socket.socket] = []
        self.bulk_port = self._listen(self._bulk)
        # The holder is a process of its own: this one has the clients' descriptors.
        self.hold_port = free_port()
        self.holder = Child("holder", [sys.executable, __file__, "--hold-server", str(self.hold_port)], scratch)
        wait_listening(self.hold_port, [self.holder])
        self.nginx_port = free_port()
        (scratch / "www").mkdir()
        (scratch / "www" / "1k.bin").write_bytes(Pattern(3).bytes(KiB))
        conf = scratch / "nginx.conf"
        conf.write_text(
            f"worker_processes 1;\ndaemon off;\nmaster_process off;\npid {scratch}/nginx.pid;\n"
            f"error_log {scratch}/nginx-error.log warn;\nworker_rlimit_nofile {NOFILE};\n"
            "events { worker_connections 16384; }\n"
            "http {\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 300s;\n"
            f"  client_body_temp_path {scratch}/body;\n  proxy_temp_path {scratch}/proxy;\n"
            f"  fastcgi_temp_path {scratch}/fastcgi;\n"
            f"  server {{\n    listen {HOST}:{self.nginx_port} backlog=4096;\n    root {scratch}/www;\n  }}\n}}\n"
        )
        self.nginx = Child(
            "nginx", ["nginx", "-p", str(scratch), "-e", f"{scratch}/nginx-error.log", "-c", str(conf)], scratch
        )
        wait_listening(self.nginx_port, [self.nginx])

    def _listen(self, handle: Callable[[socket.socket], None]) -> int:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, 0))
        sock.listen(4096)
        sock.settimeout(0.2)
        self._listeners.append(sock)
        threading.Thread(target=self._accept, args=(sock, handle), daemon=True).start()
        port: int = sock.getsockname()[1]
        return port

    def _accept(self, sock: socket.socket, handle: Callable[[socket.socket], None]) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            handle(conn)

    def _bulk(self, conn: socket.socket) -> None:
        threading.Thread(target=self._bulk_conn, args=(conn,), daemon=True).start()

    def _bulk_conn(self, conn: socket.socket) -> None:
        with conn:
            try:
                header = recv_exact(conn, self.HEADER.size)
                if len(header) < self.HEADER.size:
                    return
                cmd, size = self.HEADER.unpack(header)
                if cmd == b"D":
                    send_pattern(conn, self.pattern, size)
                    while conn.recv(CHUNK):  # until the client closes
                        pass
                elif cmd == b"U":
                    got, bad = receive_pattern(conn, self.pattern, size)
                    conn.sendall(f"{got} {bad}\n".encode())
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        for sock in self._listeners:
            sock.close()
        self.holder.stop()
        self.nginx.stop()


# -- workloads ------------------------------------------------------------------------


def bulk(servers: Servers, port: int, way: str, size: int) -> float:
    """One connection, ``size`` bytes down (``D``) or up (``U``), checked: MB/s."""
    t0 = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=300) as sock:
        sock.sendall(Servers.HEADER.pack(way.encode(), size))
        if way == "D":
            got, bad = receive_pattern(sock, servers.pattern, size)
        else:
            send_pattern(sock, servers.pattern, size)
            reply = recv_line(sock).decode().split()
            got, bad = (int(reply[0]), None if reply[1] == "None" else int(reply[1])) if reply else (0, None)
    seconds = time.perf_counter() - t0
    if got != size or bad is not None:
        raise RuntimeError(f"bulk {way} on port {port}: {got} of {size} bytes, first wrong chunk at {bad}")
    return size / 1e6 / seconds


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port: int, connections: int, seconds: float, close: bool, threads: int = 2) -> dict[str, float]:
    """requests/s, p50 and p99 (ms), and errors from ``wrk --latency``."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(
        [*argv, f"http://{HOST}:{port}/1k.bin"], capture_output=True, text=True, timeout=seconds + 60, check=True
    ).stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk said:\n{out}")
    result = {"rps": float(m.group(1))}
    for pct in ("50", "99"):
        lat = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if lat:
            result[f"p{pct}_ms"] = float(lat.group(1)) * UNITS[lat.group(2)]
    errors = 0
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if se:
        errors += sum(int(g) for g in se.groups()) - (int(se.group(2)) if close else 0)  # a close is read 0 there
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    result["errors"] = errors
    return result


def hold_server(port: int) -> None:
    """The holder (a child process): accepts, sends one byte, keeps each
    connection until its peer closes it."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                try:
                    conn, _ = listener.accept()
                    conn.send(b"!")
                except OSError:
                    continue
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
            else:
                try:
                    data = sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    sock.close()


def hold(run: Running, count: int) -> dict[str, Any]:
    """``count`` connections opened through the peer and held: RSS per connection by role."""
    time.sleep(1.0)  # let start-up garbage settle
    before = {role: rss_kib(pid) for role, pid in run.pids.items()}
    socks: list[socket.socket] = []
    t0 = time.perf_counter()
    try:
        while len(socks) < count:
            batch = [
                socket.create_connection((HOST, run.port), timeout=30) for _ in range(min(250, count - len(socks)))
            ]
            socks += batch
            for s in batch:  # the server's byte: the connection reached it
                if s.recv(1) != b"!":
                    raise RuntimeError(f"held connection {len(socks)} closed early")
        opened = time.perf_counter() - t0
        time.sleep(1.0)
        run.check_alive()
        after = {role: rss_kib(pid) for role, pid in run.pids.items()}
    finally:
        for s in socks:
            s.close()
    return {
        "connections": count,
        "open_s": opened,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_conn": {role: (after[role] - before[role]) / count for role in after},
    }


# -- the run --------------------------------------------------------------------------


def measure_round(
    starter: Starter, servers: Servers, peer: Peer, args: argparse.Namespace, first_round: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "bulk" in args.workloads:
        with starter.started(peer, servers.bulk_port) as run:
            c0 = run.cpu()
            out["bulk_down_MBps"] = bulk(servers, run.port, "D", args.size)
            out["bulk_up_MBps"] = bulk(servers, run.port, "U", args.size)
            time.sleep(0.3)  # socat reaps its child: its CPU shows in the parent's
            if run.children:
                out["cpu_s_per_GiB"] = (run.cpu() - c0) / (2 * args.size / GiB)
            run.check_alive()
    if "keepalive" in args.workloads or "churn" in args.workloads:
        with starter.started(peer, servers.nginx_port) as run:
            if "keepalive" in args.workloads:
                r = wrk(run.port, args.keepalive_connections, args.seconds, close=False)
                out.update({f"ka_{k}": v for k, v in r.items()})
            if "churn" in args.workloads:
                r = wrk(run.port, args.churn_connections, args.seconds, close=True)
                out.update({f"churn_{k}": v for k, v in r.items()})
            run.check_alive()
    if "memory" in args.workloads and first_round and peer.memory:
        count = min(args.connections, args.nofile - 200)
        if peer.kind in ("pf", "haproxy"):  # one process holds both sides of each connection
            count = min(count, (args.nofile - 200) // 2)
        with starter.started(peer, servers.hold_port) as run:
            out["memory"] = hold(run, count)
    return out


def median_summary(runs: list[dict[str, Any]], peers: list[Peer]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for peer in peers:
        mine = [r["metrics"] for r in runs if r["peer"] == peer.name]
        s: dict[str, Any] = {}
        keys = sorted({k for m in mine for k, v in m.items() if isinstance(v, int | float)})
        for k in keys:
            values = [m[k] for m in mine if k in m]
            s[k] = statistics.median(values)
            s[k + "_all"] = values
        mem = [m["memory"] for m in mine if "memory" in m]
        if mem:
            s["memory"] = mem[0]
        summary[peer.name] = s
    return summary


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "tm3"], cwd=REPO, capture_output=True, text=True)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# -- the report -----------------------------------------------------------------------


def fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, for each TM3 pipe count: ratio, threshold, met."""
    rows: list[dict[str, Any]] = []

    def ratio(peer: str, key: str, ref: str) -> float | None:
        a, b = summary.get(peer, {}).get(key), summary.get(ref, {}).get(key)
        return a / b if a is not None and b else None

    specs: list[tuple[str, str, str, str, float, str]] = [
        # (what, payload, metric, reference peer, threshold, direction)
        ("bulk down >= 0.5x pf2 (4096-byte payload)", "4096", "bulk_down_MBps", "pf2", 0.5, ">="),
        ("bulk up >= 0.5x pf2 (4096-byte payload)", "4096", "bulk_up_MBps", "pf2", 0.5, ">="),
        (f"bulk down >= 0.8x pf2 ({MAX_PAYLOAD}-byte payload)", str(MAX_PAYLOAD), "bulk_down_MBps", "pf2", 0.8, ">="),
        (f"bulk up >= 0.8x pf2 ({MAX_PAYLOAD}-byte payload)", str(MAX_PAYLOAD), "bulk_up_MBps", "pf2", 0.8, ">="),
        ("churn req/s >= 1x pf1", "4096", "churn_rps", "pf1", 1.0, ">="),
        ("keep-alive req/s >= 1x pf2", "4096", "ka_rps", "pf2", 1.0, ">="),
        ("keep-alive p99 <= 1.5x pf2", "4096", "ka_p99_ms", "pf2", 1.5, "<="),
    ]
    # Throughput on a loaded 2-core machine follows the CPU left over; CPU per
    # GiB does not, so the bulk targets are also shown as pf2's CPU per GiB
    # over TM3's (the throughput ratio if both were CPU-bound on one core).
    specs += [
        ("bulk by CPU/GiB: pf2 / TM3 >= 0.5x (4096-byte payload)", "4096", "cpu_s_per_GiB", "pf2", 0.5, "inv"),
        (
            f"bulk by CPU/GiB: pf2 / TM3 >= 0.8x ({MAX_PAYLOAD}-byte payload)",
            str(MAX_PAYLOAD),
            "cpu_s_per_GiB",
            "pf2",
            0.8,
            "inv",
        ),
    ]
    for what, payload, key, ref, threshold, direction in specs:
        cells = {}
        for pipes in (1, 4, 8):
            r = ratio(f"tm3-{pipes}p-{payload}", key, ref)
            if direction == "inv":
                r = 1 / r if r else None
            met = None if r is None else (r <= threshold if direction == "<=" else r >= threshold)
            cells[pipes] = {"measured": r, "met": met}
        rows.append({"target": what, "threshold": threshold, "unit": "x", "cells": cells})
    cells = {}
    for pipes in (1, 4, 8):
        mem = summary.get(f"tm3-{pipes}p-4096", {}).get("memory")
        v = mem["kib_per_conn"].get("rp") if mem else None
        cells[pipes] = {"measured": v, "met": None if v is None else v <= 8.0}
    rows.append({"target": "RP memory <= 8 KiB per connection", "threshold": 8.0, "unit": "KiB", "cells": cells})
    return rows


def markdown(result: dict[str, Any]) -> str:
    summary = result["summary"]
    cfg = result["config"]
    lines = [
        f"# TM3 loopback efficiency{' — ' + result['label'] if result['label'] else ''}",
        "",
        f"{result['date']}, commit `{result['commit']}`, {result['host']['cpus']} CPUs, "
        f"load average before {result['host']['loadavg_before']}; {cfg['rounds']} round(s), medians; "
        f"bulk {cfg['size'] / MiB:g} MiB each way; wrk {cfg['seconds']:g} s, {cfg['keepalive_connections']} "
        f"keep-alive / {cfg['churn_connections']} churn connections, 1 KiB object from nginx; "
        f"{cfg['connections']:,} held connections; TM3 extra arguments: `{' '.join(cfg['proxy_args']) or 'none'}`; "
        f"run time {result['elapsed_s'] / 60:.1f} min.",
        "",
        "| peer | down MB/s | up MB/s | CPU s/GiB | keep-alive req/s | p50 ms | p99 ms | churn req/s | churn p99 ms "
        "| KiB/conn held | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, s in summary.items():
        mem = s.get("memory")
        per = ", ".join(f"{role} {v:.1f}" for role, v in mem["kib_per_conn"].items()) if mem else "–"
        if mem and mem["connections"] != cfg["connections"]:
            per += f" (at {mem['connections']:,}: the fd limit)"
        errors = int(s.get("ka_errors", 0) + s.get("churn_errors", 0))
        lines.append(
            f"| {name} | {fmt(s.get('bulk_down_MBps'))} | {fmt(s.get('bulk_up_MBps'))} | {fmt(s.get('cpu_s_per_GiB'), 2)} "
            f"| {fmt(s.get('ka_rps'))} | {fmt(s.get('ka_p50_ms'), 2)} | {fmt(s.get('ka_p99_ms'), 2)} "
            f"| {fmt(s.get('churn_rps'))} | {fmt(s.get('churn_p99_ms'), 2)} | {per} | {errors} |"
        )
    lines += [
        "",
        "## Targets",
        "",
        "TM3 (v2 unless the peer says v1) as a ratio to the reference peer; memory in KiB of RP RSS per "
        "held connection.",
        "",
        "| target | threshold | 1 pipe | 4 pipes | 8 pipes |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["targets"]:
        cells = []
        for pipes in ("1", "4", "8"):
            c = row["cells"][pipes] if pipes in row["cells"] else row["cells"][int(pipes)]
            if c["measured"] is None:
                cells.append("–")
            else:
                unit = " KiB" if row["unit"] == "KiB" else "x"
                cells.append(f"{c['measured']:.2f}{unit} {'met' if c['met'] else '**missed**'}")
        thr = f"{row['threshold']:g}{' KiB' if row['unit'] == 'KiB' else 'x'}"
        lines.append(f"| {row['target']} | {thr} | {' | '.join(cells)} |")
    lines += [
        "",
        "Peers: `direct` client to server; `pf1`/`pf2` `twistd portforward`, one hop / two chained; "
        "`haproxy` (TCP mode, default threads) and `socat` (fork, default 8 KiB buffer); `tm3-<pipes>p-<payload>` "
        "LP (`--forward`) -> RP, v2 with a key; `tm3-v1-...` without a key. CPU: utime+stime of all the peer's "
        "processes over the 2 bulk transfers. KiB/conn: RSS after - before opening the held connections, "
        "per process. Errors: wrk socket errors and non-2xx responses (churn's server closes are not errors).",
        "",
        "Rounds (every value):",
        "",
    ]
    for name, s in summary.items():
        alls = {
            k[:-4]: v
            for k, v in s.items()
            if k.endswith("_all") and k[:-4] in ("bulk_down_MBps", "bulk_up_MBps", "ka_rps", "churn_rps")
        }
        if alls:
            lines.append(
                f"- {name}: " + "; ".join(f"{k} " + " / ".join(f"{x:,.0f}" for x in v) for k, v in alls.items())
            )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    names = list(summary)
    panels = [
        ("bulk download MB/s", "bulk_down_MBps"),
        ("bulk upload MB/s", "bulk_up_MBps"),
        ("CPU s per GiB (all processes)", "cpu_s_per_GiB"),
        ("keep-alive req/s", "ka_rps"),
        ("keep-alive p99 ms", "ka_p99_ms"),
        ("churn req/s (new connection each)", "churn_rps"),
    ]
    fig, axes = plt.subplots(2, 4, figsize=(22, 9))
    flat = list(axes.flat)
    colors = ["#888888" if not n.startswith("tm3") else ("#1f77b4" if "-4096" in n else "#ff7f0e") for n in names]
    for ax, (title, key) in zip(flat, panels):
        values = [summary[n].get(key) or 0 for n in names]
        ax.bar(range(len(names)), values, color=colors)
        ax.set_title(title)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax = flat[len(panels)]
    mem_names = [n for n in names if summary[n].get("memory")]
    bottoms = [0.0] * len(mem_names)
    for i, role in enumerate(sorted({r for n in mem_names for r in summary[n]["memory"]["kib_per_conn"]})):
        vals = [summary[n]["memory"]["kib_per_conn"].get(role, 0.0) for n in mem_names]
        ax.bar(range(len(mem_names)), vals, bottom=bottoms, label=role, color=f"C{i}")
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.axhline(8, color="red", linestyle="--", linewidth=1, label="RP target 8 KiB")
    ax.set_title(f"RSS KiB per held connection ({result['config']['connections']:,})")
    ax.set_xticks(range(len(mem_names)), mem_names, rotation=60, ha="right", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    flat[-1].axis("off")
    fig.suptitle(f"TM3 loopback efficiency {result['label']} ({result['commit'][:10]}, {result['date'][:10]})")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# -- profiling ------------------------------------------------------------------------


def profile(args: argparse.Namespace, scratch: Path, out_dir: Path) -> None:
    """A bulk download through TM3 (4 pipes, 4096) with py-spy on the LP and the RP:
    the top functions by self time for each, into ``out_dir/profile.md``."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    peer = Peer("tm3-4p-4096", "tm3", pipes=4, payload=4096)
    servers = Servers(scratch)
    starter = Starter(scratch, args.proxy_args)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = [f"# TM3 under a {args.size / MiB:g} MiB bulk download, 4 pipes, 4096-byte payload (py-spy)", ""]
    try:
        with starter.started(peer, servers.bulk_port) as run:
            spies = {}
            for role, pid in run.pids.items():
                raw = out_dir / f"{role}.raw.txt"
                spies[role] = (
                    subprocess.Popen(
                        [py_spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--output", str(raw)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                    ),
                    raw,
                )
            time.sleep(1.0)
            c0 = {role: cpu_seconds(pid) for role, pid in run.pids.items()}
            t0 = time.perf_counter()
            mbps = bulk(servers, run.port, "D", args.size)
            wall = time.perf_counter() - t0
            cpu = {role: cpu_seconds(pid) - c0[role] for role, pid in run.pids.items()}
            for spy, _ in spies.values():
                spy.send_signal(signal.SIGINT)
            for spy, _ in spies.values():
                spy.wait(60)
        report += [
            f"{mbps:.0f} MB/s under the profiler; {wall:.1f} s; CPU "
            + ", ".join(f"{r} {c:.1f} s" for r, c in cpu.items()),
            "",
        ]
        for role, (_, raw) in spies.items():
            report += top_self(raw, role, args.top)
    finally:
        servers.close()
    text = "\n".join(report) + "\n"
    (out_dir / "profile.md").write_text(text)
    print(text)


#: Where self time goes, by the leaf frame: the first pattern that matches names it.
CATEGORIES = [
    ("syscalls: send (untilConcludes) and recv (tcp.py doRead)", r"^(untilConcludes|Connection\.doRead) "),
    ("Twisted: epoll and the reactor loop", r"twisted/internet/(epollreactor|posixbase|base)\.py"),
    ("Twisted: transport write buffering", r"twisted/internet/(abstract|tcp|_newtls)\.py"),
    ("Twisted: other", r"twisted/"),
    ("TM3: framing and decoding (wire.py, Outbound._frame)", r"tm3/core/wire\.py|Outbound\._frame "),
    ("TM3: reorder", r"tm3/core/reorder\.py"),
    ("TM3: credit and flow (credit.py, flow.py)", r"tm3/core/credit\.py|tm3/mux/flow\.py"),
    ("TM3: the rest of the mux (inbound, outbound, pipes, roles)", r"tm3/"),
    ("other", r""),
]


def top_self(raw: Path, role: str, n: int) -> list[str]:
    """Self time per function from py-spy's collapsed stacks (the leaf frame of
    each sample), and the same by category."""
    self_counts: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.split(";")[-1]
        func = re.sub(r":\d+\)$", ")", leaf)  # one function, all its lines
        func = func.replace(str(REPO) + "/", "").replace(str(Path(sys.prefix)) + "/", "")
        func = re.sub(r"\(\S*site-packages/", "(", func)
        self_counts[func] = self_counts.get(func, 0) + int(samples)
        total += int(samples)
    lines = [f"## {role.upper()}: top {n} by self time ({total} busy samples)", "", "| % | function |", "|---:|---|"]
    for func, count in sorted(self_counts.items(), key=lambda kv: -kv[1])[:n]:
        lines.append(f"| {100 * count / max(total, 1):.1f} | `{func}` |")
    by_category = dict.fromkeys((name for name, _ in CATEGORIES), 0)
    for func, count in self_counts.items():
        for name, pattern in CATEGORIES:
            if re.search(pattern, func):
                by_category[name] += count
                break
    lines += ["", f"{role.upper()} by category:", "", "| % | where |", "|---:|---|"]
    for name, count in by_category.items():
        lines.append(f"| {100 * count / max(total, 1):.1f} | {name} |")
    return [*lines, ""]


# -- main -----------------------------------------------------------------------------


def missing_tools() -> list[str]:
    missing = [tool for tool in ("haproxy", "socat", "wrk", "nginx") if not shutil.which(tool)]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        missing.append("matplotlib")
    return missing


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="output directory (default bench/results)")
    p.add_argument("--quick", action="store_true", help="256 MiB, 1 round, 2 s wrk runs, 2,000 held connections")
    p.add_argument(
        "--peers",
        nargs="+",
        default=["*"],
        help="peer names or globs (default all): " + " ".join(x.name for x in all_peers()),
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        default=["bulk", "keepalive", "churn", "memory"],
        choices=["bulk", "keepalive", "churn", "memory"],
    )
    p.add_argument("--rounds", type=int, help="rounds, peers rotated each (default 2; --quick 1)")
    p.add_argument("--size", type=int, help="bulk MiB each way (default 1024; --quick 256)")
    p.add_argument("--seconds", type=float, help="each wrk run (default 5; --quick 2)")
    p.add_argument("--connections", type=int, help="held connections (default 10000; --quick 2000)")
    p.add_argument("--keepalive-connections", type=int, default=64)
    p.add_argument("--churn-connections", type=int, default=32)
    p.add_argument("--proxy-args", default="", help='extra arguments to both TM3 proxies, e.g. "--initial-window 1MiB"')
    p.add_argument("--label", default="", help="names the run; files become efficiency-LABEL.*")
    p.add_argument(
        "--profile", metavar="DIR", help="instead: py-spy on LP and RP under a bulk download (4 pipes, 4096)"
    )
    p.add_argument("--top", type=int, default=15, help="--profile: functions to list per proxy")
    p.add_argument("--hold-server", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hold_server:
        hold_server(args.hold_server)
        return 0
    args.rounds = args.rounds or (1 if args.quick else 2)
    args.size = (args.size or (256 if args.quick else 1024)) * MiB
    args.seconds = args.seconds or (2.0 if args.quick else 5.0)
    args.connections = args.connections or (2000 if args.quick else 10000)
    args.proxy_args = shlex.split(args.proxy_args)

    missing = missing_tools()
    if missing:
        print(f"efficiency: missing {', '.join(missing)}; install with: {INSTALL} && .venv/bin/pip install matplotlib")
        return 2
    args.nofile = raise_nofile()

    scratch = Path(tempfile.mkdtemp(prefix="tm3-efficiency-"))
    try:
        if args.profile:
            profile(args, scratch, Path(args.profile))
            return 0
        return run_suite(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run_suite(args: argparse.Namespace, scratch: Path) -> int:
    peers = [x for x in all_peers() if any(fnmatch.fnmatch(x.name, pat) for pat in args.peers)]
    if not peers:
        print(f"efficiency: no peer matches {args.peers}")
        return 2
    started = time.monotonic()
    commit = git_commit()  # now: the code under test, whatever is committed meanwhile
    load = os.getloadavg()
    servers = Servers(scratch)
    starter = Starter(scratch, args.proxy_args)
    runs: list[dict[str, Any]] = []
    try:
        for rnd in range(args.rounds):
            order = peers[rnd % len(peers) :] + peers[: rnd % len(peers)]
            for peer in order:
                t0 = time.monotonic()
                metrics = measure_round(starter, servers, peer, args, first_round=rnd == 0)
                runs.append({"peer": peer.name, "round": rnd, "metrics": metrics})
                shown: dict[str, Any] = {k: round(v, 2) for k, v in metrics.items() if isinstance(v, float)}
                if "memory" in metrics:
                    shown["KiB/conn"] = {r: round(v, 2) for r, v in metrics["memory"]["kib_per_conn"].items()}
                print(
                    f"round {rnd + 1}/{args.rounds} {peer.name:16} {time.monotonic() - t0:5.1f} s  {shown}", flush=True
                )
    finally:
        servers.close()
    summary = median_summary(runs, peers)
    result: dict[str, Any] = {
        "label": args.label,
        "commit": commit,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in load]},
        "config": {
            "rounds": args.rounds,
            "size": args.size,
            "seconds": args.seconds,
            "connections": args.connections,
            "keepalive_connections": args.keepalive_connections,
            "churn_connections": args.churn_connections,
            "proxy_args": args.proxy_args,
            "peers": [p.name for p in peers],
            "workloads": args.workloads,
        },
        "elapsed_s": time.monotonic() - started,
        "runs": runs,
        "summary": summary,
    }
    result["targets"] = targets(summary)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"efficiency-{args.label}" if args.label else "efficiency"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (out / f"{stem}.md").write_text(md)
    plot(result, out / f"{stem}.png")
    print(md)
    print(f"wrote {out}/{stem}.json, .md, .png in {result['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
