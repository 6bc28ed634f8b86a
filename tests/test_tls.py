"""TLS pipes: the RP listening on ``tls:`` (tm3/tls.py), the LP dialing
Twisted's client ``tls:``, certificates both ways.

Real sockets on 127.0.0.1, both proxies in-process in the test's reactor
(the ``env`` fixture, which checks at teardown that no socket or delayed
call is left). The certificates are made per module in a temporary
directory (tests/support/certs.py): a CA with server certificates for
127.0.0.1 and for another name and a client certificate, a second,
unrelated CA with its own, and a server certificate issued through an
intermediate.

With ``--key-file`` (v2) an LP uses a set of pipes only once the RP has
answered its hello on every pipe, through TLS; so a refused handshake means
no session at all, and the refusal tests use it. In v1 the LP cannot tell:
it starts a session as soon as its TCP connects are up, and that session
ends when the handshake fails (:func:`test_v1_refused_client_certificate`).
"""

from __future__ import annotations

import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import ISSLTransport, IStreamServerEndpointStringParser
from twisted.plugin import getPlugins
from twisted.protocols import portforward
from twisted.python import usage

from tests.support import servers
from tests.support.certs import OTHER_NAME, PKI, Authority, Pair, make_pki
from tests.support.env import Env
from tests.support.pattern import Pattern
from tests.support.ports import HOST
from tests.support.proxies import LP, RP
from tests.support.waiting import reactor, sleep, until, within
from tm3.rp import tap as rp_tap
from tm3.tls import TLSServerParser, server_from_string

MiB = 1024 * 1024
KEY = b"tm3 test key: 32 bytes and more.."

pytestmark = [
    # Twisted's CertificateOptions hands OpenSSL pyOpenSSL objects (its own
    # ssl: and client tls: do too); pyOpenSSL would rather have cryptography's.
    pytest.mark.filterwarnings("ignore:Passing pyOpenSSL (X509|PKey) objects is deprecated:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "tm3.key"
    path.write_bytes(KEY)
    return str(path)


def listen(server: Pair, ca: Authority | None = None) -> str:
    """The RP's ``--listen``: TLS with ``server``'s certificate; with ``ca``,
    client certificates signed by it are required."""
    spec = f"tls:0:interface={HOST}:privateKey={server.key}:certificate={server.cert}"
    return spec if ca is None else f"{spec}:caCerts={ca.ca}"


def remote(port: int, trust: Authority, client: Pair | None = None) -> str:
    """The LP's ``--remote``: TLS to 127.0.0.1:port, trusting ``trust``'s CA only."""
    spec = f"tls:{HOST}:{port}:trustRoots={trust.trust_dir}"
    return spec if client is None else f"{spec}:certificate={client.cert}:privateKey={client.key}"


async def tls_system(
    env: Env, rp_listen: str, lp_remote: Any, pipes: int = 4, forward: Sequence[int] = (), v2: str | None = None
) -> tuple[RP, LP]:
    """An RP on ``rp_listen`` and an LP dialing ``lp_remote(rp_port)``, both
    with ``--key-file v2`` if given; waits for the LP's session."""
    key = ["--key-file", v2] if v2 else []
    rp = await env.rp(pipes, "--listen", rp_listen, *key)
    lp = await env.lp(rp.port, pipes, forward, extra=key, remote=lp_remote(rp.port))
    return rp, lp


def peer_name(transport: Any) -> str | None:
    """The common name in the certificate the peer presented on ``transport``."""
    cert = transport.getPeerCertificate()
    if cert is None:
        return None
    return str(cert.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def failures(env: Env) -> list[str]:
    """The LP's lines for failed dials (v2) or sessions lost (v1), in order."""
    return re.findall(r"(?:cannot open \d+ pipes?|pipes to the RP lost) .*", env.logged())


async def refused(env: Env, rp: RP, lp: LP, why: str, rp_why: str | None = None) -> None:
    """The LP fails twice, each time with a line that names ``why``, and
    retries with backoff; neither side ever has a session. ``rp_why``: what
    the RP logs for the pipes it lost in their handshakes."""
    await until(lambda: len(failures(env)) >= 2, 10, "two failed dials")
    lines = failures(env)
    assert all(why in line for line in lines), lines
    delays = [float(m) for line in lines for m in re.findall(r"retrying in ([\d.]+) s", line)]
    assert delays[:2] == [0.5, 1.0], lines
    assert lp.stats.sessions == 0 and lp.session is None
    assert rp.stats.sessions == 0 and rp.session is None
    if rp_why is not None:
        admission = rp.service.pipe_factory.admission
        await until(lambda: admission.tls_failed >= 2, 5, "the RP to see both handshakes fail")
        assert f"lost in its TLS handshake: {rp_why}" in env.logged()


# -- bytes through TLS pipes ------------------------------------------------------------


@pytest.mark.parametrize("mutual", [False, True], ids=["server-cert", "mutual"])
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest_twisted.ensureDeferred
async def test_bytes_round_trip_over_tls_pipes(env: Env, pki: PKI, key_file: str, mutual: bool, version: str) -> None:
    """4 MiB out and back through LP and RP over 4 TLS pipes, with and without
    --key-file, with and without client certificates: every byte comes back,
    every pipe on both sides is a TLS transport, and each side sees the
    other's certificate (the RP the LP's only when it asked for one)."""
    g = pki.good
    srv = await env.server(servers.echo(env.reactor))
    rp, lp = await tls_system(
        env,
        listen(g.server, g if mutual else None),
        lambda port: remote(port, g, g.client if mutual else None),
        forward=[srv.port],
        v2=key_file if version == "v2" else None,
    )
    await env.echo_round_trip(lp, "forward", srv.port, Pattern(31).bytes(4 * MiB + 7))
    await env.echo_round_trip(lp, "socks", srv.port, Pattern(32).bytes(1 * MiB + 3))
    assert rp.session.terms.version == lp.session.terms.version == int(version[1])
    assert len(lp.session.pipes.pipes) == len(rp.session.pipes.pipes) == 4
    for pipe in lp.session.pipes.pipes:
        assert ISSLTransport.providedBy(pipe.transport)
        assert peer_name(pipe.transport) == "tm3 rp"
    for pipe in rp.session.pipes.pipes:
        assert ISSLTransport.providedBy(pipe.transport)
        assert peer_name(pipe.transport) == ("tm3 lp" if mutual else None)
    assert lp.stats.protocol_errors == rp.stats.protocol_errors == 0
    # The kernel's RTT (window autotuning) and keepalive reach the TCP socket under TLS.
    for pipe in [*lp.session.pipes.pipes, *rp.session.pipes.pipes]:
        sock = pipe.socket()
        assert sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert pipe.rtt() > 0


class Sniffer(portforward.ProxyFactory):
    """A TCP relay that keeps every byte it passes, both ways."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.seen = bytearray()
        sniffer = self

        class Server(portforward.ProxyServer):
            def dataReceived(self, data: bytes) -> None:
                sniffer.seen += data
                super().dataReceived(data)

        class Client(portforward.ProxyClient):
            def dataReceived(self, data: bytes) -> None:
                sniffer.seen += data
                super().dataReceived(data)

        class ClientFactory(portforward.ProxyClientFactory):
            protocol = Client

        Server.clientProtocolFactory = ClientFactory
        self.protocol = Server


@pytest.mark.parametrize("tls", [False, True], ids=["tcp-control", "tls"])
@pytest_twisted.ensureDeferred
async def test_a_relay_between_lp_and_rp_sees_no_plaintext(env: Env, pki: PKI, tls: bool) -> None:
    """A relay between LP and RP records the pipes' bytes while a
    recognizable text goes through, both ways: over TCP it shows (so the
    relay sees what it should), over TLS it does not, anywhere."""
    g = pki.good
    srv = await env.server(servers.echo(env.reactor))
    rp = await env.rp(2, *(["--listen", listen(g.server, g)] if tls else []))
    sniffer = Sniffer(HOST, rp.port)
    relay = reactor().listenTCP(0, sniffer, interface=HOST)
    env.ports.append(relay)
    relay_port = relay.getHost().port
    lp_remote = remote(relay_port, g, g.client) if tls else f"{HOST}:{relay_port}"
    lp = await env.lp(rp.port, 2, [srv.port], remote=lp_remote)
    marker = b"TM3 PLAINTEXT MARKER "
    await env.echo_round_trip(lp, "forward", srv.port, marker * 20_000)
    seen = bytes(sniffer.seen)
    assert len(seen) > 2 * len(marker) * 20_000
    assert (marker.strip() in seen) == (not tls)


@pytest_twisted.ensureDeferred
async def test_intermediate_ca_sent_with_the_certificate(env: Env, pki: PKI, key_file: str) -> None:
    """A certificate file with its intermediate CA after it: the RP sends the
    chain, and an LP that trusts only the root accepts it."""
    srv = await env.server(servers.echo(env.reactor))
    rp, lp = await tls_system(
        env, listen(pki.chained_server), lambda port: remote(port, pki.good), pipes=1, forward=[srv.port], v2=key_file
    )
    await env.echo_round_trip(lp, "forward", srv.port, b"through the chain")


# -- refusals -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_mutual_tls_refuses_an_lp_without_certificate(env: Env, pki: PKI, key_file: str) -> None:
    g = pki.good
    rp = await env.rp(2, "--listen", listen(g.server, g), "--key-file", key_file)
    lp = await env.lp(rp.port, 2, wait=False, extra=["--key-file", key_file], remote=remote(rp.port, g))
    await refused(
        env, rp, lp, "TLS with the RP failed: tlsv13 alert certificate required", "peer did not return a certificate"
    )


@pytest_twisted.ensureDeferred
async def test_mutual_tls_refuses_a_certificate_from_another_ca(env: Env, pki: PKI, key_file: str) -> None:
    g = pki.good
    rp = await env.rp(2, "--listen", listen(g.server, g), "--key-file", key_file)
    lp_remote = remote(rp.port, g, pki.other.client)
    lp = await env.lp(rp.port, 2, wait=False, extra=["--key-file", key_file], remote=lp_remote)
    await refused(env, rp, lp, "TLS with the RP failed: tlsv1 alert unknown ca", "certificate verify failed")


@pytest_twisted.ensureDeferred
async def test_lp_refuses_an_rp_it_does_not_trust(env: Env, pki: PKI, key_file: str) -> None:
    rp = await env.rp(2, "--listen", listen(pki.good.server), "--key-file", key_file)
    lp = await env.lp(rp.port, 2, wait=False, extra=["--key-file", key_file], remote=remote(rp.port, pki.other))
    await refused(env, rp, lp, "TLS with the RP failed: certificate verify failed", "tlsv1 alert unknown ca")


@pytest_twisted.ensureDeferred
async def test_lp_refuses_a_certificate_for_another_name(env: Env, pki: PKI, key_file: str) -> None:
    """The RP's certificate is signed by the CA the LP trusts but is for
    rp.tm3.invalid, not 127.0.0.1, the address the LP dials: refused. Dialing
    the same RP by that name (``endpoint=`` says where to connect) works."""
    g = pki.good
    rp = await env.rp(1, "--listen", listen(g.named_server), "--key-file", key_file)
    lp = await env.lp(rp.port, 1, wait=False, extra=["--key-file", key_file], remote=remote(rp.port, g))
    await refused(env, rp, lp, "TLS with the RP failed: the certificate is for another name or address")
    await lp.stop()
    by_name = f"tls:{OTHER_NAME}:{rp.port}:trustRoots={g.trust_dir}:endpoint=tcp\\:{HOST}\\:{rp.port}"
    await env.lp(rp.port, 1, extra=["--key-file", key_file], remote=by_name)
    await until(lambda: rp.stats.sessions == 1, 5, "the RP's session")


@pytest_twisted.ensureDeferred
async def test_v1_refused_client_certificate(env: Env, pki: PKI) -> None:
    """Without --key-file the LP's pipes count as up once TCP is (a v1 RP
    says nothing back): each set it opens is lost at once, when the RP
    refuses the handshake, and it redials with a growing delay. The RP never
    starts a session, and the LP's sessions never carry anything. When the
    refusal arrives before the last pipe of a set has connected, the set
    fails to open ("retrying in") instead: the delays grow just the same."""
    g = pki.good
    rp = await env.rp(2, "--listen", listen(g.server, g))
    lp = await env.lp(rp.port, 2, wait=False, remote=remote(rp.port, g))
    await until(lambda: len(failures(env)) >= 2, 10, "two lost sets")
    lines = failures(env)
    assert all("tlsv13 alert certificate required" in line for line in lines), lines
    delays = [float(m) for line in lines for m in re.findall(r"(?:reconnecting|retrying) in ([\d.]+) s", line)]
    assert delays[:2] == [0.5, 1.0], lines
    await until(lambda: rp.service.pipe_factory.admission.tls_failed >= 4, 5, "the RP to see every handshake fail")
    assert "lost in its TLS handshake: peer did not return a certificate" in env.logged()
    await sleep(0.2)
    assert rp.stats.sessions == 0 and rp.session is None
    assert lp.stats.connections_opened == 0


# -- the endpoint string -----------------------------------------------------------------


def usage_error(*argv: str) -> str:
    with pytest.raises(usage.UsageError) as e:
        rp_tap.Options().parseOptions(["--pipes", "1", *argv])
    return str(e.value)


def test_bad_files_are_usage_errors_naming_the_file(pki: PKI, tmp_path: Path) -> None:
    g = pki.good
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not PEM at all\n")
    encrypted = tmp_path / "encrypted.key"
    plain = serialization.load_pem_private_key(g.server.key.read_bytes(), password=None)
    encrypted.write_bytes(
        plain.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        )
    )
    cert, key = g.server.cert, g.server.key
    cases = [
        (f"tls:0:privateKey={key}:certificate={tmp_path}/missing.pem", f"cannot read the certificate file '{tmp_path}/missing.pem': No such file"),
        (f"tls:0:privateKey={tmp_path}/missing.key:certificate={cert}", f"cannot read the privateKey file '{tmp_path}/missing.key'"),
        (f"tls:0:privateKey={key}:certificate={tmp_path}", f"cannot read the certificate file '{tmp_path}': Is a directory"),
        (f"tls:0:privateKey={key}:certificate={junk}", f"the certificate file '{junk}' holds no PEM certificate"),
        (f"tls:0:privateKey={junk}:certificate={cert}", f"the privateKey file '{junk}' holds no PEM private key"),
        (f"tls:0:privateKey={key}:certificate={cert}:caCerts={junk}", f"the caCerts file '{junk}' holds no PEM certificate"),
        (f"tls:0:privateKey={g.client.key}:certificate={cert}", f"the private key in '{g.client.key}' is not the key of '{cert}'"),
        (f"tls:0:privateKey={encrypted}:certificate={cert}", f"the private key in '{encrypted}' is encrypted"),
    ]  # fmt: skip
    for spec, expected in cases:
        message = usage_error("--listen", spec)
        assert message.startswith(f"--listen: tls: {expected}"), message
        assert "\n" not in message


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("tls:", "tls: needs a port number"),
        ("tls:http:certificate=x", "tls: needs a port number"),
        ("tls:6000:privateKey=k.pem", "tls: certificate= is required"),
        ("tls:6000:certificate=c.pem:cacerts=ca.pem", "tls: unknown parameters cacerts="),
        ("tls:6000:c.pem", "tls: unknown parameters 'c.pem'"),
    ],
)
def test_malformed_tls_strings(spec: str, expected: str) -> None:
    message = usage_error("--listen", spec)
    assert message.startswith("--listen: not a server endpoint string"), message
    assert expected in message and "tls:PORT:privateKey=KEY.pem:certificate=CERT.pem" in message


# Twisted's own tls: parser reads certificates through its deprecated DN API.
@pytest.mark.filterwarnings("ignore:X509.get_subject is deprecated:DeprecationWarning")
def test_the_rp_takes_tls_as_ours_whatever_plugin_twisted_finds_first(pki: PKI) -> None:
    """Twisted has a server ``tls:`` plugin of its own (a directory of PEMs
    chosen by SNI); which of two plugins with one prefix serverFromString
    takes depends on how things were installed. The RP does not ask it, and
    our plugin hands Twisted's syntax on to Twisted's, so installing TM3
    changes nothing for other programs."""
    g = pki.good
    ours = listen(g.server, g)
    parsers = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "tls"]
    assert any(isinstance(p, TLSServerParser) for p in parsers), parsers
    endpoint = server_from_string(reactor(), ours)
    assert type(endpoint).__name__ == "SSL4ServerEndpoint"
    assert endpoint._sslContextFactory.trustRoot is not None  # the client certificate is required
    twisteds = [p for p in parsers if not isinstance(p, TLSServerParser)]
    if twisteds:
        directory = str(g.trust_dir.parent)
        expected = type(twisteds[0].parseStreamServer(reactor(), directory, port="0"))
        assert type(TLSServerParser().parseStreamServer(reactor(), directory, port="0")) is expected
        assert type(serverFromString(reactor(), f"tls:{directory}:port=0")) is expected


@pytest_twisted.ensureDeferred
async def test_a_pipe_refused_at_accept_on_a_tls_listener_is_closed_cleanly(env: Env, pki: PKI) -> None:
    """--allow-from refuses at accept, before TLS: the socket is closed with
    one line, and Twisted's TLS wrapper has a protocol to wrap (it used to be
    handed nothing and log an unhandled AttributeError)."""
    rp = await env.rp(1, "--listen", listen(pki.good.server), "--allow-from", "10.0.0.0/8")
    client = await env.connect(rp.port)
    await within(client.lost.wait(), 5, "the refused pipe to close")
    assert "pipe from 127.0.0.1 refused: not in --allow-from" in env.logged()
    assert "Unhandled" not in env.logged() and "AttributeError" not in env.logged()
