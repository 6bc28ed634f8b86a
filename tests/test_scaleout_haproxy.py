"""Scale-out: several RP hosts behind HAProxy (``--listen haproxy:...``,
tm3/proxyheader.py; ``contrib/haproxy/haproxy.cfg``).

The first half runs in the test's reactor on loopback: a relay stands in for
HAProxy and starts each connection to the RP with a PROXY header naming an
address of the test's choosing, so one machine can play many LPs. The second
half (``netns``, root) runs the sample HAProxy configuration for real in
front of two RP hosts, with four LP hosts.
"""

from __future__ import annotations

import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ISSLTransport
from twisted.protocols import portforward

from tests.support import servers
from tests.support.certs import PKI, make_pki
from tests.support.env import Env
from tests.support.netns import Topology
from tests.support.pattern import Pattern
from tests.support.ports import HOST
from tests.support.processes import wait_for
from tests.support.scaleout import SAMPLE, ScaleOut
from tests.support.waiting import reactor, sleep, until
from tm3.proxyheader import BadHeader, parse_header

HAPROXY = shutil.which("haproxy")
KEY = b"tm3 test key: 32 bytes and more.."

pytestmark = [
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning"),
]


def v1_header(source: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {source} 10.0.0.1 {port} 6000\r\n".encode()


def v2_header(source: str | None, port: int = 40000) -> bytes:
    """A PROXY v2 header from ``source``; None: a LOCAL one (a health check)."""
    if source is None:
        return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    body = socket.inet_aton(source) + socket.inet_aton("10.0.0.1") + struct.pack("!HH", port, 6000)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


# -- the header parser ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "source", "local"),
    [
        (v1_header("10.61.1.2", 5555) + b"rest", IPv4Address("TCP", "10.61.1.2", 5555), False),
        (v2_header("10.61.1.2", 5555) + b"rest", IPv4Address("TCP", "10.61.1.2", 5555), False),
        (b"PROXY TCP6 2001:db8::1 2001:db8::2 5555 6000\r\n", IPv6Address("TCP", "2001:db8::1", 5555), False),
        (b"PROXY UNKNOWN\r\n", None, False),
        (v2_header(None), None, True),
    ],
    ids=["v1", "v2", "v1-tcp6", "v1-unknown", "v2-local"],
)
def test_headers_parse_in_any_pieces(data: bytes, source: Any, local: bool) -> None:
    header = data.removesuffix(b"rest")
    for cut in range(len(header)):
        assert parse_header(data[:cut]) is None, cut  # incomplete, never wrong
    assert parse_header(data) == (source, local, len(header))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x16\x03\x01\x02\x00", "not a PROXY header"),  # a TLS ClientHello: no balancer in front
        (b"GET / HTTP/1.1\r\n", "not a PROXY header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 9x 80\r\n", "malformed PROXY header: a malformed address or port"),
        (b"PROXY TCP4 evil 5.6.7.8 1 80\r\n", "source 'evil' is not an IP address"),
        (b"PROXY TCP9 1.2.3.4 5.6.7.8 1 80\r\n", "an unknown protocol or address family"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 80\r\n", "source port 99999 is not in 0..65535"),
        (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 80\r\n", "source '1.2.3.4' is not of the family the header says"),
        (b"PROXY " + b"1" * 120, "longer than 107 bytes"),
        (v2_header("10.0.0.9")[:12] + b"\x31\x11\x00\x0c" + b"\0" * 12, "PROXY v2 version 3"),
        (v2_header("10.0.0.9")[:12] + b"\x21\x11\x00\x02ab", "addresses missing or cut short"),
    ],
)
def test_bad_headers_say_what_is_wrong(data: bytes, why: str) -> None:
    with pytest.raises(BadHeader, match=re.escape(why)):
        parse_header(data)


# -- through a relay that writes the header (in the test's reactor) ----------------------


class HeaderRelay(portforward.ProxyFactory):
    """A TCP relay to the RP that starts each connection with a PROXY header
    claiming ``source``: HAProxy with ``send-proxy`` (v1) or ``send-proxy-v2``."""

    def __init__(self, port: int, source: str, version: int = 2) -> None:
        super().__init__(HOST, port)
        header = v2_header if version == 2 else v1_header

        class Client(portforward.ProxyClient):
            def connectionMade(self) -> None:
                assert self.transport is not None
                self.transport.write(header(source, 40000 + self.peer.transport.getPeer().port % 20000))
                super().connectionMade()

        class ClientFactory(portforward.ProxyClientFactory):
            protocol = Client
            noisy = False

        class Server(portforward.ProxyServer):
            clientProtocolFactory = ClientFactory

        self.protocol = Server
        self.noisy = False


def relay(env: Env, rp_port: int, source: str, version: int = 2) -> int:
    port = reactor().listenTCP(0, HeaderRelay(rp_port, source, version), interface=HOST)
    env.ports.append(port)
    return int(port.getHost().port)


def rp_sessions(rp: Any) -> dict[str, Any]:
    return dict(rp.service.multiplexer.sessions.by_key)


@pytest_twisted.ensureDeferred
async def test_v1_sets_are_grouped_by_the_address_in_the_header(env: Env) -> None:
    """Two v1 LPs behind one "HAProxy" (both reach the RP from 127.0.0.1):
    each gets its own session, keyed and named by the address its header
    claims, and --allow-from judges that address, not the relay's."""
    srv = await env.server(servers.echo(env.reactor))
    rp = await env.rp(2, "--listen", f"haproxy:tcp:0:interface={HOST}", "--allow-from", "10.61.0.0/16")
    lps = []
    for source, version in (("10.61.1.2", 1), ("10.61.2.2", 2)):
        lps.append(await env.lp(rp.port, 2, [srv.port], remote=f"{HOST}:{relay(env, rp.port, source, version)}"))
    await until(lambda: len(rp_sessions(rp)) == 2, 5, "both sessions on the RP")
    assert set(rp_sessions(rp)) == {"10.61.1.2", "10.61.2.2"}
    for key, session in rp_sessions(rp).items():
        assert [p.peer_host for p in session.pipes.pipes] == [key, key]
        assert all(p.name.startswith(f"pipe {key}:") for p in session.pipes.pipes)
    for n, lp in enumerate(lps):
        await env.echo_round_trip(lp, "forward", srv.port, Pattern(n).bytes(300_000))
    assert "session 1 up (v1): 2 pipes from pipe 10.61.1.2:" in env.logged()
    # Keepalive and TCP_INFO (metrics, the scheduler) reach the socket under the header reader.
    pipe = rp_sessions(rp)["10.61.1.2"].pipes.pipes[0]
    sock = pipe.socket()
    assert sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    # An address outside --allow-from is refused, though the relay's 127.0.0.1 is the same.
    stranger = await env.lp(rp.port, 2, [srv.port], wait=False, remote=f"{HOST}:{relay(env, rp.port, '10.99.0.7')}")
    await until(lambda: "pipe from 10.99.0.7 refused: not in --allow-from" in env.logged(), 5, "the refusal")
    assert stranger.session is None and len(rp_sessions(rp)) == 2


@pytest_twisted.ensureDeferred
async def test_tls_pipes_behind_the_header(env: Env, tmp_path: Path) -> None:
    """``haproxy:tls:...``: HAProxy passes TLS through, its header in clear
    first; the RP reads the header, then runs TLS, and the pipes are TLS
    pipes from the header's address."""
    pki: PKI = make_pki(tmp_path / "pki")
    g = pki.good
    key_file = tmp_path / "tm3.key"
    key_file.write_bytes(KEY)
    srv = await env.server(servers.echo(env.reactor))
    listen = f"haproxy:tls:0:interface={HOST}:privateKey={g.server.key}:certificate={g.server.cert}:caCerts={g.ca}"
    rp = await env.rp(3, "--listen", listen, "--key-file", str(key_file))
    port = relay(env, rp.port, "10.61.3.2")
    remote = f"tls:{HOST}:{port}:trustRoots={g.trust_dir}:certificate={g.client.cert}:privateKey={g.client.key}"
    lp = await env.lp(rp.port, 3, [srv.port], remote=remote, extra=["--key-file", str(key_file)])
    await env.echo_round_trip(lp, "forward", srv.port, Pattern(7).bytes(1_000_000))
    (session,) = rp_sessions(rp).values()
    assert session.terms.version == 2
    for pipe in session.pipes.pipes:
        assert ISSLTransport.providedBy(pipe.transport)
        assert pipe.peer_host == "10.61.3.2"


@pytest_twisted.ensureDeferred
async def test_a_bad_header_is_one_line_and_a_health_check_none(env: Env) -> None:
    """Without a valid header a connection is closed with one warning line
    (no traceback: env's teardown fails on any logged failure); HAProxy's
    health check (a LOCAL header) is closed without a pipe or a word."""
    rp = await env.rp(2, "--listen", f"haproxy:tcp:0:interface={HOST}")
    for data in (b"PROXY TCP4 1.2.3.4 5.6.7.8 9x 80\r\n", b"\x16\x03\x01\x02\x00hello", v2_header(None)):
        sock = socket.create_connection((HOST, rp.port))
        sock.sendall(data)
        sock.setblocking(False)
        client = sock

        def closed(s: socket.socket = client) -> bool:
            try:
                return s.recv(100) == b""
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True

        await until(closed, 5, "the RP to close the connection")
        sock.close()
    lines = [line for line in env.logged().splitlines() if "closed:" in line and "connection from" in line]
    assert len(lines) == 2, lines
    assert "malformed PROXY header: a malformed address or port (first bytes b'PROXY TCP4 1.2.3'" in lines[0]
    assert "not a PROXY header (first bytes b'\\x16\\x03\\x01\\x02\\x00hello')" in lines[1]
    await sleep(0.1)
    assert rp.service.pipe_factory.admission.greeting == {} and rp.stats.sessions == 0


async def test_connections_waiting_for_their_header_are_bounded(env: Env) -> None:
    """Each connection waiting for its header holds a descriptor for up to
    10 s: past MAX_WAITING more are closed at accept, with one line."""
    rp = await env.rp(2, "--listen", f"haproxy:tcp:0:interface={HOST}")
    factory = rp.service.listener.port.factory
    factory.max_waiting = 3
    socks = [socket.create_connection((HOST, rp.port)) for _ in range(4)]
    try:
        await until(lambda: "3 connections already wait for their PROXY header" in env.logged(), 5, "the line")
        assert factory.waiting == 3
    finally:
        for sock in socks:
            sock.close()
    await until(lambda: factory.waiting == 0, 5, "the waits to end")


# -- HAProxy for real, in namespaces ----------------------------------------------------------


def test_the_sample_configuration_parses() -> None:
    if HAPROXY is None:
        pytest.skip("no haproxy binary (scripts/setup installs it)")
    done = subprocess.run([HAPROXY, "-c", "-f", str(SAMPLE)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_readme_shows_the_sample_configuration() -> None:
    """The README's configuration is the tested sample, without its comments."""
    readme = (SAMPLE.parents[2] / "README.md").read_text()
    section = readme.split("### Several RP hosts behind HAProxy", 1)[1]
    shown = section.split("```\n", 2)[1]

    def lines(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]

    assert lines(shown) == lines(SAMPLE.read_text())


@pytest.fixture
def bed(topology: Topology, tmp_path: Path) -> ScaleOut:
    if HAPROXY is None:
        pytest.skip("no haproxy binary (scripts/setup installs it)")
    bed = ScaleOut(topology, tmp_path, lps=4, rps=2)
    topology.add_cleanup(bed.close)
    return bed


def placement(bed: ScaleOut) -> dict[str, list[int]]:
    """For each LP address: the RPs (0, 1) on which a session from it came up."""
    where: dict[str, list[int]] = {}
    for j in range(len(bed.rp_hosts)):
        for _, peers in bed.sessions_up(j):
            assert len(set(peers)) == 1, f"rp{j + 1}: one session's pipes from several addresses: {peers}"
            where.setdefault(peers[0], []).append(j)
    return where


@pytest.mark.netns
def test_lps_spread_over_two_rp_hosts_and_move_when_one_fails(bed: ScaleOut) -> None:
    """Four LP hosts (three v2, one v1) through HAProxy to two RP hosts: every
    LP's pipes land on one RP, named by the LP's own address; both RPs get
    LPs; bytes go through every LP. Then one RP host drops off the network:
    HAProxy's check marks it down and closes its pipes, and its LPs come back
    up on the other RP."""
    bed.start_servers()
    for j in range(2):
        bed.start_rp(j)
    bed.start_haproxy()
    for i in range(4):
        bed.start_lp(i, v1=(i == 3))
    for i in range(4):
        bed.wait_lp_sessions(i)
    lp_ips = [bed.lp_ip(i) for i in range(4)]
    wait_for(lambda: sorted(placement(bed)) == sorted(lp_ips), "a session per LP on the RPs", 10)
    where = placement(bed)
    assert all(len(rps) == 1 for rps in where.values()), where  # no LP split, nor up twice
    assert {rps[0] for rps in where.values()} == {0, 1}, f"balance source put every LP on one RP: {where}"
    versions = {peers[0]: v for j in range(2) for v, peers in bed.sessions_up(j)}
    assert versions == {ip: (1 if ip == lp_ips[3] else 2) for ip in lp_ips}
    counts = [sum(1 for rps in where.values() if rps[0] == j) for j in range(2)]
    for j in range(2):
        m = bed.metrics(j)
        assert (m["tm3_sessions_up"], m["tm3_pipes_up"]) == (counts[j], 3 * counts[j]), m
    for i in range(4):
        out = bed.client(i, 20, 1000, 100_000, parallel=4)
        assert "OK: all 20 responses verified" in out
    for j in range(2):  # each RP carried exactly the connections of its own LPs
        rp = bed.rps[j]
        assert rp is not None
        assert rp.ended() == 4 * counts[j]

    # rp1's host goes off the network (no FIN, no RST: a dead machine).
    failed = where[lp_ips[0]][0]
    moved = [i for i in range(4) if where[lp_ips[i]][0] == failed]
    before = {i: bed.lp_sessions(i) for i in range(4)}
    host = bed.rp_hosts[failed]
    host.run(["ip", "link", "set", host.iface_towards(bed.lb), "down"])
    for i in moved:
        bed.wait_lp_sessions(i, before[i] + 1, timeout=30)
    other = 1 - failed
    wait_for(
        lambda: all(lp_ips[i] in {p[0] for _, p in bed.sessions_up(other)} for i in moved),
        "the moved LPs' sessions on the other RP",
        10,
    )
    assert "is DOWN" in bed.haproxy_log.read_text()
    for i in range(4):
        out = bed.client(i, 10, 1000, 50_000, parallel=2)
        assert "OK: all 10 responses verified" in out
    m = bed.metrics(other)
    assert (m["tm3_sessions_up"], m["tm3_pipes_up"]) == (4, 12), m
