"""Tests for ``tm3-redirect`` (:mod:`tm3.lp.redirect`) and :mod:`tm3.lp.origdst`.

The first half needs nothing special: rule building, argument validation and
the command flow against a fake iptables. The second half (``netns`` marker)
runs the real command inside throwaway network namespaces from
:mod:`tests.support.netns`; it never touches the root namespace's iptables.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet import threads
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport

from tests.support.netns import TM3Topology, Topology
from tests.support.processes import python_env
from tests.support.threadserver import ThreadServer
from tm3.lp import origdst, redirect
from tm3.lp.redirect import (
    EXIT_FAILED,
    EXIT_NOT_INSTALLED,
    EXIT_OK,
    EXIT_USAGE,
    Iptables,
    IptablesError,
    RedirectConfig,
    State,
    UsageError,
    build_install_rules,
    build_removal_rules,
    classify,
    installed_rules,
    make_config,
)

RP = "10.77.1.1"


def always(_: str) -> bool:
    return True


def config(*ports: int, to_port: int = 6001, iface: str = "eth0") -> RedirectConfig:
    return make_config(RP, iface, ports or (8080,), to_port, exists=always)


# --- rule building -------------------------------------------------------------


def test_install_rules_exact() -> None:
    assert build_install_rules(config(80, 8080)) == [
        ["-t", "nat", "-N", "TM3_OUTPUT"],
        ["-t", "nat", "-A", "TM3_OUTPUT", "-d", "10.77.1.1/32", "-j", "RETURN"],
        ["-t", "nat", "-A", "TM3_OUTPUT", "-d", "127.0.0.0/8", "-j", "RETURN"],
        ["-t", "nat", "-A", "TM3_OUTPUT", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN"],
        ["-t", "nat", "-A", "TM3_OUTPUT", "-p", "tcp", "--dport", "6001", "-j", "RETURN"],
        ["-t", "nat", "-A", "TM3_OUTPUT", "-p", "tcp", "--dport", "80", "-j", "REDIRECT", "--to-ports", "6001"],
        ["-t", "nat", "-A", "TM3_OUTPUT", "-p", "tcp", "--dport", "8080", "-j", "REDIRECT", "--to-ports", "6001"],
        ["-t", "nat", "-N", "TM3_PREROUTING"],
        ["-t", "nat", "-A", "TM3_PREROUTING", "-d", "10.77.1.1/32", "-j", "RETURN"],
        ["-t", "nat", "-A", "TM3_PREROUTING", "-d", "127.0.0.0/8", "-j", "RETURN"],
        ["-t", "nat", "-A", "TM3_PREROUTING", "-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN"],
        ["-t", "nat", "-A", "TM3_PREROUTING", "-p", "tcp", "--dport", "6001", "-j", "RETURN"],
        ["-t", "nat", "-A", "TM3_PREROUTING", "-p", "tcp", "--dport", "80", "-j", "REDIRECT", "--to-ports", "6001"],
        ["-t", "nat", "-A", "TM3_PREROUTING", "-p", "tcp", "--dport", "8080", "-j", "REDIRECT", "--to-ports", "6001"],
        ["-t", "nat", "-I", "OUTPUT", "1", "-p", "tcp", "-j", "TM3_OUTPUT"],
        ["-t", "nat", "-I", "PREROUTING", "1", "-i", "eth0", "-p", "tcp", "-j", "TM3_PREROUTING"],
    ]


def test_install_rules_jumps_come_last() -> None:
    # A jump into a chain still being filled would expose a half-built set.
    rules = build_install_rules(config(1, 2, 3))
    jumps = [i for i, r in enumerate(rules) if r[2] == "-I"]
    assert jumps == [len(rules) - 2, len(rules) - 1]


def test_to_port_is_used_everywhere() -> None:
    rules = build_install_rules(config(443, to_port=7000))
    assert ["--to-ports", "7000"] == rules[5][-2:]
    assert not any("6001" in r for r in rules)


LISTING = """\
-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N DOCKER
-N TM3_OUTPUT
-N TM3_PREROUTING
-A PREROUTING -i wlan0 -p tcp -j TM3_PREROUTING
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A OUTPUT -p tcp -j TM3_OUTPUT
-A OUTPUT -m comment --comment "not ours: TM3_OUTPUT in a comment" -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
-A TM3_OUTPUT -d 10.77.1.1/32 -j RETURN
-A TM3_OUTPUT -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 6001
-A TM3_PREROUTING -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 6001
"""


def test_removal_rules_from_listing() -> None:
    # The jump installed for another interface (wlan0) is found too, and the
    # foreign rules (DOCKER, MASQUERADE, a comment naming our chain) are not.
    assert build_removal_rules(LISTING) == [
        ["-t", "nat", "-D", "PREROUTING", "-i", "wlan0", "-p", "tcp", "-j", "TM3_PREROUTING"],
        ["-t", "nat", "-D", "OUTPUT", "-p", "tcp", "-j", "TM3_OUTPUT"],
        ["-t", "nat", "-F", "TM3_OUTPUT"],
        ["-t", "nat", "-F", "TM3_PREROUTING"],
        ["-t", "nat", "-X", "TM3_OUTPUT"],
        ["-t", "nat", "-X", "TM3_PREROUTING"],
    ]


def test_removal_rules_nothing_installed() -> None:
    assert build_removal_rules("-P OUTPUT ACCEPT\n-N DOCKER\n-A OUTPUT -j DOCKER\n") == []


def test_installed_rules_and_classify() -> None:
    ours = installed_rules(LISTING)
    assert ours == [
        "-N TM3_OUTPUT",
        "-N TM3_PREROUTING",
        "-A PREROUTING -i wlan0 -p tcp -j TM3_PREROUTING",
        "-A OUTPUT -p tcp -j TM3_OUTPUT",
        "-A TM3_OUTPUT -d 10.77.1.1/32 -j RETURN",
        "-A TM3_OUTPUT -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 6001",
        "-A TM3_PREROUTING -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 6001",
    ]
    assert classify(LISTING) is State.INSTALLED
    assert classify("-P OUTPUT ACCEPT\n") is State.ABSENT
    assert classify("-N TM3_OUTPUT\n-A OUTPUT -p tcp -j TM3_OUTPUT\n") is State.PARTIAL
    assert classify("-N TM3_OUTPUT\n-N TM3_PREROUTING\n") is State.PARTIAL


# --- argument validation -------------------------------------------------------


def test_make_config_valid() -> None:
    c = make_config("192.0.2.7", "eth0", ["80", "443", "80"], "6001", exists=always)
    assert c == RedirectConfig(ipaddress.IPv4Address("192.0.2.7"), "eth0", (80, 443), 6001)


@pytest.mark.parametrize(
    ("rp_ip", "iface", "ports", "to_port", "message"),
    [
        ("10.0.0", "eth0", ["80"], "6001", "not an IPv4 address"),
        ("::1", "eth0", ["80"], "6001", "not an IPv4 address"),
        ("rp.example", "eth0", ["80"], "6001", "not an IPv4 address"),
        ("0.0.0.0", "eth0", ["80"], "6001", "not a unicast address"),
        ("224.0.0.1", "eth0", ["80"], "6001", "not a unicast address"),
        ("10.0.0.1", "eth0", ["0"], "6001", "PORT 0 is out of range"),
        ("10.0.0.1", "eth0", ["65536"], "6001", "PORT 65536 is out of range"),
        ("10.0.0.1", "eth0", ["http"], "6001", "PORT 'http' is not a number"),
        ("10.0.0.1", "eth0", ["80"], "70000", "--to-port 70000 is out of range"),
        ("10.0.0.1", "eth0", ["80", "6001"], "6001", "proxy's own port"),
        ("10.0.0.1", "eth0", [], "6001", "at least one PORT"),
        ("10.0.0.1", "a-very-long-interface-name", ["80"], "6001", "not a valid interface"),
        ("10.0.0.1", "../eth0", ["80"], "6001", "not a valid interface"),
    ],
)
def test_make_config_rejects(rp_ip: str, iface: str, ports: list[str], to_port: str, message: str) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        make_config(rp_ip, iface, ports, to_port, exists=always)


def test_make_config_missing_interface() -> None:
    with pytest.raises(UsageError, match="IFACE 'eth9' does not exist"):
        make_config("10.0.0.1", "eth9", ["80"], exists=lambda _: False)


def test_interface_exists() -> None:
    assert redirect.interface_exists("lo")
    assert not redirect.interface_exists("tm3nosuch0")


# --- the command flow, against a fake iptables ---------------------------------


class FakeIptables(Iptables):
    """A tiny model of one nat table: enough to replay what the runner does."""

    BUILTIN = ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")

    def __init__(self, fail_when: Callable[[Sequence[str]], bool] = lambda _: False) -> None:
        super().__init__("/nonexistent/iptables")
        self.chains: dict[str, list[str]] = {c: [] for c in self.BUILTIN}
        self.commands: list[list[str]] = []
        self.fail_when = fail_when

    def run(self, args: Sequence[str]) -> str:
        args = list(args)
        self.commands.append(args)
        assert args[:2] == ["-t", "nat"]
        if self.fail_when(args):
            raise IptablesError(f"`iptables {' '.join(args)}` failed: simulated")
        op, rest = args[2], args[3:]
        if op == "-S":
            return self.listing_text()
        chain = rest[0]
        if op == "-N":
            assert chain not in self.chains
            self.chains[chain] = []
        elif op == "-A":
            self.chains[chain].append(" ".join(rest[1:]))
        elif op == "-I":
            self.chains[chain].insert(int(rest[1]) - 1, " ".join(rest[2:]))
        elif op == "-D":
            self.chains[chain].remove(" ".join(rest[1:]))
        elif op == "-F":
            self.chains[chain].clear()
        elif op == "-X":
            assert not self.chains[chain]
            assert not any(chain in r.split() for rs in self.chains.values() for r in rs)
            del self.chains[chain]
        else:
            raise AssertionError(f"unexpected {args}")
        return ""

    def listing_text(self) -> str:
        lines = [f"-P {c} ACCEPT" for c in self.BUILTIN]
        lines += [f"-N {c}" for c in self.chains if c not in self.BUILTIN]
        lines += [f"-A {c} {r}" for c, rs in self.chains.items() for r in rs]
        return "\n".join(lines) + "\n"


def test_install_twice_replaces_and_remove_is_exact() -> None:
    fake = FakeIptables()
    fake.chains["OUTPUT"].append("-j SOMEONE_ELSE")
    before = fake.listing_text()
    assert redirect.install(fake, config(80)) is False
    assert classify(fake.listing_text()) is State.INSTALLED
    assert redirect.install(fake, config(80, 443, iface="wlan0")) is True
    assert fake.chains["OUTPUT"] == ["-p tcp -j TM3_OUTPUT", "-j SOMEONE_ELSE"]
    assert fake.chains["PREROUTING"] == ["-i wlan0 -p tcp -j TM3_PREROUTING"]
    assert len(fake.chains["TM3_OUTPUT"]) == 4 + 2
    assert redirect.remove(fake) > 0
    assert fake.listing_text() == before
    assert redirect.remove(fake) == 0


def test_failed_install_rolls_back() -> None:
    fake = FakeIptables(fail_when=lambda a: "REDIRECT" in a and "TM3_PREROUTING" in a)
    before = fake.listing_text()
    with pytest.raises(IptablesError, match="simulated"):
        redirect.install(fake, config(80))
    assert fake.listing_text() == before


# --- main(): environment checks in-process (nothing reaches iptables) ----------


def test_help_mentions_ip_forward(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        redirect.main(["on", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "net.ipv4.ip_forward=1" in out
    assert "--to-port" in out


def test_main_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert redirect.main(["on", "10.0.0.256", "lo", "80"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("tm3-redirect: error: RP_IP '10.0.0.256' is not an IPv4 address")


def test_main_not_root(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for argv in (["on", "10.0.0.1", "lo", "80"], ["off"], ["status"]):
        assert redirect.main(argv) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "must be run as root" in err


def test_main_missing_iptables(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", str(tmp_path))
    for argv in (["on", "10.0.0.1", "lo", "80"], ["off"], ["status"]):
        assert redirect.main(argv) == EXIT_USAGE
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert "iptables not found on PATH" in err


# --- origdst without redirection -----------------------------------------------


def test_parse_sockaddr_in() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080)
    raw += socket.inet_aton("10.77.2.2") + bytes(8)
    assert origdst.parse_sockaddr_in(raw) == ("10.77.2.2", 8080)
    with pytest.raises(ValueError, match="not an AF_INET"):
        origdst.parse_sockaddr_in(bytes(16))
    with pytest.raises(ValueError, match="at least 8 bytes"):
        origdst.parse_sockaddr_in(b"\x02\x00")


@contextmanager
def loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        try:
            yield client, accepted
        finally:
            client.close()
            accepted.close()


def test_original_destination_not_redirected() -> None:
    with loopback_pair() as (_, accepted):
        with pytest.raises(origdst.NotRedirectedError) as info:
            origdst.original_destination(accepted)
        assert isinstance(info.value, OSError)
        assert "not redirected" in str(info.value)
        fd = accepted.fileno()
        with pytest.raises(origdst.NotRedirectedError):
            origdst.original_destination(fd)
        # The descriptor form must not close the caller's descriptor.
        os.fstat(fd)
        assert accepted.fileno() == fd


def test_original_destination_ipv6_socket() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        with pytest.raises(ValueError, match="IPv4 only"):
            origdst.original_destination(s)


def test_original_destination_of_needs_a_real_transport() -> None:
    with pytest.raises(TypeError, match="ISystemHandle"):
        origdst.original_destination_of(StringTransport())  # type: ignore[no-untyped-call]


# --- real rules inside network namespaces --------------------------------------


@contextmanager
def serving(sock: socket.socket, respond: Callable[[socket.socket], None]) -> Iterator[None]:
    server = ThreadServer(sock, respond)
    try:
        yield
    finally:
        server.close()


def report_original_destination(conn: socket.socket) -> None:
    """The stand-in for the LP's transparent listener."""
    try:
        ip, port = origdst.original_destination(conn)
        conn.sendall(f"{ip}:{port}\n".encode())
    except origdst.NotRedirectedError:
        conn.sendall(b"NOT-REDIRECTED\n")


def greeter(name: str) -> Callable[[socket.socket], None]:
    def respond(conn: socket.socket) -> None:
        conn.sendall(f"{name}\n".encode())

    return respond


def ask(host_connect: Callable[[tuple[str, int]], socket.socket], address: tuple[str, int]) -> str:
    """Connect, read the one-line answer."""
    with host_connect(address) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
    return data.decode().strip()


def tm3_redirect(
    t: TM3Topology | Topology, host_name: str, *args: str, path: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tm3.lp.redirect ARGS`` inside a host, optionally with PATH."""
    topo = t.topology if isinstance(t, TM3Topology) else t
    host = topo.host(host_name)
    env = python_env({"PATH": path}) if path is not None else None
    return host.run(host.python_argv("-m", "tm3.lp.redirect", *args), check=False, env=env)


def nat_listing(topo: Topology, host_name: str) -> str:
    return topo.host(host_name).run(["iptables", "-w", "10", "-t", "nat", "-S"]).stdout


@pytest.mark.netns
def test_redirect_in_namespaces(tm3_topology: TM3Topology) -> None:
    t = tm3_topology
    server_addr = (t.server_ip, 8080)
    with (
        serving(t.client.listen(6001), report_original_destination),
        serving(t.server.listen(8080), greeter("server")),
        serving(t.rp.listen(8080), greeter("rp")),
    ):
        # Before: the client reaches the server directly, through the RP router.
        assert ask(t.client.connect, server_addr) == "server"

        done = tm3_redirect(t, "client", "on", t.rp_ip, t.client_iface, "8080", "--to-port", "6001")
        assert done.returncode == EXIT_OK, done.stderr
        assert "redirecting TCP ports 8080" in done.stdout

        # Redirected: the listener on 6001 sees where the client was going.
        assert ask(t.client.connect, server_addr) == f"{t.server_ip}:8080"
        # The RP's address is exempt: that connection reaches the RP itself.
        assert ask(t.client.connect, (t.rp_ip, 8080)) == "rp"
        # Other ports are untouched: nothing listens on the server's 9090.
        with pytest.raises(ConnectionRefusedError):
            t.client.connect((t.server_ip, 9090))
        # Connecting straight to the proxy port is not a redirect.
        assert ask(t.client.connect, ("127.0.0.1", 6001)) == "NOT-REDIRECTED"

        done = tm3_redirect(t, "client", "status")
        assert done.returncode == EXIT_OK, done.stderr
        assert done.stdout.startswith("tm3-redirect: installed\n")
        assert "-A TM3_OUTPUT -p tcp -m tcp --dport 8080 -j REDIRECT --to-ports 6001" in done.stdout

        # `on` again replaces the set instead of stacking a second one.
        done = tm3_redirect(t, "client", "on", t.rp_ip, t.client_iface, "8080", "8081")
        assert done.returncode == EXIT_OK, done.stderr
        assert "replaced previous rules" in done.stdout
        listing = nat_listing(t.topology, "client")
        assert listing.count("-j TM3_OUTPUT") == 1
        assert listing.count("-j TM3_PREROUTING") == 1
        assert listing.count("-N TM3_") == 2
        assert listing.count("--dport 8080 -j REDIRECT") == 2  # OUTPUT + PREROUTING
        assert ask(t.client.connect, server_addr) == f"{t.server_ip}:8080"

        done = tm3_redirect(t, "client", "off")
        assert done.returncode == EXIT_OK, done.stderr
        assert "rules removed" in done.stdout
        assert "TM3" not in nat_listing(t.topology, "client")
        # Direct connectivity is back.
        assert ask(t.client.connect, server_addr) == "server"

        done = tm3_redirect(t, "client", "off")
        assert (done.returncode, done.stdout) == (EXIT_OK, "tm3-redirect: nothing installed\n")
        done = tm3_redirect(t, "client", "status")
        assert (done.returncode, done.stdout) == (EXIT_NOT_INSTALLED, "tm3-redirect: not installed\n")


@pytest.mark.netns
def test_redirect_forwarded_traffic(topology: Topology) -> None:
    """PREROUTING: a gateway running the LP redirects traffic it forwards for
    hosts behind IFACE, and only for those."""
    lan, gw, far = (topology.add_host(n) for n in ("lan", "gw", "far"))
    inside = topology.link(gw, lan, "10.78.1.0/24")
    outside = topology.link(gw, far, "10.78.2.0/24")
    topology.enable_forwarding(gw)
    topology.set_default_route(lan, inside.address_of(gw))
    topology.set_default_route(far, outside.address_of(gw))
    far_ip, lan_ip = outside.address_of(far), inside.address_of(lan)
    with (
        serving(gw.listen(6001), report_original_destination),
        serving(far.listen(8080), greeter("far")),
        serving(lan.listen(8080), greeter("lan")),
    ):
        done = tm3_redirect(topology, "gw", "on", "10.78.2.99", inside.iface_of(gw), "8080")
        assert done.returncode == EXIT_OK, done.stderr
        assert ask(lan.connect, (far_ip, 8080)) == f"{far_ip}:8080"
        # Arriving on the other interface: forwarded untouched.
        assert ask(far.connect, (lan_ip, 8080)) == "lan"
        # Addressed to the gateway itself: a local service, not transit.
        assert ask(lan.connect, (inside.address_of(gw), 6001)) == "NOT-REDIRECTED"
        assert tm3_redirect(topology, "gw", "off").returncode == EXIT_OK
        assert ask(lan.connect, (far_ip, 8080)) == "far"


@pytest.mark.netns
def test_not_root_subprocess(topology: Topology) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) not found; cannot drop root")
    host = topology.add_host("h")
    for args in (["on", "10.0.0.1", "lo", "80"], ["status"], ["off"]):
        done = host.run(
            [
                setpriv,
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                *host.python_argv("-m", "tm3.lp.redirect", *args),
            ],
            check=False,
        )
        assert done.returncode == EXIT_USAGE, done.stderr
        assert done.stderr.count("\n") == 1
        assert done.stderr.startswith("tm3-redirect: error: must be run as root")


@pytest.mark.netns
def test_missing_iptables_subprocess(topology: Topology, tmp_path: Path) -> None:
    topology.add_host("h")
    for args in (["on", "10.0.0.1", "lo", "80"], ["status"], ["off"]):
        done = tm3_redirect(topology, "h", *args, path=str(tmp_path))
        assert done.returncode == EXIT_USAGE, done.stderr
        assert done.stderr.count("\n") == 1
        assert done.stderr.startswith("tm3-redirect: error: iptables not found on PATH")
    assert "TM3" not in nat_listing(topology, "h")


@pytest.mark.netns
def test_iptables_failure_is_reported_and_rolled_back(topology: Topology, tmp_path: Path) -> None:
    """An iptables that refuses REDIRECT: exit 1, its message, nothing left."""
    topology.add_host("h")
    real = shutil.which("iptables")
    assert real is not None
    fake = tmp_path / "iptables"
    fake.write_text(
        "#!/bin/sh\n"
        'case "$*" in *REDIRECT*) echo "No chain/target/match by that name." >&2; exit 1;; esac\n'
        f'exec {real} "$@"\n'
    )
    fake.chmod(0o755)
    done = tm3_redirect(
        topology, "h", "on", "10.0.0.1", "lo", "80", path=f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    assert done.returncode == EXIT_FAILED
    assert done.stderr.count("\n") == 1
    assert "No chain/target/match by that name." in done.stderr
    assert "TM3" not in nat_listing(topology, "h")


@pytest.mark.netns
@pytest_twisted.ensureDeferred  # type: ignore[untyped-decorator]
async def test_original_destination_of_twisted_transport(tm3_topology: TM3Topology) -> None:
    """What the LP's transparent listener does: a Twisted server protocol asks
    its own transport where the client was going."""
    from twisted.internet import reactor

    t = tm3_topology

    class Report(Protocol):
        def connectionMade(self) -> None:
            assert self.transport is not None
            try:
                ip, port = origdst.original_destination_of(self.transport)
                self.transport.write(f"{ip}:{port}\n".encode())
            except origdst.NotRedirectedError:
                self.transport.write(b"NOT-REDIRECTED\n")
            self.transport.loseConnection()

    # The listening socket is made in the client namespace, then served by
    # the test's reactor, which itself stays in the root namespace.
    listening = t.client.listen(6001)
    # Twisted accepts in a loop until EAGAIN: a blocking socket would hang
    # the reactor in accept(). The flag is shared with the duplicate.
    listening.setblocking(False)
    port = reactor.adoptStreamPort(  # type: ignore[attr-defined]
        listening.fileno(), socket.AF_INET, Factory.forProtocol(Report)
    )
    listening.close()  # adoptStreamPort took a duplicate
    try:
        done = await threads.deferToThread(tm3_redirect, t, "client", "on", t.rp_ip, t.client_iface, "8080")
        assert done.returncode == EXIT_OK, done.stderr
        answer = await threads.deferToThread(ask, t.client.connect, (t.server_ip, 8080))
        assert answer == f"{t.server_ip}:8080"
        answer = await threads.deferToThread(ask, t.client.connect, ("127.0.0.1", 6001))
        assert answer == "NOT-REDIRECTED"
    finally:
        await port.stopListening()
