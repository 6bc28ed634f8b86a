"""Name resolution for SOCKS requests: one IPv4 address per name, within a
deadline, without one slow name holding up another.

The pipe protocol carries IPv4 addresses only, so the LP resolves the names
SOCKS clients send. Twisted's ``reactor.resolve`` runs ``getaddrinfo`` on the
reactor's pool of 10 threads, which it shares with everything else, with no
way to give up a lookup: behind 30 names whose server never answers, a name
that resolves at once waited 29 s. Here:

- Every lookup has a deadline (``--resolve-timeout``); past it the client is
  told the name did not resolve, whatever the lookup is still doing.
- Identical names in flight share one lookup (:class:`InFlight`), so a burst
  of connections to one host asks once.
- ``dns`` (the default, :class:`DnsLookup`): ``/etc/hosts`` first, then DNS
  queries from the reactor (``twisted.names``) to the servers in
  ``/etc/resolv.conf`` (re-read when it changes) or ``--dns-server``. No
  threads: a thousand dead names cost a thousand pending UDP queries, and do
  not delay anything else.
- ``system`` (:class:`ThreadLookup`): ``getaddrinfo``, so nsswitch (mDNS,
  NIS, LDAP, resolv.conf's search list) applies as for any program, on the
  resolver's own threads, at most ``--resolver-threads`` at once. A lookup
  cannot be interrupted, so a thread stuck on a dead name stays busy until
  the C library gives up; when all are busy a new name fails at once (reply
  0x01) instead of waiting in a queue behind them.

IPv4 literals and ``localhost`` never reach either (:func:`local_address`).

No cache of our own: like ``getaddrinfo``, caching is left to the host's
stub resolver (systemd-resolved, nscd, dnsmasq), and the sharing of lookups
in flight already collapses bursts.

The pure parts (:class:`InFlight`, :func:`attempt_timeouts`,
:func:`follow_answers`, :func:`local_address`, :func:`parse_dns_server`) do no
I/O; :class:`Resolver` is the thin Twisted glue around them.
"""

from __future__ import annotations

import enum
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from tm3.core.addresses import NotIPv4, ipv4_literal

RESOLVERS = ("dns", "system")
DEFAULT_RESOLVER = "dns"
DEFAULT_RESOLVE_TIMEOUT = 5.0
DEFAULT_RESOLVER_THREADS = 32
DNS_PORT = 53
# CNAMEs followed past the first answer (when a server's answer stops at a
# CNAME whose target it did not include).
MAX_CNAME_QUERIES = 4

RESOLV_CONF = b"/etc/resolv.conf"
HOSTS = b"/etc/hosts"


class ResolveError(Exception):
    """The name did not resolve to an IPv4 address; the message says why."""


class ResolveTimeout(ResolveError):
    """No answer within the deadline of ``seconds``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer in {seconds:g} s")
        self.seconds = seconds


class ResolverBusy(ResolveError):
    """Every lookup slot is taken by names that have not answered yet."""


# -- pure parts ----------------------------------------------------------------------------


def local_address(name: str) -> str | None:
    """The address of a name that needs no lookup: an IPv4 literal (sent as
    a name by some clients) or ``localhost``; ``None`` for any other name.
    A malformed literal (``127.1``) is a :class:`ResolveError`: resolvers
    would read it the ``inet_aton`` way (see :mod:`tm3.core.addresses`)."""
    try:
        literal = ipv4_literal(name)
    except NotIPv4 as e:
        raise ResolveError(str(e)) from None
    if literal is not None:
        return literal
    if normal_name(name) == "localhost":
        return "127.0.0.1"
    return None


def normal_name(name: str) -> str:
    """The form names are compared in: lower case, no root dot."""
    return name.lower().removesuffix(".") or name


def attempt_timeouts(total: float, servers: int = 1) -> tuple[float, ...]:
    """How long each round of queries waits for an answer, so that all
    rounds to all ``servers`` fit in ``total`` seconds: 1 s, then doubling,
    the last round cut to what is left (one round of ``total`` when that is
    under a second). A round asks every server in turn."""
    budget = total / max(servers, 1)
    rounds: list[float] = []
    step = 1.0
    while budget > 1e-9:
        this = min(step, budget)
        rounds.append(this)
        budget -= this
        step *= 2
    return tuple(rounds) or (total,)


def follow_answers(name: str, records: Iterable[tuple[str, str, str]]) -> tuple[str | None, str]:
    """The first IPv4 address of ``name`` in a DNS answer section, given as
    ``(owner, "A" or "CNAME", address or target)`` records, following CNAMEs;
    and the name the chain ended at (to ask again when the answer holds a
    CNAME but not its target's address)."""
    addresses: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for owner, kind, data in records:
        owner = normal_name(owner)
        if kind == "A":
            addresses.setdefault(owner, data)
        elif kind == "CNAME":
            aliases.setdefault(owner, normal_name(data))
    current = normal_name(name)
    seen = {current}
    while current not in addresses and current in aliases:
        current = aliases[current]
        if current in seen:  # a loop: nothing to find
            break
        seen.add(current)
    return addresses.get(current), current


def parse_dns_server(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` (HOST an IPv4 literal: resolving the DNS server's own
    name would need a DNS server) -> ``(host, port)``; ``ValueError`` says
    what is wrong."""
    host, sep, port_text = text.strip().partition(":")
    try:
        address = ipv4_literal(host)
    except NotIPv4 as e:
        raise ValueError(str(e)) from None
    if address is None:
        raise ValueError(f"{host!r} is not an IPv4 address (a DNS server is given by address)")
    if not sep:
        return address, DNS_PORT
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not in 1..65535")
    return address, int(port_text)


class Join(enum.Enum):
    START = "start"  # the first to ask: start a lookup
    SHARE = "share"  # a lookup for this name is under way: wait for it
    FULL = "full"  # no lookup slot is free


W = TypeVar("W")


class InFlight(Generic[W]):
    """The lookups under way, by name, and who waits for each.

    A lookup holds its slot until it ends, even once every waiter has given
    up (a thread in ``getaddrinfo`` cannot be stopped): with a ``capacity``,
    a new name is refused while that many lookups are under way, and a name
    already under way is still shared."""

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = capacity
        self._waiters: dict[str, list[W]] = {}

    def __len__(self) -> int:
        return len(self._waiters)

    def waiting(self, name: str) -> int:
        return len(self._waiters.get(name, ()))

    def join(self, name: str, waiter: W) -> Join:
        waiters = self._waiters.get(name)
        if waiters is not None:
            waiters.append(waiter)
            return Join.SHARE
        if self.capacity is not None and len(self._waiters) >= self.capacity:
            return Join.FULL
        self._waiters[name] = [waiter]
        return Join.START

    def leave(self, name: str, waiter: W) -> None:
        """``waiter`` gave up; the lookup goes on (and keeps its slot)."""
        waiters = self._waiters.get(name)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)

    def settle(self, name: str) -> list[W]:
        """The lookup for ``name`` is over: its slot is free; returns who
        still waits for its result."""
        return self._waiters.pop(name, [])


# -- Twisted glue --------------------------------------------------------------------------


class Lookup(Protocol):
    """One way to look a name up; :class:`Resolver` adds the deadline, the
    sharing and the slots."""

    def lookup(self, name: str) -> Deferred[str]:
        """The first IPv4 address of ``name``; fails with :class:`ResolveError`."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Resolver:
    """Resolves SOCKS names (:meth:`resolve`) with ``lookup``, each caller
    within ``timeout`` seconds; ``capacity``: lookups under way at once
    (more fail with :class:`ResolverBusy`, saying ``busy``)."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        lookup: Lookup,
        timeout: float = DEFAULT_RESOLVE_TIMEOUT,
        capacity: int | None = None,
        busy: str = "",
    ) -> None:
        self.clock = clock
        self.lookup = lookup
        self.timeout = timeout
        self.busy = busy
        self.in_flight: InFlight[Deferred[str]] = InFlight(capacity)
        self._timers: dict[Deferred[str], IDelayedCall] = {}
        # Told when a lookup ends and frees its slot (a DNS lookup's UDP
        # socket: the LP's fd ceiling counts lookups under way).
        self.on_settled: Callable[[], object] | None = None

    def start(self) -> None:
        self.lookup.start()

    def stop(self) -> None:
        self.lookup.stop()

    def resolve(self, name: str) -> Deferred[str]:
        """The first IPv4 address of ``name``. Fails with
        :class:`ResolveTimeout` after ``timeout`` seconds, with
        :class:`ResolverBusy` at once when no slot is free, or with another
        :class:`ResolveError`. Cancelling it only forgets this caller."""
        try:
            address = local_address(name)
        except ResolveError:
            return fail()
        if address is not None:
            return succeed(address)
        key = normal_name(name)
        waiter: Deferred[str] = Deferred(lambda d: self._give_up(key, d))
        joined = self.in_flight.join(key, waiter)
        if joined is Join.FULL:
            return fail(ResolverBusy(self.busy or f"{len(self.in_flight)} lookups are under way"))
        # Before the lookup starts: it may answer at once (/etc/hosts).
        self._timers[waiter] = self.clock.callLater(self.timeout, self._expire, key, waiter)
        if joined is Join.START:
            maybeDeferred(self.lookup.lookup, key).addBoth(self._settled, key)
        return waiter

    def _settled(self, result: str | Failure, key: str) -> None:
        for waiter in self.in_flight.settle(key):
            self._timers.pop(waiter).cancel()
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        if self.on_settled is not None:
            self.on_settled()

    def _expire(self, key: str, waiter: Deferred[str]) -> None:
        del self._timers[waiter]
        self.in_flight.leave(key, waiter)
        waiter.errback(ResolveTimeout(self.timeout))

    def _give_up(self, key: str, waiter: Deferred[str]) -> None:
        timer = self._timers.pop(waiter, None)
        if timer is not None:
            timer.cancel()
        self.in_flight.leave(key, waiter)


def getaddrinfo_ipv4(name: str) -> str:
    """The first IPv4 address ``getaddrinfo`` gives ``name`` (blocking)."""
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ResolveError(e.strerror or str(e)) from None
    except UnicodeError as e:  # a label the idna codec refuses
        raise ResolveError(str(e)) from None
    if not infos:
        raise ResolveError("no IPv4 address")
    return str(infos[0][4][0])


class ThreadLookup:
    """``--resolver system``: a blocking ``function`` (``getaddrinfo``) on a
    thread of its own per lookup. The threads are daemons, so a lookup still
    stuck at exit does not hold the process; :class:`Resolver`'s capacity
    bounds how many run."""

    def __init__(self, reactor: Any, function: Callable[[str], str] = getaddrinfo_ipv4) -> None:
        self.reactor = reactor
        self.function = function

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def lookup(self, name: str) -> Deferred[str]:
        d: Deferred[str] = Deferred()
        call = self.reactor.callFromThread

        def run() -> None:
            try:
                address = self.function(name)
            except BaseException as e:
                call(d.errback, Failure(e))
            else:
                call(d.callback, address)

        threading.Thread(target=run, name=f"tm3 resolve {name}", daemon=True).start()
        return d


def _records(section: Iterable[Any]) -> list[tuple[str, str, str]]:
    from twisted.names import dns

    out = []
    for rr in section:
        if rr.type == dns.A:
            out.append((rr.name.name.decode("ascii", "replace"), "A", rr.payload.dottedQuad()))
        elif rr.type == dns.CNAME:
            out.append(
                (rr.name.name.decode("ascii", "replace"), "CNAME", rr.payload.name.name.decode("ascii", "replace"))
            )
    return out


def _dns_reason(failure: Failure) -> str:
    from twisted.internet.defer import TimeoutError as DeferTimeout
    from twisted.names import error

    if failure.check(error.DomainError, error.AuthoritativeDomainError):
        return "no such name"
    if failure.check(error.DNSServerError):
        return "the DNS server failed (SERVFAIL)"
    if failure.check(error.DNSQueryRefusedError):
        return "the DNS server refused the query"
    if failure.check(DeferTimeout):
        return "no answer from the DNS servers"
    return f"{type(failure.value).__name__}: {failure.value}"


class DnsLookup:
    """``--resolver dns``: ``/etc/hosts``, then A queries (never ANY, which
    ``getHostByName`` would send and RFC 8482 servers answer uselessly) from
    the reactor to ``servers``, or to resolv.conf's name servers (re-read
    when the file changes). A round of queries waits as
    :func:`attempt_timeouts` says, so the queries end with the deadline."""

    def __init__(
        self,
        reactor: Any,
        timeout: float,
        servers: list[tuple[str, int]] | None = None,
        resolv_conf: bytes = RESOLV_CONF,
        hosts_file: bytes = HOSTS,
    ) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.servers = servers
        self.resolv_conf = resolv_conf
        self.hosts_file = hosts_file
        self._client: Any = None
        self._chain: Any = None

    def start(self) -> None:
        pass  # the client is made by the first lookup: an LP without SOCKS names reads nothing, schedules nothing

    def _make(self) -> None:
        from twisted.names import client, hosts, resolve

        # With --dns-server, resolv.conf is not read at all: its servers
        # would otherwise be tried too once those given time out.
        self._client = client.Resolver(
            resolv=None if self.servers else self.resolv_conf, servers=self.servers, reactor=self.reactor
        )
        self._chain = resolve.ResolverChain([hosts.Resolver(self.hosts_file), self._client])

    def stop(self) -> None:
        # client.Resolver re-reads resolv.conf every minute, on a delayed
        # call it offers no way to stop.
        call = getattr(self._client, "_parseCall", None)
        if call is not None and call.active():
            call.cancel()

    def lookup(self, name: str) -> Deferred[str]:
        if self._chain is None:
            self._make()
        client = self._client
        rounds = attempt_timeouts(self.timeout, len(client.servers) + len(client.dynServers))
        return self._ask(name, name, rounds, MAX_CNAME_QUERIES)

    def _ask(self, original: str, name: str, rounds: tuple[float, ...], cnames: int) -> Deferred[str]:
        def answered(result: tuple[list[Any], list[Any], list[Any]]) -> Deferred[str] | str:
            address, last = follow_answers(name, _records(result[0]))
            if address is not None:
                return address
            if last != normal_name(name) and cnames > 0:
                return self._ask(original, last, rounds, cnames - 1)
            raise ResolveError("no IPv4 address" if last == normal_name(original) else f"no IPv4 address for {last}")

        def failed(f: Failure) -> Failure:
            return f if f.check(ResolveError) else Failure(ResolveError(_dns_reason(f)))

        d: Deferred[Any] = self._chain.lookupAddress(name, timeout=rounds)
        return d.addCallbacks(answered, failed)


def make_resolver(
    reactor: Any,
    kind: str = DEFAULT_RESOLVER,
    timeout: float = DEFAULT_RESOLVE_TIMEOUT,
    threads: int = DEFAULT_RESOLVER_THREADS,
    servers: list[tuple[str, int]] | None = None,
) -> Resolver:
    """The LP's resolver as its options describe it."""
    if kind == "system":
        busy = (
            f"all {threads} resolver threads are busy with names that have not answered yet "
            "(--resolver-threads; --resolver dns needs no threads)"
        )
        return Resolver(reactor, ThreadLookup(reactor), timeout, capacity=threads, busy=busy)
    if kind == "dns":
        return Resolver(reactor, DnsLookup(reactor, timeout, servers), timeout)
    raise ValueError(f"unknown resolver {kind!r}, not one of {', '.join(RESOLVERS)}")
