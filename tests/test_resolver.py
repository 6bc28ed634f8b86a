"""The LP's resolver for SOCKS names (tm3/lp/resolver.py): its pure parts,
the deadline and the sharing of lookups on a fake clock, the system mode's
bounded threads with a blocking function standing in for ``getaddrinfo``,
the DNS mode against a real DNS server on loopback, and a real ``twistd
tm3lp`` where one name that resolves at once is not held up by 30 that never
answer.

No test here measures speed: they check outcomes and their order, with
generous bounds."""

from __future__ import annotations

import re
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tests.support import servers
from tests.support.clients import REP_HOST_UNREACHABLE, REP_SUCCEEDED, Client, socks_name
from tests.support.dnsserver import FAST_ADDRESS, DnsServer
from tests.support.env import Env
from tests.support.lp_harness import LP
from tests.support.pattern import Pattern
from tests.support.ports import HOST
from tests.support.processes import REPO_ROOT, TWISTD
from tests.support.waiting import until, within
from tm3.fdlimit import FdCeiling
from tm3.lp.resolver import (
    DnsLookup,
    InFlight,
    Join,
    ResolveError,
    Resolver,
    ResolverBusy,
    ResolveTimeout,
    ThreadLookup,
    attempt_timeouts,
    follow_answers,
    local_address,
    make_resolver,
    parse_dns_server,
)
from tm3.lp.socks import HOST_UNREACHABLE, reply
from tm3.metrics import ProxyCollector

# -- the pure parts -------------------------------------------------------------------------


def test_literals_and_localhost_need_no_lookup() -> None:
    assert local_address("192.0.2.7") == "192.0.2.7"
    assert local_address("localhost") == local_address("LocalHost.") == "127.0.0.1"
    assert local_address("example.com") is None
    assert local_address("localhost.example.com") is None
    with pytest.raises(ResolveError, match="not an IPv4 address"):
        local_address("127.1")  # inet_aton would read 127.0.0.1


def test_in_flight_shares_a_name_and_a_full_table_refuses_new_names() -> None:
    table: InFlight[str] = InFlight(capacity=2)
    assert table.join("a", "w1") is Join.START
    assert table.join("a", "w2") is Join.SHARE
    assert table.join("b", "w3") is Join.START
    assert table.join("c", "w4") is Join.FULL
    assert table.join("a", "w5") is Join.SHARE  # a name under way is shared even when full
    table.leave("a", "w1")
    table.leave("a", "w2")
    table.leave("a", "w5")
    assert table.waiting("a") == 0
    assert table.join("c", "w4") is Join.FULL  # nobody waits, but the lookup still holds its slot
    assert table.settle("a") == []
    assert table.join("c", "w4") is Join.START
    assert table.settle("b") == ["w3"] and len(table) == 1
    unbounded: InFlight[int] = InFlight()
    assert all(unbounded.join(str(i), i) is Join.START for i in range(1000))


def test_attempt_timeouts_fit_the_deadline() -> None:
    assert attempt_timeouts(5) == (1, 2, 2)
    assert attempt_timeouts(2) == (1, 1)
    assert attempt_timeouts(0.5) == (0.5,)
    assert attempt_timeouts(8, servers=2) == (1, 2, 1)  # each round asks both servers
    for total in (0.1, 1, 3, 7.5, 60):
        for n in (1, 2, 3):
            assert abs(sum(attempt_timeouts(total, n)) * n - total) < 1e-6


def test_follow_answers() -> None:
    assert follow_answers("a.test", [("a.test", "A", "192.0.2.1"), ("a.test", "A", "192.0.2.2")]) == (
        "192.0.2.1",
        "a.test",
    )
    chain = [
        ("www.a.test", "CNAME", "cdn.b.test."),
        ("CDN.b.test", "CNAME", "edge.c.test"),
        ("edge.c.test", "A", "192.0.2.9"),
    ]
    assert follow_answers("WWW.a.test.", chain) == ("192.0.2.9", "edge.c.test")
    assert follow_answers("www.a.test", chain[:1]) == (None, "cdn.b.test")  # ask again for the target
    assert follow_answers("a.test", [("other.test", "A", "192.0.2.1")]) == (None, "a.test")
    loop = [("x.test", "CNAME", "y.test"), ("y.test", "CNAME", "x.test")]
    assert follow_answers("x.test", loop)[0] is None


def test_parse_dns_server() -> None:
    assert parse_dns_server("192.0.2.53") == ("192.0.2.53", 53)
    assert parse_dns_server(" 127.0.0.1:5353 ") == ("127.0.0.1", 5353)
    for bad in ("dns.example", "127.1", "127.0.0.1:0", "127.0.0.1:99999", "127.0.0.1:x", "[::1]:53"):
        with pytest.raises(ValueError):
            parse_dns_server(bad)


# -- the deadline and the sharing, on a fake clock ---------------------------------------------


class FakeLookup:
    """Records each lookup; the test answers them."""

    def __init__(self) -> None:
        self.pending: dict[str, Deferred[str]] = {}
        self.asked: list[str] = []

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def lookup(self, name: str) -> Deferred[str]:
        self.asked.append(name)
        d: Deferred[str] = Deferred()
        self.pending[name] = d
        return d


def outcome(d: Deferred[str]) -> Any:
    """What ``d`` fired with (a Failure's exception), or None if it has not;
    consumes the result, so once per Deferred."""
    results: list[Any] = []
    d.addBoth(lambda r: results.append(r.value if isinstance(r, Failure) else r))
    return results[0] if results else None


def test_each_caller_has_its_own_deadline_and_callers_share_a_lookup() -> None:
    clock, lookup = Clock(), FakeLookup()
    resolver = Resolver(clock, lookup, timeout=5)
    first = resolver.resolve("Slow.test")
    clock.advance(3)
    second = resolver.resolve("slow.test.")
    other = resolver.resolve("other.test")
    assert lookup.asked == ["slow.test", "other.test"]  # one lookup per name
    lookup.pending["other.test"].callback("192.0.2.2")
    assert outcome(other) == "192.0.2.2"
    clock.advance(2)
    error = outcome(first)
    assert isinstance(error, ResolveTimeout) and error.seconds == 5
    assert not second.called  # its 5 s run from its own start
    lookup.pending["slow.test"].callback("192.0.2.1")
    assert outcome(second) == "192.0.2.1"
    assert clock.getDelayedCalls() == []


def test_a_cancelled_caller_is_forgotten_and_the_others_still_get_the_answer() -> None:
    clock, lookup = Clock(), FakeLookup()
    resolver = Resolver(clock, lookup, timeout=5)
    gone, staying = resolver.resolve("a.test"), resolver.resolve("a.test")
    gone.cancel()
    assert isinstance(outcome(gone), CancelledError)
    assert len(clock.getDelayedCalls()) == 1
    lookup.pending["a.test"].errback(ResolveError("no such name"))
    assert str(outcome(staying)) == "no such name"
    assert clock.getDelayedCalls() == [] and len(resolver.in_flight) == 0


def test_literals_never_reach_the_lookup() -> None:
    lookup = FakeLookup()
    resolver = Resolver(Clock(), lookup)
    assert outcome(resolver.resolve("localhost")) == "127.0.0.1"
    assert outcome(resolver.resolve("10.0.0.1")) == "10.0.0.1"
    assert isinstance(outcome(resolver.resolve("010.0.0.1")), ResolveError)
    assert lookup.asked == []


def socks_name_request(name: str, port: int = 80) -> bytes:
    raw = name.encode()
    return b"\x05\x01\x00" + b"\x05\x01\x00\x03" + bytes((len(raw),)) + raw + struct.pack("!H", port)


def test_the_socks_client_is_told_why_and_the_metrics_count_it() -> None:
    lp = LP(n=1, mode="socks")
    lp.up()
    lookup = FakeLookup()
    lp.proxy.resolver = Resolver(lp.reactor, lookup, timeout=2)
    slow, slow_transport = lp.accept()
    slow.dataReceived(socks_name_request("slow.test"))
    missing, missing_transport = lp.accept()
    missing.dataReceived(socks_name_request("missing.test"))
    lookup.pending["missing.test"].errback(ResolveError("no such name"))
    assert missing_transport.value() == b"\x05\x00" + reply(HOST_UNREACHABLE)
    lp.reactor.advance(2)
    assert slow_transport.value() == b"\x05\x00" + reply(HOST_UNREACHABLE)
    assert (lp.stats.resolve_timeouts, lp.stats.resolve_failures) == (1, 1)
    assert lp.received() == []  # no SYN for either
    samples = {s.name: s.value for family in ProxyCollector("lp", lp.stats, list).collect() for s in family.samples}
    assert samples["tm3_resolve_timeouts_total"] == samples["tm3_resolve_failures_total"] == 1


def test_lookups_under_way_count_against_the_client_sockets_ceiling() -> None:
    """A DNS lookup holds a UDP socket: with a ceiling of 4 descriptors, two
    clients resolving (2 sockets + 2 lookups) fill it, and the LP stops
    accepting until the lookups end."""
    lp = LP(n=1, mode="socks")
    lp.up()
    lookup = FakeLookup()
    lp.proxy.resolver = Resolver(lp.reactor, lookup, timeout=2)
    lp.proxy.fd_ceiling = FdCeiling(4)
    a, _ = lp.accept()
    a.dataReceived(socks_name_request("a.test"))
    assert lp.accepting
    b, _ = lp.accept()
    b.dataReceived(socks_name_request("b.test"))
    assert not lp.accepting and lp.stats.fd_limit_pauses == 1
    lookup.pending["a.test"].callback("192.0.2.1")  # its socket stays, its lookup is over
    assert not lp.accepting  # 3 in use: not below 95% of 4 yet
    lookup.pending["b.test"].callback("192.0.2.2")
    assert lp.accepting


def test_a_lookup_its_clients_gave_up_on_holds_its_place_until_it_ends() -> None:
    lp = LP(n=1, mode="socks")
    lp.up()
    lookup = FakeLookup()
    lp.proxy.resolver = Resolver(lp.reactor, lookup, timeout=2)
    lp.proxy.fd_ceiling = FdCeiling(3)
    clients = [lp.accept() for _ in range(2)]
    for (client, _), name in zip(clients, ("a.test", "b.test"), strict=True):
        client.dataReceived(socks_name_request(name))
    assert not lp.accepting
    lp.reactor.advance(2)  # both clients get 0x04 and go; both lookups go on
    for client, transport in clients:
        assert transport.value().endswith(reply(HOST_UNREACHABLE))
        LP.closed(client)
    assert lp.proxy.clients == 0 and len(lp.proxy.resolver.in_flight) == 2
    assert not lp.accepting
    lookup.pending["a.test"].errback(ResolveError("no such name"))
    assert lp.accepting


# -- --resolver system: bounded threads, shared lookups -----------------------------------------


class Blocking:
    """A blocking stand-in for getaddrinfo: each name waits for the test."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.release: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def gate(self, name: str) -> threading.Event:
        with self.lock:
            return self.release.setdefault(name, threading.Event())

    def __call__(self, name: str) -> str:
        with self.lock:
            self.calls.append(name)
        if not self.gate(name).wait(30):
            raise ResolveError("the test never released it")
        if name.startswith("bad"):
            raise ResolveError("Name or service not known")
        return "192.0.2.7"

    def release_all(self) -> None:
        with self.lock:
            gates = list(self.release.values())
        for gate in gates:
            gate.set()


@pytest_twisted.ensureDeferred
async def test_system_mode_shares_names_and_a_full_pool_fails_new_names_at_once(env: Env) -> None:
    blocking = Blocking()
    resolver = Resolver(env.reactor, ThreadLookup(env.reactor, blocking), timeout=30, capacity=2, busy="all 2 busy")
    try:
        a1, b = resolver.resolve("a.test"), resolver.resolve("bad.test")
        a2 = resolver.resolve("a.test")  # shares a.test's thread
        full = resolver.resolve("c.test")
        error = outcome(full)  # at once, not queued
        assert isinstance(error, ResolverBusy) and str(error) == "all 2 busy"
        await until(lambda: len(blocking.calls) == 2, 10, "both threads to call the function")
        assert sorted(blocking.calls) == ["a.test", "bad.test"]
        blocking.gate("bad.test").set()
        failure = await within(b.addErrback(lambda f: f.value), 10, "bad.test's failure")
        assert str(failure) == "Name or service not known"
        c = resolver.resolve("c.test")  # a thread is free again
        blocking.gate("a.test").set()
        blocking.gate("c.test").set()
        assert await within(a1, 10, "a.test") == await within(a2, 10, "a.test again") == "192.0.2.7"
        assert await within(c, 10, "c.test") == "192.0.2.7"
        assert blocking.calls.count("a.test") == 1
    finally:
        blocking.release_all()
    await until(lambda: len(resolver.in_flight) == 0, 10, "every lookup to end")


def test_make_resolver_system_is_bounded_and_dns_is_not() -> None:
    clock = Clock()
    system = make_resolver(clock, "system", threads=7)
    assert system.in_flight.capacity == 7 and "--resolver-threads" in system.busy
    assert make_resolver(clock, "dns").in_flight.capacity is None
    with pytest.raises(ValueError):
        make_resolver(clock, "nis")


# -- --resolver dns against a real DNS server on loopback ----------------------------------------


async def dns_server(env: Env) -> DnsServer:
    srv = DnsServer(env.reactor).start()
    env.ports.extend(srv.listening)
    return srv


@pytest_twisted.ensureDeferred
async def test_dns_mode_answers_follows_cnames_and_reads_the_hosts_file(env: Env, tmp_path: Path) -> None:
    srv = await dns_server(env)
    hosts = tmp_path / "hosts"
    hosts.write_text("192.0.2.44 intranet.example  # not in DNS\n")
    lookup = DnsLookup(env.reactor, 2, servers=[(HOST, srv.port)], hosts_file=str(hosts).encode())
    resolver = Resolver(env.reactor, lookup, timeout=2)
    try:
        assert await within(resolver.resolve("fast.test"), 5, "fast.test") == FAST_ADDRESS
        assert await within(resolver.resolve("alias.test"), 5, "alias.test") == FAST_ADDRESS
        assert await within(resolver.resolve("lame.test"), 5, "lame.test") == FAST_ADDRESS  # asks for the target
        assert await within(resolver.resolve("intranet.example"), 5, "a hosts-file name") == "192.0.2.44"
        assert await within(resolver.resolve("localhost"), 5, "localhost") == "127.0.0.1"
        assert "intranet.example" not in srv.names.asked and "localhost" not in srv.names.asked
        missing = await within(resolver.resolve("missing.test").addErrback(lambda f: f.value), 5, "NXDOMAIN")
        assert isinstance(missing, ResolveError) and str(missing) == "no such name"
        dead = await within(resolver.resolve("dead.test").addErrback(lambda f: f.value), 10, "the deadline")
        assert isinstance(dead, ResolveTimeout)
    finally:
        resolver.stop()


# -- a real LP: one fast name behind 30 dead ones -------------------------------------------------

SOCKS_LISTENING = rb"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\) \(SOCKS5\)"


@pytest_twisted.ensureDeferred
async def test_a_name_that_resolves_at_once_is_not_held_up_by_30_that_never_answer(env: Env) -> None:
    srv = await dns_server(env)
    echo = await env.server(servers.echo(env.reactor))
    rp = await env.rp(2)
    lp = env.spawn(
        [
            TWISTD, "-n", "--pidfile=", "tm3lp", "--remote", f"{HOST}:{rp.port}", "--pipes", "2",
            "--socks", f"tcp:0:interface={HOST}", "--dns-server", f"{HOST}:{srv.port}", "--resolve-timeout", "2",
        ],
        {"PYTHONPATH": str(REPO_ROOT)},
    )  # fmt: skip
    socks_port = int((await within(lp.when_output(SOCKS_LISTENING), 30, "the LP to listen")).group(1))
    await within(lp.when_output(rb"session 1 up \(v1\): 2 pipes to the RP"), 30, "the LP's session")

    dead = [await env.connect(socks_port, Client(socks=socks_name(f"dead{i}.test", echo.port))) for i in range(30)]
    await until(lambda: len(set(srv.names.asked)) >= 30, 20, "the DNS server to see all 30 dead names")

    fast = await env.connect(socks_port, Client(socks=socks_name("fast.test", echo.port)))
    assert await within(fast.socks_reply.wait(), 20, "fast.test's reply") == REP_SUCCEEDED
    data = Pattern(3).bytes(50_000)
    fast.write(data)
    await within(fast.when_received(len(data)), 20, "the echo through fast.test")
    assert fast.data == data
    # By order, not by the clock: the fast name was done while every dead one still waited.
    assert not any(c.socks_reply.fired for c in dead), [c.socks_reply.result for c in dead]

    for client in dead:
        assert await within(client.socks_reply.wait(), 20, "a dead name's reply") == REP_HOST_UNREACHABLE
    assert re.search(r"cannot resolve 'dead\d+\.test' in 2 s \(reply 0x04\)", lp.text), lp.text

    # Healthy after: a fast name again, and localhost, which never asks the DNS server.
    for name in ("fast.test", "localhost"):
        again = await env.connect(socks_port, Client(socks=socks_name(name, echo.port)))
        assert await within(again.socks_reply.wait(), 20, f"{name}'s reply") == REP_SUCCEEDED
        again.write(b"still here")
        await within(again.when_received(10), 20, f"the echo through {name}")
    assert "localhost" not in srv.names.asked
    assert not lp.ended.fired and "Traceback" not in lp.text, lp.text
