"""Bulk throughput of the RP over loopback: not a test, a measurement.

Starts the real RP (``twistd -n tm3rp``) in a subprocess with 4 pipes (and
then 1 pipe, for comparison), a source and a sink server (blocking sockets in
threads, so the servers cost next to nothing), and drives them with the test
LP of ``tests/support/lpclient.py``: a download of ``--size`` MiB, hashed as it
arrives and checked against the source's sha256, then an upload of the same
size checked by the sink's digest. Prints MiB/s and MB/s for each, and the CPU time the RP process used (about
equal to the wall time means the RP is the bottleneck).

    /work/venv/bin/python benchmarks/bulk_download.py [--size 512] [--pipes 4 1]
        [--payload 4096] [--profile DIR]

``--profile DIR`` runs the RP under ``twistd --profiler cprofile`` and writes
``DIR/rp-<pipes>.prof`` (read it with ``python -m pstats``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, task

from tests.support.lpclient import LPClient
from tests.support.pattern import Pattern
from tests.support.processes import LISTENING, TWISTD, Proc, cpu_seconds, spawn
from tests.support.threadserver import ThreadServer
from tests.support.waiting import with_timeout

MiB = 1024 * 1024


def send_pattern(size: int, seed: int) -> Callable[[socket.socket], None]:
    """The source: ``size`` pattern bytes, then our FIN; drains until the LP's."""

    def respond(conn: socket.socket) -> None:
        for chunk in Pattern(seed).chunks(size, 512 * 1024):
            conn.sendall(chunk)
        conn.shutdown(socket.SHUT_WR)
        while conn.recv(65536):
            pass

    return respond


def hash_and_report(conn: socket.socket) -> None:
    """The sink: hashes until EOF, then answers ``"<count> <sha256>\\n"``."""
    h = hashlib.sha256()
    n = 0
    while True:
        data = conn.recv(1024 * 1024)
        if not data:
            break
        n += len(data)
        h.update(data)
    conn.sendall(f"{n} {h.hexdigest()}\n".encode())


async def start_rp(pipes: int, payload: int, profile: str | None) -> tuple[Proc, int]:
    """The RP as ``twistd``, and the port it listens on."""
    argv = [TWISTD, "-n", "--pidfile="]
    if profile:
        argv += ["--profiler", "cprofile", "--savestats", "--profile", profile]
    argv += ["tm3rp", "--pipes", str(pipes), "--listen", "tcp:0:interface=127.0.0.1", "--max-payload", str(payload)]
    argv += ["--allow-to", "127.0.0.0/8"]  # the benchmark's server is on loopback
    daemon = spawn(argv)
    match = await with_timeout(daemon.when_output(LISTENING), 30)
    return daemon, int(match.group(1))


async def run(reactor: Any, pipes: int, size: int, payload: int, profile_dir: str | None) -> dict[str, float]:
    profile = str(Path(profile_dir) / f"rp-{pipes}.prof") if profile_dir else None
    daemon, rp_port = await start_rp(pipes, payload, profile)
    lp = LPClient(reactor, rp_port, pipes, max_payload=payload, max_rx_payload=payload)
    await with_timeout(lp.connect(), 10)
    out: dict[str, float] = {}
    try:
        pid = daemon.transport.pid
        src = ThreadServer.on_loopback(send_pattern(size, seed=1), once=True, conn_timeout=None)
        c0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        rx = lp.open(1, "127.0.0.1", src.port, streaming=True)
        reason, _ = await with_timeout(rx.when_fin(), 600)
        out["down"] = time.perf_counter() - t0
        out["down_cpu"] = cpu_seconds(pid) - c0
        lp.fin(1)
        assert reason == 0x88, hex(reason)
        assert rx.received == size and rx.digest == Pattern(1).digest(size), "download digest differs"

        snk = ThreadServer.on_loopback(hash_and_report, once=True, conn_timeout=None)
        c0 = cpu_seconds(pid)
        t0 = time.perf_counter()
        rx = lp.open(2, "127.0.0.1", snk.port)
        await with_timeout(lp.upload(2, Pattern(2).chunks(size)), 600)
        lp.fin(2)
        await with_timeout(rx.when_fin(), 600)
        out["up"] = time.perf_counter() - t0
        out["up_cpu"] = cpu_seconds(pid) - c0
        assert bytes(rx.data) == f"{size} {Pattern(2).digest(size)}\n".encode(), "upload digest differs"
        assert not lp.errors, lp.errors
    finally:
        await lp.close()
        daemon.transport.signalProcess("TERM")
        await with_timeout(daemon.ended.wait(), 60)
    return out


async def main(reactor: Any, args: argparse.Namespace) -> None:
    size = args.size * MiB
    Pattern(1).digest(size)  # precompute, off the clock
    Pattern(2).digest(size)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    print(f"{args.size} MiB each way, payload {args.payload} B, RP = twistd subprocess, loopback")
    for pipes in args.pipes:
        t = await run(reactor, pipes, size, args.payload, args.profile)
        for way in ("down", "up"):
            s = t[way]
            print(
                f"  {pipes} pipe{'s' if pipes > 1 else ' '}  {way:4}  {s:6.2f} s  "
                f"{size / MiB / s:7.1f} MiB/s  {size / 1e6 / s:7.1f} MB/s   RP CPU {t[way + '_cpu']:5.2f} s"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="MiB each way (default 512)")
    parser.add_argument("--pipes", type=int, nargs="+", default=[4, 1], help="pipe counts to run (default 4 1)")
    parser.add_argument("--payload", type=int, default=4096, help="DATA payload bytes, both ways (default 4096)")
    parser.add_argument("--profile", metavar="DIR", help="profile the RP with cProfile into DIR")
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parser.parse_args())))
