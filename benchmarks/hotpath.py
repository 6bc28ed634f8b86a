"""Receive-path micro-benchmark: pipe bytes -> decode -> route -> reorder ->
deliver -> socket write, in one process with StringTransports (no network
noise), for in-order and shuffled arrival. Prints messages/s and MB/s.

    .venv/bin/python benchmarks/hotpath.py [--messages N] [--payload BYTES] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

from twisted.internet.testing import MemoryReactorClock, StringTransport

from tm3.core.wire import encode_data
from tm3.lp.role import LocalRole
from tm3.mux.pipes import PipeProtocol
from tm3.mux.session import Session
from tm3.mux.settings import Settings, Stats
from tm3.mux.stream import StreamProtocol


class _Sink(StringTransport):
    """Counts bytes instead of keeping them."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def write(self, data: bytes) -> None:
        self.count += len(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        for d in seq:
            self.count += len(d)


def build(pipes: int) -> tuple[Session, list[PipeProtocol], _Sink]:
    reactor = MemoryReactorClock()
    protos = []
    for _ in range(pipes):
        p = PipeProtocol()
        p.makeConnection(_Sink())
        protos.append(p)
    session = Session(protos, reactor, Settings(), Stats(), LocalRole)
    role = session.role
    assert isinstance(role, LocalRole)
    conn = role.open("127.0.0.1", 80)
    client = _Sink()
    stream = StreamProtocol()
    stream.bind(session, conn)
    stream.makeConnection(client)
    return session, protos, client


def run(messages: int, payload: int, shuffle: bool, pipes: int = 4) -> tuple[float, int]:
    session, protos, client = build(pipes)
    body = bytes(payload)
    msgs = [encode_data(0, seq, body) for seq in range(messages)]
    if shuffle:
        # Realistic disorder: messages spread round robin over pipes, each pipe
        # delivering a read of ~64 KiB at a time, pipes read in random order.
        per_pipe: list[list[bytes]] = [msgs[i::pipes] for i in range(pipes)]
        reads: list[tuple[int, bytes]] = []
        per_read = max(1, 65536 // (payload + 8))
        for i, lst in enumerate(per_pipe):
            for j in range(0, len(lst), per_read):
                reads.append((i, b"".join(lst[j : j + per_read])))
        rng = random.Random(1)
        cursor = [0] * pipes
        by_pipe = [[r for r in reads if r[0] == i] for i in range(pipes)]
        ordered = []
        while any(cursor[i] < len(by_pipe[i]) for i in range(pipes)):
            i = rng.choice([k for k in range(pipes) if cursor[k] < len(by_pipe[k])])
            ordered.append(by_pipe[i][cursor[i]])
            cursor[i] += 1
        reads = ordered
    else:
        per_read = max(1, 65536 // (payload + 8))
        reads = [(0, b"".join(msgs[j : j + per_read])) for j in range(0, len(msgs), per_read)]
    start = time.perf_counter()
    for i, data in reads:
        protos[i].dataReceived(data)
    elapsed = time.perf_counter() - start
    assert client.count == messages * payload, (client.count, messages * payload)
    return elapsed, messages * payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--payload", type=int, default=4096)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    for shuffle in (False, True):
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
        elapsed, nbytes = run(args.messages, args.payload, shuffle)
        if args.profile:
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(8)
        label = "shuffled over 4 pipes" if shuffle else "in order, 1 pipe    "
        print(
            f"{label}: {args.messages / elapsed:,.0f} messages/s, {nbytes / elapsed / 1e6:,.0f} MB/s"
            f" ({args.payload}-byte payloads, {elapsed:.2f} s)"
        )


if __name__ == "__main__":
    main()
