"""The RP's memory under hostile streams, against its configured ceilings:
not a test, a measurement. Loopback only (127.0.0.0/8).

For each scenario a fresh RP (``twistd -n --pidfile= tm3rp --pipes 4``, small
ceilings: ``--reorder-window 8MiB --total-reorder-window 32MiB``; the orphan
limits are fixed at 1 MiB per id and 16 MiB in all) is started, warmed up by
one echo round trip through a first session (so lazily imported code and the
first connection's allocations are in the baseline), and left idle; then the
test LP of ``tests/support/lpclient.py`` opens a fresh session and attacks it:

1. ``held 0 B``: SYNs for ``--connections`` connections to an echo server
   in this process, then empty DATA numbered from seq 2 (seq 1 never comes, so
   every one is held for the gap), spread round robin over the connections so
   the per-connection window is not reached first, until the RP ends the
   session with a protocol error (total reorder window exceeded);
2. ``held 1 B``, ``held 4096 B``: the same with 1-byte and 4096-byte payloads;
3. ``orphans``: empty and 1-byte DATA for ``--orphan-ids`` ids that never get
   a SYN, twice what the 16 MiB orphan total admits (the RP drops and counts
   the rest, the session stays up), all sent well within the 10 s the RP holds
   an orphan; then the pipes are closed;
4. ``early bytes``: 3 of the 4 pipes of a set, 10 MiB sent on each before the
   set is complete (the RP keeps 64 KiB plus one read of each and stops
   reading); then the pipes are closed.

A thread samples the RP's VmRSS (``/proc/PID/status``) every 50 ms. Each
scenario prints RSS idle before, peak during (sampled, and the kernel's
VmHWM), after the session ended, the ceiling, and ``(peak - idle) / ceiling``,
then a verdict against the target "peak RSS above idle within 1.5x the
configured ceiling".

    .venv/bin/python benchmarks/hostile_memory.py [--connections 64] [--orphan-ids 1024]
        [--rounds 1] [--only held0 held1 held4096 orphans early]

``--rounds N`` attacks each RP N times, a fresh session each time: RSS "after"
stays well above idle (the allocator keeps freed memory; the objects are
gone), and the peak of later rounds shows whether that memory is reused.

Every wait is bounded; the RP is stopped on any exit (and gets SIGKILL if
this process dies). Exits 1 if a scenario did not go as planned or missed
the target.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from concurrency import LISTENING, BenchError, Proxy, proc_sample  # benchmarks/concurrency.py
from twisted.internet import defer, task

from tests.support.lpclient import LPClient, echo_over_pipes
from tests.support.processes import TWISTD
from tests.support.servers import TestServer, echo, twisted_buffered, unsent_bytes
from tests.support.waiting import sleep, with_timeout
from tm3.core.reorder import HELD_OVERHEAD
from tm3.core.wire import HEADER_SIZE
from tm3.mux.pipes import EARLY_READ_LIMIT
from tm3.mux.settings import Settings
from tm3.rp.orphans import ORPHAN_ID_OVERHEAD, ORPHAN_OVERHEAD

KiB = 1024
MiB = 1024 * KiB
PIPES = 4
REORDER_WINDOW = 8 * MiB
TOTAL_REORDER_WINDOW = 32 * MiB
DEFAULTS = Settings()
ORPHAN_ID_LIMIT = DEFAULTS.orphan_id_limit
ORPHAN_TOTAL_LIMIT = DEFAULTS.orphan_total_limit
ORPHAN_TIMEOUT = DEFAULTS.orphan_timeout
TCP_READ = 64 * KiB  # what one read of a Twisted TCP transport brings at most
EARLY_PIPES = 3
EARLY_SEND = 10 * MiB
TARGET = 1.5
SAMPLE_INTERVAL = 0.05
SETTLE = 1.0
BATCH = 128 * KiB  # bytes per write to one pipe

RP_ARGS = [
    "tm3rp",
    "--pipes",
    str(PIPES),
    "--listen",
    "tcp:0:interface=127.0.0.1",
    "--allow-to",
    "127.0.0.0/8",  # the echo server is on loopback
    "--reorder-window",
    "8MiB",
    "--total-reorder-window",
    "32MiB",
]

# Every RP started, stopped in main()'s finally whatever happens.
RUNNING: list[Proxy] = []


# -- measuring ------------------------------------------------------------------


class RssSampler:
    """VmRSS of ``pid`` every ``interval`` seconds, in a thread of its own (the
    reactor is busy sending while it matters most)."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0.0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def _sample(self) -> None:
        try:
            rss = proc_sample(self.pid)["VmRSS"]
        except (FileNotFoundError, ProcessLookupError):
            return
        self.samples += 1
        self.peak = max(self.peak, rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join(5)
        self._sample()
        return self.peak


@dataclass
class Result:
    name: str
    ceiling: int  # bytes
    idle: float = 0.0  # MiB
    peak: float = 0.0
    hwm: float = 0.0
    after: float = 0.0
    samples: int = 0
    note: str = ""
    ok: bool = True  # the scenario went as planned

    @property
    def ratio(self) -> float:
        return (self.peak - self.idle) * MiB / self.ceiling

    @property
    def hwm_ratio(self) -> float:
        return (self.hwm - self.idle) * MiB / self.ceiling

    @property
    def within(self) -> bool:
        return max(self.ratio, self.hwm_ratio) <= TARGET


# -- the RP and the session -------------------------------------------------------


async def wait_log(rp: Proxy, pattern: str, timeout: float) -> re.Match[str]:
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        rp.check_alive()
        m = rx.search(rp.log_text())
        if m:
            return m
        if time.monotonic() > deadline:
            raise BenchError(f"{pattern!r} not in the RP's log ({rp.log_path}) after {timeout:.0f} s")
        await sleep(0.05)


async def connect_lp(reactor: Any, port: int, rp: Proxy, session: int) -> LPClient:
    lp = LPClient(reactor, port, PIPES)
    await with_timeout(lp.connect(), 10)
    await wait_log(rp, rf"session {session} up", 10)
    return lp


async def blast(lp: LPClient, batches: Any, timeout: float = 60) -> int:
    """Write each batch (bytes) to a pipe whose transport has not paused us,
    round robin; stops early once every pipe is closed. Returns the batches
    written."""
    deadline = time.monotonic() + timeout
    written = 0
    turn = 0
    for batch in batches:
        while True:
            live = [p for p in lp.pipes if p.connected_]
            if not live:
                return written
            ready = [p for p in live if not p.gate.paused]
            if ready:
                ready[turn % len(ready)].write(batch)
                turn += 1
                break
            if time.monotonic() > deadline:
                raise BenchError(f"sending: not done after {timeout:.0f} s")
            await sleep(0.002)
        written += 1
        await sleep(0)  # let the transports write and the RP's close be seen
    return written


def batched(messages: Any, size: int = BATCH) -> Any:
    """Join an iterable of encoded messages into batches of about ``size`` bytes."""
    parts: list[bytes] = []
    n = 0
    for m in messages:
        parts.append(m)
        n += len(m)
        if n >= size:
            yield b"".join(parts)
            parts, n = [], 0
    if parts:
        yield b"".join(parts)


async def drained(lp: LPClient, timeout: float = 20) -> None:
    """Until every byte written to the live pipes has left this process and
    the kernel's send queues (the RP's kernel has it)."""
    deadline = time.monotonic() + timeout
    while True:
        live = [p for p in lp.pipes if p.connected_]
        if all(twisted_buffered(p.transport) == 0 and unsent_bytes(p.transport) == 0 for p in live):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"pipes not drained after {timeout:.0f} s")
        await sleep(0.02)


# -- scenarios ------------------------------------------------------------------------


def held_scenario(payload: int) -> Callable[..., Awaitable[str]]:
    async def body(reactor: Any, port: int, rp: Proxy, server: TestServer, res: Result, args: Any, session: int) -> str:
        lp = await connect_lp(reactor, port, rp, session)
        conns = args.connections
        accepted = len(server.protocols)
        for cid in range(1, conns + 1):
            lp.open(cid, "127.0.0.1", server.port)
        await with_timeout(server.connection(accepted + conns - 1), 20)
        cost = HEADER_SIZE + payload + HELD_OVERHEAD
        fits = TOTAL_REORDER_WINDOW // cost  # held before the next one is a protocol error
        per_conn = -(-(fits + 1) // conns) * cost
        if per_conn > REORDER_WINDOW:
            raise BenchError(f"{conns} connections reach the per-connection window first; use more")
        total = fits + fits // 20 + 64
        body_bytes = b"x" * payload

        def messages() -> Any:
            for k in range(total):
                yield lp.data_msg(1 + k % conns, 2 + k // conns, body_bytes)

        t0 = time.perf_counter()
        await blast(lp, batched(messages()))
        await with_timeout(lp.all_closed(), 30)
        took = time.perf_counter() - t0
        m = await wait_log(rp, rf"session {session}: protocol error[^\n]*", 10)
        if "total reorder window" not in m.group(0):
            res.ok = False
            return f"unexpected end: {m.group(0)}"
        await wait_log(rp, rf"session {session} lost", 10)
        return (
            f"{conns} conns; RP ended the session (total reorder window) after"
            f" {fits} held ({fits * (HEADER_SIZE + payload) / MiB:.1f} MiB on the wire) in {took:.1f} s"
        )

    return body


def orphan_accounting(ids: int, total: int, payload_of: Callable[[int], int]) -> tuple[int, int]:
    """What the RP's rule-9 accounting keeps of ``total`` messages sent round
    robin over ``ids`` ids (message k: id k % ids): (kept, dropped)."""
    per_id = [0] * ids
    held = 0
    kept = 0
    for k in range(total):
        i = k % ids
        size = HEADER_SIZE + payload_of(k) + ORPHAN_OVERHEAD
        if per_id[i] == 0:
            if held + ORPHAN_ID_OVERHEAD + size > ORPHAN_TOTAL_LIMIT:
                continue
            per_id[i] = ORPHAN_ID_OVERHEAD
            held += ORPHAN_ID_OVERHEAD
        if per_id[i] + size > ORPHAN_ID_LIMIT or held + size > ORPHAN_TOTAL_LIMIT:
            continue
        per_id[i] += size
        held += size
        kept += 1
    return kept, total - kept


async def orphans(reactor: Any, port: int, rp: Proxy, server: TestServer, res: Result, args: Any, session: int) -> str:
    lp = await connect_lp(reactor, port, rp, session)
    ids = args.orphan_ids
    base = 1000  # ids that never get a SYN

    def payload_of(k: int) -> int:
        return (k // ids) % 2  # each id gets empty and 1-byte DATA by turns

    fits = ORPHAN_TOTAL_LIMIT // (HEADER_SIZE + ORPHAN_OVERHEAD)
    total = 2 * fits
    kept, dropped = orphan_accounting(ids, total, payload_of)

    def messages() -> Any:
        for k in range(total):
            yield lp.data_msg(base + k % ids, 1 + k // ids, b"x" * payload_of(k))

    t0 = time.perf_counter()
    await blast(lp, batched(messages()))
    await drained(lp)
    took = time.perf_counter() - t0
    if took > ORPHAN_TIMEOUT * 0.7:
        res.ok = False
    await sleep(SETTLE)  # the RP reads what its kernel holds
    up = all(p.connected_ for p in lp.pipes)
    if not up:
        res.ok = False
    await with_timeout(lp.close(), 10)
    await wait_log(rp, rf"session {session} lost", 10)
    return (
        f"{ids} ids, {total} msgs sent in {took:.1f} s; by the RP's accounting {kept} held,"
        f" {dropped} dropped; session {'stayed up' if up else 'ENDED (unexpected)'}"
    )


def rp_read(rp_port: int, local_ports: list[int]) -> list[int]:
    """Bytes the RP's kernel holds unread (rx_queue) on its end of each pipe."""
    out = dict.fromkeys(local_ports, 0)
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) != rp_port:
                continue
            rport = int(remote.split(":")[1], 16)
            if rport in out:
                out[rport] = int(fields[4].split(":")[1], 16)
    return [out[p] for p in local_ports]


async def early(reactor: Any, port: int, rp: Proxy, server: TestServer, res: Result, args: Any, session: int) -> str:
    lp = LPClient(reactor, port, PIPES)
    for _ in range(EARLY_PIPES):
        await with_timeout(lp.connect_pipe(), 10)
    # Valid DATA for an id, though the RP never looks at them: the set is not complete.
    block = b"".join(lp.data_msg(1, 1 + k, b"y" * 4096) for k in range(EARLY_SEND // 4104))
    for i in range(EARLY_PIPES):
        lp.send_raw(i, block)

    def in_flight() -> tuple[int, ...]:
        return tuple(twisted_buffered(p.transport) + unsent_bytes(p.transport) for p in lp.pipes if p.connected_)

    # Until the transfer has stalled (the RP stopped reading), then a while longer.
    deadline = time.monotonic() + 20
    last, since = in_flight(), time.monotonic()
    while time.monotonic() - since < 1.0:
        if time.monotonic() > deadline:
            raise BenchError("early bytes: the transfer did not stall within 20 s")
        await sleep(0.05)
        now = in_flight()
        if now != last:
            last, since = now, time.monotonic()
    await sleep(SETTLE)
    up = sum(p.connected_ for p in lp.pipes)
    ports = [p.transport.getHost().port for p in lp.pipes if p.connected_]
    unread = rp_read(port, ports)
    read = [
        p.bytes_sent - twisted_buffered(p.transport) - unsent_bytes(p.transport) - u
        for p, u in zip([p for p in lp.pipes if p.connected_], unread, strict=True)
    ]
    if up != EARLY_PIPES:
        res.ok = False
    await with_timeout(lp.close(), 10)
    return (
        f"{EARLY_PIPES} pending pipes x {EARLY_SEND // MiB} MiB sent; {up} still open;"
        f" RP read {', '.join(f'{r / KiB:.0f}' for r in read)} KiB"
        f" (its kernel holds {', '.join(f'{u / KiB:.0f}' for u in unread)} KiB unread)"
    )


SCENARIOS: dict[str, tuple[str, int, Callable[..., Awaitable[str]]]] = {
    "held0": ("held 0 B DATA", TOTAL_REORDER_WINDOW, held_scenario(0)),
    "held1": ("held 1 B DATA", TOTAL_REORDER_WINDOW, held_scenario(1)),
    "held4096": ("held 4096 B DATA", TOTAL_REORDER_WINDOW, held_scenario(4096)),
    "orphans": ("orphans 0/1 B", ORPHAN_TOTAL_LIMIT, orphans),
    "early": ("early bytes", EARLY_PIPES * (EARLY_READ_LIMIT + TCP_READ), early),
}


async def run_scenario(reactor: Any, key: str, workdir: str, nofile: int, args: Any) -> list[Result]:
    name, ceiling, body = SCENARIOS[key]
    results: list[Result] = []
    rp = Proxy(f"rp-{key}", TWISTD, RP_ARGS, workdir, nofile)
    RUNNING.append(rp)
    server = await echo(reactor).start()
    sampler: RssSampler | None = None
    try:
        port = int((await wait_log(rp, LISTENING.pattern, 30)).group(1))
        # Warm up: one session, one echo round trip, ended.
        lp = await connect_lp(reactor, port, rp, 1)
        await echo_over_pipes(lp, 1, server.port, b"warm-up" * 100)
        await with_timeout(lp.close(), 10)
        await wait_log(rp, r"session 1 lost", 10)
        await sleep(SETTLE)
        idle = rp.sample()["VmRSS"]
        for r in range(args.rounds):  # the same RP, a fresh session each round
            res = Result(name if r == 0 else f"  round {r + 1}", ceiling, idle=idle)
            sampler = RssSampler(rp.pid).start()
            res.note = await body(reactor, port, rp, server, res, args, 2 + r)
            await sleep(SETTLE)
            res.after = rp.sample()["VmRSS"]
            res.peak = sampler.stop()
            res.samples = sampler.samples
            res.hwm = rp.sample()["VmHWM"]
            results.append(res)
    finally:
        if sampler is not None:
            sampler.stop()
        rp.stop()
        RUNNING.remove(rp)
        await with_timeout(server.stop(), 10)
    return results


def report(res: Result) -> None:
    print(
        f"  {res.name:<17} idle {res.idle:6.1f}  peak {res.peak:6.1f} (VmHWM {res.hwm:6.1f})"
        f"  after {res.after:6.1f} MiB  ceiling {res.ceiling / MiB:6.3f} MiB"
        f"  (peak-idle)/ceiling {res.ratio:5.2f} (VmHWM {res.hwm_ratio:5.2f})"
        f"  {'within' if res.within else 'ABOVE'} {TARGET}x{'' if res.ok else '  [scenario did not go as planned]'}"
    )
    print(f"  {'':<17} {res.note}; {res.samples} samples")


async def main(reactor: Any, args: argparse.Namespace) -> None:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    workdir = tempfile.mkdtemp(prefix="tm3-hostile-")
    print(
        f"RP: twistd -n --pidfile= -l LOG {' '.join(RP_ARGS)}  (orphans: {ORPHAN_ID_LIMIT // MiB} MiB per id,"
        f" {ORPHAN_TOTAL_LIMIT // MiB} MiB in all); a fresh RP per scenario; RSS in MiB, sampled every"
        f" {SAMPLE_INTERVAL * 1000:.0f} ms; RP logs in {workdir} (removed if all is well)"
    )
    results = []
    for key in args.only:
        for res in await run_scenario(reactor, key, workdir, nofile, args):
            report(res)
            results.append(res)
    good = all(r.within and r.ok for r in results)
    print(
        f"verdict: peak RSS above idle within {TARGET}x the configured ceiling:"
        f" {'yes' if good else 'NO'} in {sum(r.within for r in results)} of {len(results)} scenarios"
        + ("" if all(r.ok for r in results) else " (some scenario did not go as planned)")
    )
    if not good:
        print(f"logs kept in {workdir}")
        raise SystemExit(1)
    shutil.rmtree(workdir, ignore_errors=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=64, help="connections the held DATA is spread over (default 64)")
    p.add_argument("--orphan-ids", type=int, default=1024, help="ids the orphans are spread over (default 1024)")
    p.add_argument(
        "--rounds", type=int, default=1, help="attacks on each RP, a fresh session each (default 1; 2+ shows reuse)"
    )
    p.add_argument("--only", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS), help="scenarios to run")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if not 1 <= args.connections <= 60000 or not 1 <= args.orphan_ids <= 60000:
        p.error("--connections and --orphan-ids must be 1..60000")
    return args


if __name__ == "__main__":
    arguments = parse()
    try:
        task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
    finally:
        for proxy in RUNNING:
            proxy.stop()
