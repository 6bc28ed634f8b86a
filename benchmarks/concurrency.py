"""Concurrency benchmark: can the RP carry N (default 10,000) connections at
once, and what do they cost in memory? Real sockets, loopback only.

Starts ``twistd tm3rp`` and ``twistd tm3lp --forward`` as subprocesses (4
pipes), an echo server in a forked child (asyncio), N clients in this process
(asyncio), and for each round:

1. opens N connections through the LP, at most ``--connect-window`` of them
   between connect() and their hello's echo at a time, and waits until every
   one has its 32-byte hello echoed: all N are open at once (no connection may
   close before this barrier; the echo server's live count and the RP's open
   file descriptors are checked too);
2. pings a sample of the open connections one at a time (latency with N open);
3. sends a few KiB on every connection at once and waits for all of it back;
4. half-closes every connection, waits for the EOF that the echo server's
   close sends back through the RP and the LP, then closes it.

Every byte that comes back is compared with what was sent on that connection
(each connection sends a different slice of one random block). Then the RP's
and the LP's logs must have one ``ended: fin`` line per connection. RSS
(``/proc/PID/status``), open fds and CPU time of both proxies are sampled at
idle, with N open, after the exchange, and after all closed; with two or more
rounds the RSS after each round shows whether anything leaks. (RSS after a
round stays above idle: per-connection objects form reference cycles that wait
for CPython's next full collection, and the allocator keeps freed arenas; the
figure must not grow round after round.)

Prints figures; exits 1 if any connection failed or a count is off. Stops by
itself (every phase has a timeout) and stops the proxies on any exit
(including Ctrl-C; they also get SIGKILL if this process dies).

    /work/venv/bin/python benchmarks/concurrency.py [--connections 10000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import glob
import multiprocessing
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from tests.support.processes import cpu_seconds

NOFILE = 65536
HELLO = 32
PING = 32
BLOCK_SIZE = 1 << 20
PR_SET_PDEATHSIG = 1
LISTENING = re.compile(r"listening on IPv4Address\(type='TCP', host='[^']*', port=(\d+)\) \((.*)\)")


# -- processes ----------------------------------------------------------------


def raise_nofile(n: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))  # a larger hard limit needs root
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup(nofile: int, parent: int | None = None) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid() if parent is None else parent

    def setup() -> None:
        raise_nofile(nofile)
        # Die with the benchmark even if it is SIGKILLed (no finally runs then).
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return setup


class Proxy:
    """A ``twistd -n`` subprocess, its log, and its /proc figures."""

    def __init__(self, name: str, twistd: str, args: list[str], workdir: str, nofile: int) -> None:
        self.name = name
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.out_path = os.path.join(workdir, f"{name}.out")
        argv = [twistd, "-n", "--pidfile=", "-l", self.log_path, *args]
        self.argv = argv
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_child_setup(nofile),
                start_new_session=True,  # Ctrl-C reaches us; we stop them in order
            )
        self.pid = self.proc.pid

    def log_text(self) -> str:
        # twistd's LogFile rotates at 1 MB: NAME.log.N (oldest) ... NAME.log.1, NAME.log.
        rotated = sorted(glob.glob(self.log_path + ".*"), key=lambda p: -int(p.rsplit(".", 1)[1]))
        parts = []
        for path in [*rotated, self.log_path]:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    parts.append(f.read())
            except FileNotFoundError:
                pass
        return "".join(parts)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(
                f"{self.name} exited with status {self.proc.returncode}; see {self.out_path} and {self.log_path}"
            )

    def sample(self) -> dict[str, float]:
        self.check_alive()
        return proc_sample(self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def proc_sample(pid: int) -> dict[str, float]:
    """RSS and peak RSS (MiB), open fds, CPU seconds of a process."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    out["cpu"] = cpu_seconds(pid)
    return out


class BenchError(Exception):
    pass


async def wait_for_log(proxy: Proxy, pattern: str, timeout: float, count: int = 1) -> list[re.Match[str]]:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        proxy.check_alive()
        matches = list(rx.finditer(proxy.log_text()))
        if len(matches) >= count:
            return matches
        if time.monotonic() > deadline:
            raise BenchError(
                f"{proxy.name}: {count} x {pattern!r} not in its log after {timeout:.0f} s (found {len(matches)})"
            )
        await asyncio.sleep(0.1)


def kernel_counters() -> dict[str, int]:
    """Loopback trouble signs: SYNs dropped on a full accept queue, retransmits."""
    out: dict[str, int] = {}
    ext = (
        "ListenOverflows",
        "ListenDrops",
        "TCPReqQFullDrop",
        "SyncookiesSent",
        "TCPSynRetrans",
        "TCPTimeouts",
        "TCPLossProbes",
    )
    for path, wanted in (("/proc/net/netstat", ext), ("/proc/net/snmp", ("RetransSegs",))):
        with open(path) as f:
            lines = f.read().splitlines()
        for names, values in zip(lines[::2], lines[1::2]):
            for k, v in zip(names.split()[1:], values.split()[1:]):
                if k in wanted:
                    out[k] = int(v)
    return out


# -- echo server --------------------------------------------------------------


class EchoServer(asyncio.Protocol):
    live: Any = None  # multiprocessing Values shared with the benchmark
    accepted: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        EchoServer.live.value += 1
        EchoServer.accepted.value += 1

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once everything is written: our FIN follows the echo

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        EchoServer.live.value -= 1


def _echo_main(port_out: Any, live: Any, accepted: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the benchmark stops us
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    EchoServer.live, EchoServer.accepted = live, accepted

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(EchoServer, "127.0.0.1", 0, backlog=65535)
        port_out.send(server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(serve())


class EchoProcess:
    """The echo server, in a child process of its own: the client side and
    the server side of N connections are 2N sockets, more than one process may
    open where RLIMIT_NOFILE cannot be raised past 20,000 (no CAP_SYS_RESOURCE)."""

    def __init__(self, nofile: int) -> None:
        ctx = multiprocessing.get_context("fork")  # before the event loop or any thread exists
        self.live = ctx.Value("l", 0, lock=False)  # written by the child only
        self.accepted = ctx.Value("l", 0, lock=False)
        port_in, port_out = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=self._run, args=(port_out, nofile), daemon=True)
        self.proc.start()
        if not port_in.poll(30):
            raise BenchError("the echo server did not start")
        self.port: int = port_in.recv()

    def _run(self, port_out: Any, nofile: int) -> None:
        _child_setup(nofile, os.getppid())()
        _echo_main(port_out, self.live, self.accepted)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join()


# -- clients ------------------------------------------------------------------


class Client(asyncio.Protocol):
    """One connection; checks every byte it gets back against what it sent."""

    __slots__ = ("bench", "index", "stream", "transport", "tx", "rx", "t0", "on_step", "state", "t_start", "slot")

    def __init__(self, bench: Bench, index: int) -> None:
        self.bench = bench
        self.index = index
        off = (index * 7919) % BLOCK_SIZE  # 7919 is odd: a different slice for every connection
        self.stream = memoryview(bench.block)[off:]
        self.transport: Any = None
        self.tx = 0
        self.rx = 0
        self.t0 = 0.0
        self.t_start = 0.0
        self.on_step: Callable[[Client, float], None] | None = None
        self.state = "connecting"
        self.slot = False  # holds one of the connect window's places

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.state = "open"
        now = time.perf_counter()
        self.bench.lat["connect"].append(now - self.t_start)
        self.send(HELLO, self.bench.hello_done)

    def send(self, n: int, on_step: Callable[[Client, float], None]) -> None:
        self.on_step = on_step
        self.t0 = time.perf_counter()
        self.transport.write(self.stream[self.tx : self.tx + n])
        self.tx += n

    def data_received(self, data: bytes) -> None:
        n = len(data)
        end = self.rx + n
        if end > self.tx:
            self.bench.fail(self, f"got {end - self.tx} B more than it sent")
            return
        if self.stream[self.rx : end] != data:
            self.bench.fail(self, f"wrong bytes at offset {self.rx}")
            return
        self.rx = end
        if end == self.tx and self.on_step is not None:
            step, self.on_step = self.on_step, None
            step(self, time.perf_counter() - self.t0)

    def half_close(self) -> None:
        self.state = "half-closed"
        self.t0 = time.perf_counter()
        self.transport.write_eof()

    def eof_received(self) -> bool:
        if self.state != "half-closed":
            self.bench.fail(self, f"EOF from the proxy while {self.state}")
        elif self.rx != self.tx:
            self.bench.fail(self, f"EOF after {self.rx} of {self.tx} B")
        else:
            self.state = "closing"
            self.bench.lat["close"].append(time.perf_counter() - self.t0)
            self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state == "closing":
            self.state = "closed"
            self.bench.closed(self)
        elif self.state != "failed":
            self.bench.fail(self, f"connection lost while {self.state}: {exc or 'closed by the peer'}")


class Phase:
    """Waits for ``count`` connections to finish a step (or fail)."""

    def __init__(self, name: str, count: int) -> None:
        self.name = name
        self.left = count
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if count == 0:
            self.done.set_result(None)

    def tick(self) -> None:
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(None)

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self.done), timeout)
        except TimeoutError:
            raise BenchError(
                f"phase {self.name!r}: {self.left} connections still not done after {timeout:.0f} s"
            ) from None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.block = os.urandom(BLOCK_SIZE + HELLO + PING + args.payload + 1024)
        self.failures: list[str] = []
        self.failed: set[int] = set()
        self.lat: dict[str, list[float]] = {}
        self.phase: Phase | None = None
        self.round_failures = 0
        self.window: asyncio.Semaphore | None = None

    def new_round(self) -> None:
        self.lat = {k: [] for k in ("connect", "hello", "ping", "exchange", "close")}
        self.round_failures = 0

    def fail(self, c: Client, why: str) -> None:
        prev, c.state = c.state, "failed"
        if c.transport is not None:
            c.transport.abort()
        self.release(c)
        if c.index in self.failed:
            return
        self.failed.add(c.index)
        self.round_failures += 1
        if len(self.failures) < 20:
            self.failures.append(f"conn {c.index} ({prev}): {why}")
        if self.phase is not None:
            self.phase.tick()

    def release(self, c: Client) -> None:
        if c.slot and self.window is not None:
            c.slot = False
            self.window.release()

    def hello_done(self, c: Client, dt: float) -> None:
        self.lat["hello"].append(dt)
        self.release(c)
        assert self.phase is not None
        self.phase.tick()

    def exchange_done(self, c: Client, dt: float) -> None:
        self.lat["exchange"].append(dt)
        assert self.phase is not None
        self.phase.tick()

    def closed(self, c: Client) -> None:
        assert self.phase is not None
        self.phase.tick()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))]


def fmt_lat(name: str, values: list[float]) -> str:
    if not values:
        return f"  {name:<26} (none)"
    ms = [x * 1000 for x in values]
    return (
        f"  {name:<26} n={len(ms):<6} p50 {pct(ms, 50):8.2f}  p90 {pct(ms, 90):8.2f}  p99 {pct(ms, 99):8.2f}"
        f"  max {max(ms):8.2f} ms"
    )


# -- the run ------------------------------------------------------------------


async def run(args: argparse.Namespace, workdir: str, proxies: list[Proxy], echo: EchoProcess) -> int:
    loop = asyncio.get_running_loop()
    n = args.connections
    timeout = args.phase_timeout if args.phase_timeout else 60 + n / 100
    twistd = args.twistd or os.path.join(os.path.dirname(sys.executable), "twistd")

    echo_port = echo.port

    def profile(name: str) -> list[str]:
        if not args.profile:
            return []
        os.makedirs(args.profile, exist_ok=True)
        return ["--profile", os.path.join(args.profile, f"{name}.prof"), "--profiler", "cprofile", "--savestats"]

    rp = Proxy(
        "rp",
        twistd,
        [
            *profile("rp"),
            "tm3rp",
            "--pipes",
            str(args.pipes),
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--allow-to",
            "127.0.0.0/8",
        ],  # the echo server is on loopback
        workdir,
        args.nofile,
    )
    proxies.append(rp)
    (m,) = await wait_for_log(rp, LISTENING.pattern, 30)
    rp_port = int(m.group(1))
    backlog = f":backlog={args.lp_backlog}" if args.lp_backlog else ""
    lp = Proxy(
        "lp",
        twistd,
        [*profile("lp"), "tm3lp", "--pipes", str(args.pipes), "--remote", f"127.0.0.1:{rp_port}",
         "--forward", f"tcp:0:interface=127.0.0.1{backlog}:127.0.0.1:{echo_port}"],
        workdir,
        args.nofile,
    )  # fmt: skip
    proxies.append(lp)
    (m,) = await wait_for_log(lp, LISTENING.pattern, 30)
    lp_port = int(m.group(1))
    await wait_for_log(lp, r"session 1 up", 30)
    await wait_for_log(rp, r"session 1 up", 30)

    print(f"RP  pid {rp.pid}: {' '.join(rp.argv)}")
    print(f"LP  pid {lp.pid}: {' '.join(lp.argv)}")
    print(f"echo server 127.0.0.1:{echo_port}; clients -> LP 127.0.0.1:{lp_port}; fd limit {args.nofile}")
    print(
        f"{n} connections x {args.rounds} round(s); per connection {HELLO} B hello, {args.payload} B exchange"
        f" (+{PING} B ping on {min(args.ping_sample, n)}); connect window {args.connect_window}; phase timeout {timeout:.0f} s"
    )
    await asyncio.sleep(args.settle)

    samples: dict[str, dict[str, dict[str, float]]] = {}

    def snap(label: str) -> None:
        samples[label] = {
            "rp": rp.sample(),
            "lp": lp.sample(),
            "client": proc_sample(os.getpid()),
            "echo": proc_sample(echo.proc.pid or 0),
        }

    snap("idle")
    bench = Bench(args)
    counters0 = kernel_counters()
    t_run = time.perf_counter()
    ok = True
    ended_expected = 0
    for r in range(1, args.rounds + 1):
        bench.new_round()
        print(f"\nround {r}")
        clients = [Client(bench, i) for i in range(n)]
        t_round0 = time.perf_counter()

        # 1. open all N; each is open once its hello came back.
        bench.phase = phase = Phase("open", n)
        # A connection holds its place in the window until its hello is back
        # through the RP: a connect() returns once the kernel has queued it on
        # the LP's listening socket, so releasing at connect would let a burst
        # overflow that queue (SYNs dropped, 1 s retransmit stalls).
        bench.window = sem = asyncio.Semaphore(args.connect_window)
        t0 = time.perf_counter()

        async def connect(c: Client, sem: asyncio.Semaphore) -> None:
            await sem.acquire()
            c.slot = True
            c.t_start = time.perf_counter()
            try:
                await loop.create_connection(lambda: c, "127.0.0.1", lp_port)
            except OSError as e:
                bench.fail(c, f"connect: {e}")

        connectors = [asyncio.ensure_future(connect(c, sem)) for c in clients]
        await phase.wait(timeout)
        t_open = time.perf_counter() - t0
        await asyncio.gather(*connectors)
        live = [c for c in clients if c.state == "open"]
        rp_open = rp.sample()
        snap(f"r{r} open")
        print(
            f"  open: {len(live)} of {n} open at once in {t_open:.2f} s ({n / t_open:.0f} conn/s);"
            f" echo server has {echo.live.value} live; RP holds {rp_open['fds'] - samples['idle']['rp']['fds']:.0f} fds more than idle"
        )
        if len(live) != n or echo.live.value != n or rp_open["fds"] - samples["idle"]["rp"]["fds"] < n:
            ok = False

        # 2. ping a sample, one at a time: the latency with N open.
        step = max(1, len(live) // max(1, args.ping_sample))
        deadline = time.monotonic() + timeout
        for c in live[::step][: args.ping_sample]:
            fut: asyncio.Future[float] = loop.create_future()

            def pinged(_c: Client, dt: float, fut: asyncio.Future[float] = fut) -> None:
                if not fut.done():
                    fut.set_result(dt)

            c.send(PING, pinged)
            try:
                bench.lat["ping"].append(await asyncio.wait_for(fut, max(0.0, min(10.0, deadline - time.monotonic()))))
            except TimeoutError:
                bench.fail(c, "ping timed out")
                if time.monotonic() > deadline:
                    raise BenchError(f"phase 'ping': not done after {timeout:.0f} s") from None
        live = [c for c in live if c.state == "open"]

        # 3. a few KiB on every connection at once.
        bench.phase = phase = Phase("exchange", len(live))
        t0 = time.perf_counter()
        for c in live:
            c.send(args.payload, bench.exchange_done)
        await phase.wait(timeout)
        t_exchange = time.perf_counter() - t0
        live = [c for c in live if c.state == "open"]
        snap(f"r{r} exchanged")
        moved = sum(c.tx for c in live)
        print(f"  exchange: {moved / 2**20:.1f} MiB each way on {len(live)} connections in {t_exchange:.2f} s")

        # 4. half-close, wait for the EOF, close.
        bench.phase = phase = Phase("close", len(live))
        t0 = time.perf_counter()
        for c in live:
            c.half_close()
        await phase.wait(timeout)
        t_close = time.perf_counter() - t0
        closed = sum(1 for c in clients if c.state == "closed")
        print(f"  close: {closed} closed after half-close, EOF back, all bytes verified, in {t_close:.2f} s")

        # Both proxies log one line per connection as it ends.
        ended_expected += closed
        try:
            await wait_for_log(rp, r"ended: fin", timeout, ended_expected)
            await wait_for_log(lp, r"ended: fin", timeout, ended_expected)
        except BenchError as e:
            print(f"  ! {e}")
            ok = False
        deadline = time.monotonic() + 10
        while echo.live.value and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        t_round = time.perf_counter() - t_round0
        print(f"  round time {t_round:.2f} s (first connect to last 'ended' log line); failures {bench.round_failures}")
        await asyncio.sleep(args.settle)
        snap(f"r{r} closed")
        for name, label in (
            ("connect", "connect"),
            ("hello", "hello RTT (1st msg)"),
            ("ping", "ping RTT, N open"),
            ("exchange", f"{args.payload} B echo, all at once"),
            ("close", "half-close -> EOF"),
        ):
            print(fmt_lat(label, bench.lat[name]))
        if bench.round_failures or closed != n:
            ok = False
    t_total = time.perf_counter() - t_run
    counters1 = kernel_counters()

    # -- report -------------------------------------------------------------
    print(
        f"\ntotal time {t_total:.2f} s for {args.rounds} round(s), settling included; connection failures: {len(bench.failed)}"
    )
    for line in bench.failures:
        print(f"  ! {line}")
    labels = list(samples)
    width = max(11, *(len(x) + 1 for x in labels))
    print("\n" + " " * 18 + "".join(f"{x:>{width}}" for x in labels))
    for who in ("rp", "lp"):
        for key, unit, f in (
            ("VmRSS", "RSS MiB", "{:.1f}"),
            ("VmHWM", "peak RSS MiB", "{:.1f}"),
            ("fds", "open fds", "{:.0f}"),
            ("cpu", "CPU s", "{:.1f}"),
        ):
            print(f"{who.upper()} {unit:<14}" + "".join(f"{f.format(samples[x][who][key]):>{width}}" for x in labels))
    for who in ("client", "echo"):
        print(f"{who + ' CPU s':<17} " + "".join(f"{samples[x][who]['cpu']:>{width}.1f}" for x in labels))
    idle = samples["idle"]
    for who in ("rp", "lp"):
        per_open = (samples["r1 open"][who]["VmRSS"] - idle[who]["VmRSS"]) * 1024 / n
        per_ex = (samples["r1 exchanged"][who]["VmRSS"] - idle[who]["VmRSS"]) * 1024 / n
        after = " / ".join(
            f"{samples[f'r{r} closed'][who]['VmRSS'] - idle[who]['VmRSS']:+.1f}" for r in range(1, args.rounds + 1)
        )
        print(
            f"{who.upper()}: {per_open:.2f} KiB RSS per open connection ({per_ex:.2f} KiB after the exchange);"
            f" RSS after each round vs idle: {after} MiB"
        )

    print("\nlog lines:")
    patterns = [
        ("ended: fin", r"ended: fin"),
        ("ended: (any)", r"ended: \w"),
        ("connect failed", r"connect to \S+ failed"),
        ("protocol error", r"protocol error"),
        ("session lost", r"session \d+ lost"),
        ("Traceback/Unhandled", r"Traceback|Unhandled"),
    ]
    for proxy in (rp, lp):
        text = proxy.log_text()
        counts = {name: len(re.findall(p, text)) for name, p in patterns}
        print(
            f"  {proxy.name.upper()}: "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f" ({text.count(chr(10))} lines)"
        )
        if counts["ended: fin"] != ended_expected or counts["ended: (any)"] != ended_expected:
            ok = False
        if counts["protocol error"] or counts["Traceback/Unhandled"] or counts["session lost"]:
            ok = False
    delta = {k: counters1[k] - counters0.get(k, 0) for k in counters1}
    print("kernel (whole host, during the rounds): " + ", ".join(f"{k} +{v}" for k, v in delta.items()))
    print("\nRESULT: " + ("OK" if ok and not bench.failed else "FAILED"))
    return 0 if ok and not bench.failed else 1


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--connections", "-n", type=int, default=10_000, help="concurrent connections (default 10000)")
    p.add_argument("--rounds", type=int, default=2, help="open/exchange/close cycles on the same proxies (default 2)")
    p.add_argument(
        "--payload", type=int, default=4096, help="bytes each connection echoes in the exchange (default 4096)"
    )
    p.add_argument("--pipes", type=int, default=4)
    p.add_argument(
        "--connect-window",
        type=int,
        default=256,
        help="connections opening at once: connected, hello not back yet (default 256)",
    )
    p.add_argument(
        "--lp-backlog",
        type=int,
        default=1024,
        help="listen backlog of the LP forward endpoint (default 1024; 0: Twisted default, 50)",
    )
    p.add_argument(
        "--ping-sample", type=int, default=200, help="connections pinged one at a time with all open (default 200)"
    )
    p.add_argument("--phase-timeout", type=float, default=0, help="seconds per phase (default 60 + N/100)")
    p.add_argument("--settle", type=float, default=2.0, help="seconds to wait before the idle and after-close samples")
    p.add_argument("--nofile", type=int, default=NOFILE, help="RLIMIT_NOFILE for this process and the proxies")
    p.add_argument("--twistd", default=None, help="twistd to run (default: the one beside this Python)")
    p.add_argument(
        "--profile", metavar="DIR", help="run RP and LP under cProfile; pstats files DIR/rp.prof, DIR/lp.prof"
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the proxies' logs (always kept on failure)")
    args = p.parse_args()
    if args.connections < 1 or args.rounds < 1:
        p.error("--connections and --rounds must be at least 1")
    have = raise_nofile(args.nofile)
    need = args.connections + 100
    if have < need:
        p.error(f"RLIMIT_NOFILE is {have}; {need} needed for {args.connections} connections (run as root or lower -n)")
    args.nofile = have

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    workdir = tempfile.mkdtemp(prefix="tm3-concurrency-")
    proxies: list[Proxy] = []
    echo: EchoProcess | None = None
    status = 1
    try:
        echo = EchoProcess(args.nofile)
        status = asyncio.run(run(args, workdir, proxies, echo))
    except BenchError as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        status = 130
    finally:
        for proxy in reversed(proxies):
            proxy.stop()
        if echo is not None:
            echo.stop()
        if status == 0 and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs: {workdir}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
