"""Throwaway network-namespace topologies for tests that need real networking.

This module owns building, using and tearing down small networks of Linux
network namespaces ("hosts") joined by veth pairs ("links"): an empty
:class:`Topology`, and the transparent-mode layout as a :class:`TM3Topology`
(:func:`build_tm3_topology`)::

      client 10.77.1.2 --eth0--- eth0 10.77.1.1  rp  10.77.2.1 eth1 ---eth0-- 10.77.2.2 server
      (client, LP, tm3-redirect)   (RP; ip_forward=1, routes between)          (real server)

:func:`netns_unavailable_reason` says why namespaces cannot be made here (not
root, no ``ip``, no ``iptables``, or the kernel refuses a namespace or a veth
pair); the pytest fixtures ``topology`` and ``tm3_topology`` in
``tests/conftest.py`` skip (never fail) then.

Nothing here touches the root namespace's interfaces, routes or iptables:
veth ends are created directly inside their namespaces and every command runs
under ``ip netns exec``. The namespaces are not connected to anything else, so
test traffic cannot leave them. Names carry the pid (``tm3t-<pid>-<n>-<host>``)
so concurrent test runs do not collide.

Tests take the fixtures by name::

    @pytest.mark.netns
    def test_something(tm3_topology: TM3Topology) -> None:
        t = tm3_topology
        t.server.popen(t.server.python_argv("-m", "tm3.tools.testserver", ...))
        ...

and a benchmark builds a topology itself (``benchmarks/loss.py``).
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from attrs import define, field, frozen

from tests.support.processes import REPO_ROOT, python_env

__all__ = [
    "Host",
    "Link",
    "NetnsError",
    "TM3Topology",
    "Topology",
    "build_tm3_topology",
    "netns_unavailable_reason",
]

T = TypeVar("T")

_NETNS_RUN_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_IFNAMSIZ = 16
_HOST_NAME = re.compile(r"^[a-z][a-z0-9_]{0,15}$")

_sequence = itertools.count()
_probe_result: list[str | None] = []


class NetnsError(RuntimeError):
    """A command that builds or tears down a topology failed."""


def _run(argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise NetnsError(
            f"`{' '.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip() or done.stdout.strip()}"
        )
    return done


def netns_unavailable_reason() -> str | None:
    """Why namespaces cannot be used here, or None if they can.

    The answer is probed once (a namespace pair, a veth pair and an iptables
    nat listing, all removed again) and cached for the process.
    """
    if not _probe_result:
        _probe_result.append(_probe())
    return _probe_result[0]


def _probe() -> str | None:
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns, veth, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found on PATH; network namespace tests need it"
    names = [f"tm3t-{os.getpid()}-probe{i}" for i in (0, 1)]
    made: list[str] = []
    try:
        for name in names:
            _run(["ip", "netns", "add", name])
            made.append(name)
        _run(["ip", "link", "add", "p0", "netns", names[0], "type", "veth", "peer", "name", "p1", "netns", names[1]])
        _run(["ip", "netns", "exec", names[0], "iptables", "-w", "10", "-t", "nat", "-S"])
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot build network namespaces here: {e}"
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    return None


def _ip_path() -> str:
    return shutil.which("ip") or "ip"


def _libc_setns() -> Callable[[int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    setns: Callable[[int, int], int] = libc.setns
    return setns


def _call_in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` on a fresh thread that has joined ``netns``.

    setns(CLONE_NEWNET) changes only the calling thread, so a short-lived
    thread keeps the rest of the test process (and the reactor, if any) in
    the root namespace. Sockets keep the namespace they were created in, so
    a socket made here can be used from any thread afterwards.
    """
    outcome: list[Any] = []

    def target() -> None:
        try:
            fd = os.open(_NETNS_RUN_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc_setns()(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome.append((True, fn()))
        except BaseException as e:  # re-raised in the caller's thread
            outcome.append((False, e))

    thread = threading.Thread(target=target, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    result: T = value
    return result


@define(eq=False)
class Host:
    """One network namespace, seen as a machine with interfaces."""

    name: str
    netns: str
    topology: Topology = field(repr=False)
    #: interface name -> address with prefix length, e.g. ``"10.77.1.2/24"``.
    interfaces: dict[str, str] = field(factory=dict)
    _next_iface: Iterator[int] = field(factory=itertools.count, repr=False)

    # -- processes --------------------------------------------------------

    def exec_prefix(self) -> list[str]:
        """The argv prefix that runs a command inside this host.

        ``ip`` is given by absolute path so a test may run the command with
        a PATH of its choosing (e.g. one without iptables).
        """
        return [_ip_path(), "netns", "exec", self.netns]

    def python_argv(self, *args: str) -> list[str]:
        """``[<this venv's python>, *args]``, for :meth:`run`/:meth:`popen`."""
        return [sys.executable, *args]

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside this host and wait; output is captured as text.

        :raises NetnsError: if ``check`` and the command exits non-zero.
        """
        return self.topology.run(self, argv, check=check, timeout=timeout, input=input, env=env)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` inside this host; killed at teardown if still running."""
        return self.topology.popen(self, argv, **kwargs)

    # -- sockets created inside the namespace, used from the test process ---

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on a thread inside this host's namespace; return its result."""
        return _call_in_netns(self.netns, fn)

    def make_socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A new socket living in this host's network namespace."""
        return self.call(lambda: socket.socket(family, type))

    def listen(self, port: int, address: str = "0.0.0.0", backlog: int = 16) -> socket.socket:
        """A TCP socket listening on ``address:port`` inside this host.

        To serve it from the test's reactor (which stays in the root
        namespace): ``s.setblocking(False)`` first (Twisted accepts until
        EAGAIN and would block forever otherwise), then
        ``reactor.adoptStreamPort(s.fileno(), socket.AF_INET, factory)`` and
        ``s.close()`` (Twisted keeps a duplicate).
        """
        sock = self.make_socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def connect(self, address: tuple[str, int], timeout: float = 5) -> socket.socket:
        """A TCP connection from inside this host to ``address``."""
        sock = self.make_socket()
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_for_port(self, port: int, address: str = "127.0.0.1", timeout: float = 10) -> None:
        """Poll until something inside this host accepts on ``address:port``."""
        deadline = time.monotonic() + timeout
        last: OSError | None = None
        while time.monotonic() < deadline:
            try:
                self.connect((address, port), timeout=1).close()
                return
            except OSError as e:
                last = e
                time.sleep(0.05)
        raise TimeoutError(
            f"nothing listening on {address}:{port} in {self.name} after {timeout}s (last error: {last})"
        )

    # -- addressing -------------------------------------------------------

    @property
    def ip(self) -> str:
        """This host's address on its first link (hosts with one link)."""
        if not self.interfaces:
            raise NetnsError(f"host {self.name} has no links")
        return self.interfaces[next(iter(self.interfaces))].split("/")[0]

    def address_towards(self, peer: Host) -> str:
        """This host's address on the link it shares with ``peer``."""
        return self.topology.link_between(self, peer).address_of(self)

    def iface_towards(self, peer: Host) -> str:
        """This host's interface on the link it shares with ``peer``."""
        return self.topology.link_between(self, peer).iface_of(self)

    def allocate_iface(self) -> str:
        return f"eth{next(self._next_iface)}"


@frozen
class Link:
    """A veth pair between two hosts, with one address at each end."""

    a: Host
    b: Host
    a_iface: str
    b_iface: str
    a_ip: str
    b_ip: str
    network: ipaddress.IPv4Network

    def _side(self, host: Host) -> bool:
        if host is self.a:
            return True
        if host is self.b:
            return False
        raise NetnsError(f"host {host.name} is not on link {self.a.name}<->{self.b.name}")

    def address_of(self, host: Host) -> str:
        return self.a_ip if self._side(host) else self.b_ip

    def iface_of(self, host: Host) -> str:
        return self.a_iface if self._side(host) else self.b_iface


class Topology:
    """A set of namespaces and links, removed again by :meth:`close`.

    Also a context manager. Hosts can be given as :class:`Host` or by name.
    """

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"tm3t-{os.getpid()}-{next(_sequence)}"
        self.hosts: dict[str, Host] = {}
        self.links: list[Link] = []
        self._processes: list[subprocess.Popen[str]] = []
        self._cleanups: list[Callable[[], object]] = []
        self._closed = False

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def host(self, host: Host | str) -> Host:
        if isinstance(host, Host):
            return host
        try:
            return self.hosts[host]
        except KeyError:
            raise NetnsError(f"no host named {host!r}") from None

    def add_host(self, name: str) -> Host:
        """Create a namespace with loopback up."""
        if not _HOST_NAME.match(name):
            raise ValueError(f"host name {name!r}: use [a-z][a-z0-9_]*, at most 16")
        if name in self.hosts:
            raise ValueError(f"host {name!r} already exists")
        netns = f"{self.prefix}-{name}"
        _run(["ip", "netns", "add", netns])
        host = Host(name=name, netns=netns, topology=self)
        # Registered before anything else can fail, so close() removes it.
        self.hosts[name] = host
        self.run(host, ["ip", "link", "set", "lo", "up"])
        return host

    def link(
        self,
        a: Host | str,
        b: Host | str,
        subnet: str,
        a_ip: str | None = None,
        b_ip: str | None = None,
    ) -> Link:
        """Join ``a`` and ``b`` with a veth pair on ``subnet`` (e.g. ``10.77.1.0/24``).

        By default ``a`` gets the subnet's first host address (``.1``) and
        ``b`` the second (``.2``). Interfaces are named ``eth0``, ``eth1``...
        per host, in the order links are made.
        """
        ha, hb = self.host(a), self.host(b)
        network = ipaddress.IPv4Network(subnet)
        hosts = network.hosts()
        first, second = str(next(hosts)), str(next(hosts))
        ip_a, ip_b = a_ip or first, b_ip or second
        for ip in (ip_a, ip_b):
            if ipaddress.IPv4Address(ip) not in network:
                raise ValueError(f"{ip} is not in {network}")
        if_a, if_b = ha.allocate_iface(), hb.allocate_iface()
        _run(["ip", "link", "add", if_a, "netns", ha.netns, "type", "veth", "peer", "name", if_b, "netns", hb.netns])
        for host, iface, ip in ((ha, if_a, ip_a), (hb, if_b, ip_b)):
            self.run(host, ["ip", "addr", "add", f"{ip}/{network.prefixlen}", "dev", iface])
            self.run(host, ["ip", "link", "set", iface, "up"])
            host.interfaces[iface] = f"{ip}/{network.prefixlen}"
        link = Link(ha, hb, if_a, if_b, ip_a, ip_b, network)
        self.links.append(link)
        return link

    def link_between(self, a: Host | str, b: Host | str) -> Link:
        ha, hb = self.host(a), self.host(b)
        for link in self.links:
            if {id(link.a), id(link.b)} == {id(ha), id(hb)}:
                return link
        raise NetnsError(f"no link between {ha.name} and {hb.name}")

    def add_route(self, host: Host | str, destination: str, via: str) -> None:
        """``ip route add destination via via`` inside ``host``."""
        self.run(host, ["ip", "route", "add", destination, "via", via])

    def set_default_route(self, host: Host | str, via: str) -> None:
        self.run(host, ["ip", "route", "replace", "default", "via", via])

    def enable_forwarding(self, host: Host | str) -> None:
        """Make ``host`` a router (net.ipv4.ip_forward=1, in its namespace only)."""
        self.run(host, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])

    def run(
        self,
        host: Host | str,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``host``; see :meth:`Host.run`."""
        h = self.host(host)
        full = [*h.exec_prefix(), *argv]
        done = subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            env=dict(env) if env is not None else python_env(),
            cwd=REPO_ROOT,
            check=False,
        )
        if check and done.returncode != 0:
            raise NetnsError(
                f"[{h.name}] `{' '.join(argv)}` failed (exit {done.returncode}): "
                f"{done.stderr.strip() or done.stdout.strip()}"
            )
        return done

    def popen(self, host: Host | str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` inside ``host``; killed at :meth:`close` if still running.

        Defaults: text mode, stdout and stderr piped, the checkout on
        PYTHONPATH, cwd the checkout. Any :class:`subprocess.Popen` keyword
        overrides them. The process gets its own session so teardown can stop
        it together with any children it started.
        """
        h = self.host(host)
        kwargs.setdefault("text", True)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("env", python_env())
        kwargs.setdefault("cwd", REPO_ROOT)
        kwargs["start_new_session"] = True
        # `ip netns exec` execs the command in place, so this pid is the
        # command's own.
        proc: subprocess.Popen[str] = subprocess.Popen([*h.exec_prefix(), *argv], **kwargs)
        self._processes.append(proc)
        return proc

    def add_cleanup(self, fn: Callable[[], object]) -> None:
        """Call ``fn`` first thing in :meth:`close` (last added, first called),
        while the namespaces and processes still exist: for helpers such as
        :class:`tests.support.wan.WanLink` that undo their own setup."""
        self._cleanups.append(fn)

    def close(self) -> None:
        """Run the cleanups, stop started processes, then delete every
        namespace (and so every veth and iptables rule inside them). Safe to
        call twice."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        while self._cleanups:
            try:
                self._cleanups.pop()()
            except Exception as e:  # the namespaces must go whatever failed
                errors.append(f"cleanup {e!r}")
        for proc in self._processes:
            _stop(proc)
        for host in self.hosts.values():
            # Anything still inside was started by this test (e.g. a daemon
            # a popen'd command forked off); the namespace would outlive
            # `ip netns del` while it runs.
            pids = subprocess.run(
                ["ip", "netns", "pids", host.netns],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            done = subprocess.run(
                ["ip", "netns", "del", host.netns],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0 and (_NETNS_RUN_DIR / host.netns).exists():
                errors.append(f"{host.netns}: {done.stderr.strip()}")
        if errors:
            raise NetnsError("could not close the topology cleanly: " + "; ".join(errors))


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError as e:
                if e.errno != errno.EBADF:
                    raise


@frozen
class TM3Topology:
    """The transparent-mode layout; see the module docstring for the picture."""

    topology: Topology
    client: Host
    rp: Host
    server: Host
    #: The client's address (10.77.1.2).
    client_ip: str
    #: The client's interface towards the RP (``eth0``).
    client_iface: str
    #: The RP's address as the client / LP sees it (10.77.1.1): RP_IP.
    rp_ip: str
    #: The RP's address on the server side (10.77.2.1).
    rp_server_side_ip: str
    #: The real server's address (10.77.2.2).
    server_ip: str


def build_tm3_topology(topo: Topology, server_name: str = "server") -> TM3Topology:
    """Add client, rp and server hosts to ``topo`` as in the module docstring.

    The client's and server's default routes point at the RP, which forwards,
    so with no redirect rules the client reaches the server directly.
    ``server_name`` names the server's host (and namespace) only; the
    attribute stays ``server``.
    """
    client = topo.add_host("client")
    rp = topo.add_host("rp")
    server = topo.add_host(server_name)
    to_client = topo.link(rp, client, "10.77.1.0/24")
    to_server = topo.link(rp, server, "10.77.2.0/24")
    topo.enable_forwarding(rp)
    topo.set_default_route(client, to_client.address_of(rp))
    topo.set_default_route(server, to_server.address_of(rp))
    return TM3Topology(
        topology=topo,
        client=client,
        rp=rp,
        server=server,
        client_ip=to_client.address_of(client),
        client_iface=to_client.iface_of(client),
        rp_ip=to_client.address_of(rp),
        rp_server_side_ip=to_server.address_of(rp),
        server_ip=to_server.address_of(server),
    )
