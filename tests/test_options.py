"""``twistd tm3rp`` options, the ``TM3_*`` variables of ``tm3rp.tac``, and
the service both build."""

from __future__ import annotations

import re
import runpy
import subprocess
from pathlib import Path

import pytest
from twisted.application.service import IServiceCollection
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from tests.support.processes import REPO_ROOT, TWISTD, clean_env
from tm3.cli import EXIT_USAGE
from tm3.lp import tap as lp_tap
from tm3.mux.session import Settings
from tm3.rp import tap as rp_tap
from tm3.rp.tap import ENVIRONMENT, Options, makeService, options_from_env

KiB, MiB, GiB = 1024, 1024**2, 1024**3


def parse(*argv: str) -> Options:
    config = Options()
    config.parseOptions(list(argv))
    return config


def usage_error(*argv: str) -> str:
    with pytest.raises(usage.UsageError) as info:
        parse(*argv)
    return str(info.value)


# -- good values ----------------------------------------------------------------


def test_defaults() -> None:
    config = parse("--pipes", "4")
    assert config["pipes"] == 4
    assert config["listen"] == "tcp:6000"
    assert config.settings() == Settings(
        max_payload=4096,
        connect_timeout=10.0,
        conn_queue_limit=4 * MiB,
        total_queue_limit=64 * MiB,
        window_bytes=64 * MiB,
        total_window_bytes=256 * MiB,
    )


def test_every_option_with_units_and_bounds() -> None:
    config = parse(
        "-n", "1024",
        "-l", "tcp:0:interface=127.0.0.1",
        "--max-payload", "65525",
        "--connect-timeout", "0.5",
        "--conn-queue", "64KiB",
        "--total-queue", "16GiB",
        "--reorder-window", "1m",
        "--total-reorder-window", "64 GiB",
    )  # fmt: skip
    assert config["pipes"] == 1024
    assert config["listen"] == "tcp:0:interface=127.0.0.1"
    assert config.settings() == Settings(
        max_payload=65525,
        connect_timeout=0.5,
        conn_queue_limit=64 * KiB,
        total_queue_limit=16 * GiB,
        window_bytes=MiB,
        total_window_bytes=64 * GiB,
    )
    assert parse("--pipes", "1", "--max-payload", "1", "--connect-timeout", "3600")["max-payload"] == 1


# -- bad values: a UsageError naming the option and the range ---------------------------

BAD = [
    # option, value, the range as the message gives it
    ("pipes", "0", "1..1024"),
    ("pipes", "1025", "1..1024"),
    ("pipes", "-3", "1..1024"),
    ("pipes", "four", "1..1024"),
    ("pipes", "2.5", "1..1024"),
    ("max-payload", "0", "1..65525"),
    ("max-payload", "65526", "1..65525"),
    ("max-payload", "64KiB", "1..65525"),
    ("max-payload", "lots", "1..65525"),
    ("max-payload", "4 parsecs", "1..65525"),
    ("connect-timeout", "0", "more than 0 and at most 3600"),
    ("connect-timeout", "-1", "more than 0 and at most 3600"),
    ("connect-timeout", "3600.5", "more than 0 and at most 3600"),
    ("connect-timeout", "nan", "more than 0 and at most 3600"),
    ("connect-timeout", "inf", "more than 0 and at most 3600"),
    ("connect-timeout", "soon", "more than 0 and at most 3600"),
    ("conn-queue", "65535", "65536..1073741824"),
    ("conn-queue", "1073741825", "65536..1073741824"),
    ("conn-queue", "2GiB", "65536..1073741824"),
    ("conn-queue", "-1", "65536..1073741824"),
    ("conn-queue", "4MB", "65536..1073741824"),
    ("max-pending-pipes", "1", "2..65536"),
    ("max-pending-pipes", "65537", "2..65536"),
    ("max-pending-pipes", "many", "2..65536"),
    ("max-pending-per-address", "1", "2..65536"),
    ("stall-timeout", "0", "more than 0 and at most 3600"),
    ("stall-timeout", "3601", "more than 0 and at most 3600"),
    ("stall-timeout", "never", "more than 0 and at most 3600"),
    ("total-queue", "63KiB", "65536..17179869184"),
    ("total-queue", "17GiB", "65536..17179869184"),
    ("total-queue", "x", "65536..17179869184"),
    ("reorder-window", "1KiB", "1048576..17179869184"),
    ("reorder-window", "17GiB", "1048576..17179869184"),
    ("reorder-window", "", "1048576..17179869184"),
    ("total-reorder-window", "1KiB", "1048576..68719476736"),
    ("total-reorder-window", "65GiB", "1048576..68719476736"),
    ("total-reorder-window", "1.5GiB", "1048576..68719476736"),
    ("initial-window", "1KiB", "4096..1073741824"),
    ("initial-window", "2GiB", "4096..1073741824"),
    ("max-window", "64KiB", "262144..1073741824"),
    ("session-window", "65GiB", "0..68719476736"),
    ("hello-wait", "0", "more than 0 and at most 60"),
    ("hello-wait", "soon", "more than 0 and at most 60"),
    ("handshake-timeout", "601", "more than 0 and at most 600"),
    ("pipe-lowat", "4095", "4096..16777216"),
    ("pipe-lowat", "17MiB", "4096..16777216"),
    ("pipe-scheduler", "fastest", "delivery, rotation"),
    ("send-order", "random", "least-served, arrival"),
    ("pipe-congestion", "warp", "(this kernel's)"),
    ("half-close-timeout", "-1", "0..86400 (0: off)"),
    ("max-connections", "65537", "0..65536"),
    ("fd-reserve", "15", "16..65536"),
    ("drain-timeout", "soon", "0..86400 (0: off)"),
    ("idle-timeout", "forever", "0..86400 (0: off)"),
    ("summary-interval", "soon", "0..86400 (0: off)"),
    ("log-format", "xml", "text, json"),
    ("send-queue", "63KiB", "65536..1073741824"),
    ("total-send-queue", "1023KiB", "1048576..17179869184"),
    ("workers", "0", "1..64"),
    ("workers", "65", "1..64"),
    ("workers", "two", "1..64"),
]


@pytest.mark.parametrize("option,value,accepted", BAD)
def test_bad_value_names_the_option_and_the_range(option: str, value: str, accepted: str) -> None:
    argv = ["--pipes", "2"] if option != "pipes" else []
    message = usage_error(*argv, f"--{option}", value)
    assert message.startswith(f"--{option} must be"), message
    assert accepted in message, message
    # The message repeats what was given (a size with a unit: in bytes).
    assert repr(value) in message or message.endswith(f"not {value}") or re.search(r"not \d+$", message), message


def test_pipes_is_required() -> None:
    message = usage_error()
    assert message.startswith("--pipes is required") and "1..1024" in message


@pytest.mark.parametrize("listen", ["nope:6000", "tcp:http", "tcp:", ""])
def test_bad_listen_endpoint(listen: str) -> None:
    message = usage_error("--pipes", "2", "--listen", listen)
    assert message.startswith("--listen: not a server endpoint string"), message
    assert repr(listen) in message


def test_every_option_is_tested_here() -> None:
    names = {p[0] for p in Options.optParameters}
    assert names == {o for o, _, _ in BAD} | {"listen", "key-file", "metrics"}  # metrics: test_observability.py
    # The destination rules are opt_ methods: order matters between them.
    assert set(ENVIRONMENT.values()) == names | {"allow-from", "allow-to", "deny-to"}


@pytest.mark.parametrize(
    ("option", "spec", "why"),
    [
        ("--allow-to", "localhost", "is not CIDR[:PORTS]"),
        ("--allow-to", "010.0.0.0/8", "is not CIDR[:PORTS]"),
        ("--deny-to", "10.0.0.0/33", "is not CIDR[:PORTS]"),
        ("--deny-to", "10.0.0.0/8:http", "ports must be N, N-M"),
        ("--allow-to", "10.0.0.0/8:90-80", "outside 0..65535 or reversed"),
        ("--allow-to", "10.0.0.0/8:70000", "outside 0..65535 or reversed"),
        ("--allow-from", "10.0.0.0/8:80", "takes no ports, only CIDR"),
        ("--allow-from", "nope", "is not CIDR[:PORTS]"),
    ],
)
def test_bad_destination_rules(option: str, spec: str, why: str) -> None:
    message = usage_error("--pipes", "2", option, spec)
    assert message.startswith(f"{option}: {spec!r}") and why in message, message


def test_destination_rules_keep_their_order_across_both_options() -> None:
    config = Options()
    config.parseOptions(
        ["--pipes", "2", "--allow-to", "127.0.0.1:8080", "--deny-to", "0.0.0.0/0", "--allow-to", "10.1.0.0/16"]
    )
    assert [str(r) for r in config["destination-rules"]] == [
        "--allow-to 127.0.0.1:8080",
        "--deny-to 0.0.0.0/0",
        "--allow-to 10.1.0.0/16",
    ]


# -- the environment, for tm3rp.tac -------------------------------------------------------


def test_options_from_env_maps_every_variable() -> None:
    config = options_from_env(
        {
            "TM3_PIPES": "3",
            "TM3_LISTEN": "tcp:7000",
            "TM3_MAX_PAYLOAD": "1000",
            "TM3_CONNECT_TIMEOUT": "2.5",
            "TM3_CONN_QUEUE": "1MiB",
            "TM3_TOTAL_QUEUE": "2MiB",
            "TM3_REORDER_WINDOW": "3MiB",
            "TM3_TOTAL_REORDER_WINDOW": "4MiB",
            "UNRELATED": "x",
        }
    )
    assert config["pipes"] == 3 and config["listen"] == "tcp:7000"
    assert config.settings() == Settings(
        max_payload=1000,
        connect_timeout=2.5,
        conn_queue_limit=MiB,
        total_queue_limit=2 * MiB,
        window_bytes=3 * MiB,
        total_window_bytes=4 * MiB,
    )


def test_the_environment_gives_keys_windows_and_the_v1_flag(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("k" * 40 + "\n")
    config = options_from_env(
        {"TM3_PIPES": "2", "TM3_KEY_FILE": str(key), "TM3_ALLOW_V1": "yes", "TM3_INITIAL_WINDOW": "64KiB",
         "TM3_MAX_WINDOW": "1MiB", "TM3_SESSION_WINDOW": "8MiB", "TM3_HELLO_WAIT": "0.5", "TM3_HANDSHAKE_TIMEOUT": "3"}
    )  # fmt: skip
    assert config["key"] == b"k" * 40 and config["allow-v1"]
    assert (config["hello-wait"], config["handshake-timeout"]) == (0.5, 3.0)
    s = config.settings()
    assert (s.initial_window, s.max_window, s.session_window) == (64 * 1024, MiB, 8 * MiB)
    assert not options_from_env({"TM3_PIPES": "2", "TM3_KEY_FILE": str(key), "TM3_ALLOW_V1": "0"})["allow-v1"]
    with pytest.raises(usage.UsageError, match=r"^TM3_ALLOW_V1='maybe': use 1, yes or true"):
        options_from_env({"TM3_PIPES": "2", "TM3_ALLOW_V1": "maybe"})
    with pytest.raises(usage.UsageError, match=r"--allow-v1 goes with --key-file"):
        options_from_env({"TM3_PIPES": "2", "TM3_ALLOW_V1": "1"})
    with pytest.raises(usage.UsageError, match=r"TM3_KEY_FILE=.*: --key-file: .* has 5 bytes; use at least 32"):
        key.write_text("short")
        options_from_env({"TM3_PIPES": "2", "TM3_KEY_FILE": str(key)})


def test_options_from_env_defaults() -> None:
    config = options_from_env({"TM3_PIPES": "8"})
    assert config["pipes"] == 8 and config["listen"] == "tcp:6000"
    assert config.settings() == Settings()


@pytest.mark.parametrize(
    "var,value,accepted",
    [
        ("TM3_PIPES", "many", "1..1024"),
        ("TM3_PIPES", "0", "1..1024"),
        ("TM3_MAX_PAYLOAD", "70000", "1..65525"),
        ("TM3_CONNECT_TIMEOUT", "never", "at most 3600"),
        ("TM3_CONN_QUEUE", "1k", "65536..1073741824"),
        ("TM3_TOTAL_QUEUE", "big", "65536..17179869184"),
        ("TM3_REORDER_WINDOW", "0", "1048576..17179869184"),
        ("TM3_TOTAL_REORDER_WINDOW", "1TiB", "1048576..68719476736"),
        ("TM3_LISTEN", "bogus:1", "not a server endpoint string"),
    ],
)
def test_malformed_variable_is_named(var: str, value: str, accepted: str) -> None:
    environ = {"TM3_PIPES": "4", "TM3_MAX_PAYLOAD": "4096", var: value}
    with pytest.raises(usage.UsageError) as info:
        options_from_env(environ)
    message = str(info.value)
    assert message.startswith(f"{var}={value!r}: --{ENVIRONMENT[var]}"), message
    assert accepted in message, message
    # Only the variable at fault is blamed.
    others = [v for v in environ if v != var]
    assert not any(o in message for o in others), message


def test_missing_pipes_variable_is_named() -> None:
    with pytest.raises(usage.UsageError) as info:
        options_from_env({"TM3_LISTEN": "tcp:6000"})
    assert str(info.value).startswith("TM3_PIPES is not set: --pipes is required")


def test_options_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENVIRONMENT:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TM3_PIPES", "5")
    assert options_from_env()["pipes"] == 5


# -- the service ------------------------------------------------------------------------


def test_make_service_listens_on_the_endpoint_and_stops_cleanly() -> None:
    reactor = MemoryReactorClock()
    service = makeService(parse("--pipes", "3", "--listen", "tcp:6123:interface=127.0.0.1"), reactor)
    assert service.name == "tm3rp"
    assert service.pipe_factory.n == 3
    assert service.multiplexer.settings == Settings()
    service.startService()
    ((port, factory, _, interface),) = reactor.tcpServers
    assert (port, interface) == (6123, "127.0.0.1")
    assert factory is service.pipe_factory
    listened = []
    service.when_listening().addCallback(listened.append)
    assert len(listened) == 1
    service.stopService()
    assert not service.running


def test_tac_builds_the_same_service(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ENVIRONMENT:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TM3_PIPES", "6")
    monkeypatch.setenv("TM3_MAX_PAYLOAD", "8KiB")
    namespace = runpy.run_path(str(REPO_ROOT / "tm3rp.tac"))
    services = list(IServiceCollection(namespace["application"]))
    assert len(services) == 1
    (service,) = services
    assert isinstance(service, rp_tap.RemoteProxyService)
    assert service.pipe_factory.n == 6
    assert service.multiplexer.settings.max_payload == 8192


def test_tac_with_a_malformed_variable_exits_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var in ENVIRONMENT:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TM3_PIPES", "2")
    monkeypatch.setenv("TM3_CONN_QUEUE", "tiny")
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(REPO_ROOT / "tm3rp.tac"))
    assert info.value.code == EXIT_USAGE  # systemd: RestartPreventExitStatus=2
    assert capsys.readouterr().err.startswith("tm3rp.tac: TM3_CONN_QUEUE='tiny': --conn-queue must be")


# -- twistd ------------------------------------------------------------------------------


def twistd(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TWISTD, *argv],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=clean_env(env),
        timeout=60,
    )


def test_twistd_help_lists_every_option() -> None:
    out = twistd("-n", "tm3rp", "--help")
    assert out.returncode == 0, out.stderr
    for long, short, _, _ in Options.optParameters:
        line = re.search(rf"^\s+(-{short}, )?--{long}=", out.stdout, re.M)
        assert line, (long, out.stdout)
        if short:
            assert line.group(1) == f"-{short}, "
    assert "TM3 remote proxy (RP)" in out.stdout


def test_twistd_bad_option_is_a_usage_error() -> None:
    out = twistd("-n", "tm3rp", "--pipes", "2", "--max-payload", "99999")
    assert out.returncode != 0
    assert "--max-payload must be in 1..65525, not 99999" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_twistd_tac_with_a_malformed_variable() -> None:
    out = twistd("-ny", "tm3rp.tac", env={"TM3_PIPES": "lots"})
    assert out.returncode != 0
    assert "tm3rp.tac: TM3_PIPES='lots': --pipes must be a whole number in 1..1024" in out.stdout + out.stderr


# -- the LP's addresses: one strict IPv4 parser (tm3/core/addresses.py) ---------------------


def lp_options(*argv: str) -> lp_tap.Options:
    config = lp_tap.Options()
    config.parseOptions(["--remote", "127.0.0.1", "--pipes", "2", *argv])
    return config


@pytest.mark.parametrize("bad", ["010.0.0.1", "127.1", "0x7f.0.0.1", "1.2.3.256", "1.2.3.4."])
def test_a_malformed_ipv4_forward_target_is_a_usage_error_naming_the_option(bad: str) -> None:
    # inet_aton would take 010.0.0.1 for 8.0.0.1 and 127.1 for 127.0.0.1; the
    # SYN encoder refused them, so such a forward was accepted and then every
    # connection through it was reset at run time.
    with pytest.raises(usage.UsageError, match=rf"^--forward: '{re.escape(bad)}' is not an IPv4 address"):
        lp_options("--forward", f"tcp:8080:{bad}:80")


def test_a_malformed_ipv4_remote_is_a_usage_error() -> None:
    with pytest.raises(usage.UsageError, match=r"^--remote: '010.0.0.1' is not an IPv4 address"):
        lp_tap.Options().parseOptions(["--remote", "010.0.0.1:6000", "--pipes", "2", "--socks", "tcp:0"])


def test_forward_targets_are_ipv4_literals_or_resolved_names() -> None:
    config = lp_options("--forward", "tcp:8080:10.0.0.5:80", "--forward", "tcp:8081:localhost:81")
    assert config["forward"] == [("tcp:8080", "10.0.0.5", 80), ("tcp:8081", "127.0.0.1", 81)]
    assert config["remote"] == "tcp:host=127.0.0.1:port=6000:timeout=10"
