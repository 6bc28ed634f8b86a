"""``twistd tm3lp``'s deployment options and ``tm3lp.tac``: ``--socks-timeout``,
the resolver's options, ``--redirect``, the ``TM3_*`` variables, and the ``.tac`` file run by
``twistd -ny`` against a real RP."""

from __future__ import annotations

import re
import runpy
import signal
from typing import Any

import pytest
import pytest_twisted
from twisted.application.service import IServiceCollection
from twisted.python import usage

from tests.support import servers
from tests.support.clients import REP_SUCCEEDED, Client, socks_ipv4
from tests.support.env import Env
from tests.support.pattern import Pattern
from tests.support.ports import HOST
from tests.support.processes import REPO_ROOT, TWISTD
from tests.support.waiting import within
from tm3.lp import redirect
from tm3.lp import tap as lp_tap
from tm3.lp.rules import RedirectRules, parse_redirect
from tm3.lp.service import LocalProxy


def parse(*argv: str) -> lp_tap.Options:
    config = lp_tap.Options()
    config.parseOptions(["--remote", HOST, "--pipes", "2", *argv])
    return config


# -- --socks-timeout ---------------------------------------------------------------------


def test_socks_timeout_default_and_range() -> None:
    assert parse("--socks", "tcp:0")["socks-timeout"] == 10.0
    assert parse("--socks", "tcp:0", "--socks-timeout", "2.5")["socks-timeout"] == 2.5
    for bad in ("0", "-1", "3601", "soon"):
        with pytest.raises(usage.UsageError, match=r"^--socks-timeout must"):
            parse("--socks", "tcp:0", "--socks-timeout", bad)


# -- SOCKS names: --resolver, --resolve-timeout, --resolver-threads, --dns-server ----------------


def test_resolver_options_defaults_and_values() -> None:
    config = parse("--socks", "tcp:0")
    assert (config["resolver"], config["resolve-timeout"], config["resolver-threads"], config["dns-server"]) == (
        "dns",
        5.0,
        32,
        [],
    )
    assert parse("--socks", "tcp:0", "--socks-timeout", "4")["resolve-timeout"] == 2.0  # half, when under 5
    config = parse("--socks", "tcp:0", "--dns-server", "192.0.2.53,192.0.2.54:5353", "--dns-server", "127.0.0.1")
    assert config["dns-server"] == [("192.0.2.53", 53), ("192.0.2.54", 5353), ("127.0.0.1", 53)]
    config = parse("--socks", "tcp:0", "--resolver", "system", "--resolver-threads", "4", "--resolve-timeout", "9.5")
    assert (config["resolver"], config["resolver-threads"], config["resolve-timeout"]) == ("system", 4, 9.5)
    proxy = lp_tap.makeService(config)
    assert proxy.resolver.in_flight.capacity == 4 and proxy.resolver.timeout == 9.5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--resolve-timeout", "0"], "--resolve-timeout must be more than 0"),
        (["--resolve-timeout", "soon"], "--resolve-timeout must be a number of seconds"),
        (["--resolve-timeout", "10"], "--resolve-timeout must be below --socks-timeout (10 s)"),
        (["--socks-timeout", "3", "--resolve-timeout", "4"], "--resolve-timeout must be below --socks-timeout (3 s)"),
        (["--resolver", "nis"], "--resolver must be one of dns, system, not 'nis'"),
        (["--resolver-threads", "0"], "--resolver-threads must be in 1..1024"),
        (["--dns-server", "dns.example"], "--dns-server must be HOST[:PORT] with HOST an IPv4 address"),
        (["--dns-server", "192.0.2.53:0"], "--dns-server must be HOST[:PORT]"),
        (["--resolver", "system", "--dns-server", "192.0.2.53"], "--dns-server goes with --resolver dns"),
    ],
)
def test_bad_resolver_options_are_one_line_usage_errors(argv: list[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as info:
        parse("--socks", "tcp:0", *argv)
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_resolver_variables() -> None:
    config = lp_tap.options_from_env(
        {
            "TM3_REMOTE": HOST,
            "TM3_PIPES": "2",
            "TM3_SOCKS": "tcp:0",
            "TM3_RESOLVER": "system",
            "TM3_RESOLVE_TIMEOUT": "3",
            "TM3_RESOLVER_THREADS": "8",
        }
    )
    assert (config["resolver"], config["resolve-timeout"], config["resolver-threads"]) == ("system", 3.0, 8)
    config = lp_tap.options_from_env(
        {"TM3_REMOTE": HOST, "TM3_PIPES": "2", "TM3_SOCKS": "tcp:0", "TM3_DNS_SERVER": "192.0.2.1, 192.0.2.2:53"}
    )
    assert config["dns-server"] == [("192.0.2.1", 53), ("192.0.2.2", 53)]
    with pytest.raises(usage.UsageError, match=r"^TM3_RESOLVE_TIMEOUT='20': --resolve-timeout must be below"):
        lp_tap.options_from_env(
            {"TM3_REMOTE": HOST, "TM3_PIPES": "2", "TM3_SOCKS": "tcp:0", "TM3_RESOLVE_TIMEOUT": "20"}
        )


# -- --redirect --------------------------------------------------------------------------


def test_parse_redirect() -> None:
    assert parse_redirect("lo:80") == ("lo", (80,))
    assert parse_redirect("lo:80,443,80") == ("lo", (80, 443))
    for bad in ("lo", ":80", "lo:", "lo:80,", "lo:http", "lo:0", "lo:65536"):
        with pytest.raises(usage.UsageError, match=r"^--redirect"):
            parse_redirect(bad)
    with pytest.raises(usage.UsageError, match=r"^--redirect: IFACE 'nosuch0' does not exist"):
        parse_redirect("nosuch0:80")


def test_redirect_takes_the_rp_address_from_remote() -> None:
    config = parse("--transparent", "tcp:6001", "--redirect", "lo:80,443")
    assert config["redirect"] == ("lo", (80, 443))
    assert config["rp-ip"] == HOST
    for remote in (
        "tcp:127.0.0.2:6000",
        "tcp:host=127.0.0.2:port=6000",
        "tls:localhost:6000:endpoint=tcp\\:127.0.0.2\\:6000",
    ):
        config = lp_tap.Options()
        config.parseOptions(["--remote", remote, "--pipes", "2", "--transparent", "tcp:6001", "--redirect", "lo:80"])
        assert config["rp-ip"] == "127.0.0.2", remote


def test_redirect_goes_with_transparent() -> None:
    with pytest.raises(usage.UsageError, match=r"^--redirect goes with --transparent"):
        parse("--socks", "tcp:0", "--redirect", "lo:80")
    assert parse("--socks", "tcp:0")["redirect"] is None


def test_the_redirect_rules_are_the_last_service_so_they_start_last_and_stop_first() -> None:
    proxy = lp_tap.makeService(
        parse("--transparent", "tcp:6001", "--forward", f"tcp:0:{HOST}:80", "--redirect", "lo:80")
    )
    children = list(proxy)
    assert isinstance(children[-1], RedirectRules)
    assert children[-1].listener is proxy.listeners[0]
    assert (children[-1].iface, children[-1].ports, children[-1].rp_ip) == ("lo", (80,), HOST)


class NoIptables(redirect.Iptables):
    def __init__(self) -> None:
        super().__init__("/nonexistent/iptables")


def test_rules_that_cannot_be_installed_stop_the_lp_in_one_line() -> None:
    class Port:
        def getHost(self) -> Any:
            return type("Address", (), {"port": 6001})()

    listener: Any = type("Listener", (), {"port": Port()})()
    rules = RedirectRules(HOST, "lo", (80,), listener, find_iptables=NoIptables)
    with pytest.raises(SystemExit) as info:
        rules.startService()
    assert str(info.value.code).startswith("tm3lp: --redirect: cannot run /nonexistent/iptables")
    rules.stopService()  # nothing was installed: nothing to remove


# -- TM3_* variables and tm3lp.tac ---------------------------------------------------------


def test_every_lp_option_has_a_variable() -> None:
    options = {p[0] for p in lp_tap.Options.optParameters} | {"forward", "dns-server"}  # the repeatable ones
    assert set(lp_tap.ENVIRONMENT.values()) == options
    assert all(var == "TM3_" + option.upper().replace("-", "_") for var, option in lp_tap.ENVIRONMENT.items())


def test_lp_options_from_env() -> None:
    config = lp_tap.options_from_env(
        {
            "TM3_REMOTE": f"{HOST}:7000",
            "TM3_PIPES": "3",
            "TM3_SOCKS": "tcp:1080:interface=127.0.0.1",
            "TM3_SOCKS_TIMEOUT": "4",
            "TM3_FORWARD": f"tcp:8080:{HOST}:80  tcp:8443:{HOST}:443",
            "TM3_MAX_PAYLOAD": "8KiB",
        }
    )
    assert config["remote"] == f"tcp:host={HOST}:port=7000:timeout=10"
    assert config["pipes"] == 3 and config["socks-timeout"] == 4.0 and config["max-payload"] == 8192
    assert config["forward"] == [("tcp:8080", HOST, 80), ("tcp:8443", HOST, 443)]
    with pytest.raises(usage.UsageError, match=r"^TM3_SOCKS_TIMEOUT='x': --socks-timeout must"):
        lp_tap.options_from_env({"TM3_REMOTE": HOST, "TM3_PIPES": "2", "TM3_SOCKS": "tcp:0", "TM3_SOCKS_TIMEOUT": "x"})
    with pytest.raises(usage.UsageError, match=r"^TM3_PIPES is not set: --pipes is required"):
        lp_tap.options_from_env({"TM3_REMOTE": HOST, "TM3_SOCKS": "tcp:0"})
    with pytest.raises(usage.UsageError, match=r"no way in .*TM3_REMOTE, TM3_PIPES and one of TM3_SOCKS"):
        lp_tap.options_from_env({"TM3_REMOTE": HOST, "TM3_PIPES": "2"})


def test_lp_tac_builds_the_same_service(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in lp_tap.ENVIRONMENT:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TM3_REMOTE", f"{HOST}:7000")
    monkeypatch.setenv("TM3_PIPES", "3")
    monkeypatch.setenv("TM3_SOCKS", "tcp:1080:interface=127.0.0.1")
    monkeypatch.setenv("TM3_SOCKS_TIMEOUT", "4")
    namespace = runpy.run_path(str(REPO_ROOT / "tm3lp.tac"))
    (service,) = list(IServiceCollection(namespace["application"]))
    assert isinstance(service, LocalProxy)
    assert service.dialer.n == 3 and service.remote == f"{HOST}:7000"
    assert [li.description for li in service.listeners] == ["SOCKS5"]
    assert service.listeners[0].factory.buildProtocol(None)._timeout == 4.0


@pytest_twisted.ensureDeferred
async def test_twistd_runs_tm3lp_tac_against_a_real_rp(env: Env) -> None:
    rp = await env.rp(2)
    echo = await env.server(servers.echo(env.reactor))
    proc = env.spawn(
        [TWISTD, "-n", "--pidfile=", "-y", str(REPO_ROOT / "tm3lp.tac")],
        {
            "TM3_REMOTE": f"{HOST}:{rp.port}",
            "TM3_PIPES": "2",
            "TM3_SOCKS": f"tcp:0:interface={HOST}",
            "TM3_SOCKS_TIMEOUT": "5",
        },
    )
    match = await within(
        proc.when_output(rb"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\) \(SOCKS5\)"),
        30,
        "the LP to listen",
    )
    await within(proc.when_output(rb"session 1 up \(v1\): 2 pipes to the RP"), 30, "the LP's session")
    client = Client(socks=socks_ipv4(HOST, echo.port))
    await env.connect(int(match.group(1)), client)
    assert await within(client.socks_reply.wait(), 10, "the SOCKS reply") == REP_SUCCEEDED
    data = Pattern(21).bytes(100_000)
    client.write(data)
    await within(client.when_received(len(data)), 10, "the echo")
    assert client.data == data
    client.transport.loseConnection()
    proc.transport.signalProcess("TERM")
    status = await within(proc.ended.wait(), 15, "the LP to stop")
    assert status.exitCode == 0 or status.signal == signal.SIGTERM, proc.text
    assert "Traceback" not in proc.text, proc.text
    assert re.search(r"conn \d+ to 127\.0\.0\.1:\d+ ended", proc.text), proc.text


@pytest.mark.parametrize(
    "remote,endpoint",
    [
        ("::1", "tcp:host=\\:\\:1:port=6000:timeout=10"),
        ("[::1]", "tcp:host=\\:\\:1:port=6000:timeout=10"),
        ("[2001:db8::1]:7000", "tcp:host=2001\\:db8\\:\\:1:port=7000:timeout=10"),
        ("tcp:[::1]:7000:timeout=3", "tcp:\\:\\:1:7000:timeout=3"),
        ("127.0.0.1:7000", "tcp:host=127.0.0.1:port=7000:timeout=10"),
    ],
)
def test_remote_forms(remote: str, endpoint: str) -> None:
    assert lp_tap.parse_remote(remote, 10) == endpoint


@pytest.mark.parametrize(
    "remote,message",
    [
        ("tcp6:host=::1:port=6000", "--remote: 'tcp6' is not a client endpoint type here (tcp, tls, ssl, unix)"),
        ("[::g]:6000", "--remote: '::g' is not an IPv6 address"),
        ("[::1]:x", "--remote port must be a whole number in 1..65535, not 'x'"),
        (":6000", "--remote must be HOST, HOST:PORT, [IPV6]:PORT or a client endpoint string"),
    ],
)
def test_bad_remote_forms_say_what_is_wrong(remote: str, message: str) -> None:
    with pytest.raises(usage.UsageError) as e:
        lp_tap.parse_remote(remote, 10)
    assert str(e.value).startswith(message), str(e.value)
