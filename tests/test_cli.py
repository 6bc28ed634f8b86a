"""What the command lines print, run as a user runs them (``twistd``, the
console scripts, in subprocesses): ``--version``, usage errors, and a port
that is already taken."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

import tm3
from tests.support.ports import HOST
from tests.support.processes import REPO_ROOT, TWISTD, clean_env
from tm3.cli import EXIT_USAGE

BIN = Path(sys.executable).parent


def run(*argv: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, cwd=REPO_ROOT, env=clean_env(env), timeout=timeout
    )


def twistd(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run(TWISTD, "-n", "--pidfile=", *argv, env=env)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something already listens on."""
    s = socket.socket()
    s.bind((HOST, 0))
    s.listen()
    yield s.getsockname()[1]
    s.close()


def test_the_package_version_is_the_metadata_version() -> None:
    assert tm3.__version__ == metadata.version("tm3")


@pytest.mark.parametrize("tap", ["tm3rp", "tm3lp"])
def test_twistd_plugins_print_tm3s_version(tap: str) -> None:
    out = twistd(tap, "--version")
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first == f"twistd {tap} (TM3) {metadata.version('tm3')}", out.stdout
    assert "Twisted version" not in out.stdout  # twistd's own --version


@pytest.mark.parametrize("tool", ["tm3-testserver", "tm3-testclient", "tm3-redirect", "tm3-demo"])
def test_tools_print_tm3s_version(tool: str) -> None:
    out = run(str(BIN / tool), "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"{tool} (TM3) {metadata.version('tm3')}"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (["tm3rp", "--pipes", "0"], "twistd tm3rp: --pipes must be in 1..1024, not 0"),
        (["tm3rp", "--pipes", "2", "--bogus"], "twistd tm3rp: option --bogus not recognized"),
        (["tm3rp"], "twistd tm3rp: --pipes is required: the number of pipes the LP opens (1..1024)"),
        (
            ["tm3lp", "--pipes", "2", "--socks", "tcp:0"],
            "twistd tm3lp: --remote is required: the RP's HOST, HOST:PORT, [IPV6]:PORT or a client endpoint string"
            " (tcp:HOST:PORT, tls:HOST:PORT:...)",
        ),
        (
            ["tm3lp", "--remote", HOST, "--pipes", "2", "--socks", "tcp:0", "--socks-timeout", "never"],
            "twistd tm3lp: --socks-timeout must be a number of seconds, more than 0 and at most 3600, not 'never'",
        ),
    ],
)
def test_a_usage_error_is_one_line_and_a_hint_not_the_help(argv: list[str], line: str) -> None:
    out = twistd(*argv)
    assert out.returncode == EXIT_USAGE, out.stdout + out.stderr
    assert out.stdout == ""  # twistd prints the whole --help text there
    command = " ".join(argv[:1])
    assert out.stderr.splitlines() == [line, f"(`twistd {command} --help` lists the options)"]


def test_help_is_still_the_whole_help() -> None:
    out = twistd("tm3lp", "--help")
    assert out.returncode == 0, out.stderr
    assert "--socks-timeout=" in out.stdout and "--redirect=" in out.stdout


def test_rp_on_a_port_in_use_says_so_in_one_line(taken_port: int) -> None:
    listen = f"tcp:{taken_port}:interface={HOST}"
    out = twistd("tm3rp", "--pipes", "2", "--listen", listen)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert f"tm3rp: cannot listen on {listen}: address already in use" in text
    assert "Traceback" not in text and "CannotListenError" not in text
    # twistd's two start-up lines, then ours.
    assert len(text.splitlines()) <= 3, text


def test_lp_on_a_port_in_use_names_the_listener(taken_port: int) -> None:
    socks = f"tcp:{taken_port}:interface={HOST}"
    out = twistd(
        "tm3lp",
        "--remote",
        f"{HOST}:1",
        "--pipes",
        "2",
        "--forward",
        f"tcp:0:interface={HOST}:{HOST}:80",
        "--socks",
        socks,
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert f"tm3lp: cannot listen on {socks} (SOCKS5): address already in use" in text
    assert "Traceback" not in text and len(text.splitlines()) <= 3, text


def test_lp_tac_with_a_malformed_variable_exits_naming_it() -> None:
    out = run(
        TWISTD,
        "-n",
        "--pidfile=",
        "-y",
        str(REPO_ROOT / "tm3lp.tac"),
        env={"TM3_REMOTE": HOST, "TM3_PIPES": "2", "TM3_SOCKS": "tcp:0", "TM3_SOCKS_TIMEOUT": "soon"},
    )
    assert out.returncode == EXIT_USAGE, out.stdout + out.stderr
    assert out.stderr.startswith("tm3lp.tac: TM3_SOCKS_TIMEOUT='soon': --socks-timeout must be"), out.stderr
    assert "Traceback" not in out.stdout + out.stderr
