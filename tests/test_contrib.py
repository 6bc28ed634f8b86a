"""The deployment files in contrib/: the systemd units (checked by
``systemd-analyze verify``, and by a small parser for what they must say),
their example environment files (valid options), and the Containerfile
(a syntax sanity check: there is no container engine in CI)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import REPO_ROOT
from tm3.lp import tap as lp_tap
from tm3.rp import tap as rp_tap

SYSTEMD = REPO_ROOT / "contrib" / "systemd"
CONTAINER = REPO_ROOT / "contrib" / "container" / "Containerfile"
BIN = Path(sys.executable).parent
UNITS = {"tm3rp": rp_tap.Options, "tm3lp": lp_tap.Options}
KEY = "0123456789abcdef0123456789abcdef-contrib"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]} (keys may repeat, as
    systemd allows); fails on anything that is neither a comment, a section
    header nor Key=value."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        header = re.fullmatch(r"\[([A-Za-z]+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), [])
            continue
        pair = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", line)
        assert pair and current is not None, f"line {number}: {line!r}"
        current.append((pair.group(1), pair.group(2)))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    (value,) = values(unit, section, key)
    return value


@pytest.mark.parametrize("name", UNITS)
def test_unit_says_what_a_production_service_needs(name: str) -> None:
    unit = parse_unit((SYSTEMD / f"{name}.service").read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    exec_start = shlex.split(one(unit, "Service", "ExecStart"))
    assert exec_start[:4] == ["/opt/tm3/bin/twistd", "-n", "--pidfile=", name]
    assert exec_start[4:] == [f"${name.upper()}_OPTIONS"]  # unbraced: split into words
    assert one(unit, "Service", "EnvironmentFile") == f"/etc/tm3/{name}.env"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "RestartPreventExitStatus") == "2"  # tm3.cli.EXIT_USAGE
    assert int(one(unit, "Service", "LimitNOFILE")) >= 65536
    for key, value in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),  # no capability by default
        ("AmbientCapabilities", ""),
    ]:
        assert one(unit, "Service", key) == value, key
    assert one(unit, "Service", "User") == "tm3"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_lp_unit_removes_redirect_rules_even_after_a_crash() -> None:
    unit = parse_unit((SYSTEMD / "tm3lp.service").read_text())
    assert values(unit, "Service", "ExecStopPost") == ["-+/opt/tm3/bin/tm3-redirect off"]
    # The --redirect block (commented out) grants exactly iptables' capabilities.
    text = (SYSTEMD / "tm3lp.service").read_text()
    assert "#CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW" in text
    assert "#AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW" in text


@pytest.mark.parametrize("name", UNITS)
def test_env_example_holds_valid_options(name: str, tmp_path: Path) -> None:
    key = tmp_path / "tm3.key"
    key.write_text(KEY)
    active = [line for line in (SYSTEMD / f"{name}.env").read_text().splitlines() if line and not line.startswith("#")]
    assert len(active) == 1 and active[0].startswith(f"{name.upper()}_OPTIONS="), active
    argv = [key.as_posix() if a == "/etc/tm3/tm3.key" else a for a in active[0].split("=", 1)[1].split()]
    config = UNITS[name]()
    config.parseOptions(argv)
    assert config["key"] is not None


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        # scripts/setup installs systemd (as root on Debian); elsewhere the
        # parser tests above are all that checks the units.
        pytest.skip("systemd-analyze not installed: the units were only parsed, not verified")
    paths = []
    for name in UNITS:
        # verify checks that ExecStart's program exists: point it at this venv.
        text = (SYSTEMD / f"{name}.service").read_text()
        text = text.replace("/opt/tm3/bin/", f"{BIN}/").replace("/etc/tm3/", f"{tmp_path}/")
        (tmp_path / f"{name}.env").write_text((SYSTEMD / f"{name}.env").read_text())
        path = tmp_path / f"{name}.service"
        path.write_text(text)
        paths.append(str(path))
    done = subprocess.run(
        [analyze, "verify", "--man=no", *paths], capture_output=True, text=True, timeout=60, check=False
    )
    # verify exits 0 on an unknown key or a bad value, and only warns.
    ours = [line for line in (done.stdout + done.stderr).splitlines() if "tm3" in line]
    assert done.returncode == 0 and not ours, done.stdout + done.stderr


def test_containerfile_is_sane() -> None:
    lines: list[str] = []
    pending = ""
    for raw in CONTAINER.read_text().splitlines():
        if not pending and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        pending += raw.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        lines.append(pending.strip())
        pending = ""
    assert not pending, "a continued line runs off the end"
    instructions = [line.split(None, 1) for line in lines]
    known = {"FROM", "RUN", "COPY", "ADD", "ENV", "ARG", "USER", "WORKDIR", "EXPOSE", "ENTRYPOINT", "CMD", "LABEL"}
    assert all(len(i) == 2 and i[0] in known for i in instructions), instructions
    assert instructions[0] == ["FROM", "python:3.11-slim"]
    by_kind: dict[str, list[str]] = {}
    for kind, arg in instructions:
        by_kind.setdefault(kind, []).append(arg)
    assert json.loads(by_kind["ENTRYPOINT"][-1]) == ["twistd", "-n", "--pidfile="]
    assert json.loads(by_kind["CMD"][-1])[0] in ("tm3rp", "tm3lp")
    assert "COPY . /src" in lines
    assert any("pip install" in r and "/src" in r for r in by_kind["RUN"])
    assert by_kind["USER"][-1] == "tm3"
    # The build context is the checkout: keep the venv and git history out of it.
    ignored = (REPO_ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
