"""Option parsing shared by the ``tm3rp`` and ``tm3lp`` plugins: sizes with
units, ranges checked with a message naming the option and the range, and
the environment variables a ``.tac`` file reads."""

from __future__ import annotations

import re
from collections.abc import Mapping

from twisted.python import usage

_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}


def parse_size(option: str, text: str, low: int, high: int | None = None) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise usage.UsageError(
            f"--{option} must be a size in bytes (like 4096, 64KiB, 4MiB) in {_accepted(low, high)}, not {text!r}"
        )
    value = int(m.group(1)) * _UNITS[unit]
    check_range(option, value, low, high)
    return value


def parse_int(option: str, text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(str(text), 10)
    except ValueError:
        raise usage.UsageError(f"--{option} must be a whole number in {_accepted(low, high)}, not {text!r}") from None
    check_range(option, value, low, high)
    return value


def parse_seconds(option: str, text: str, low: float, high: float) -> float:
    try:
        value = float(str(text))
    except ValueError:
        raise usage.UsageError(
            f"--{option} must be a number of seconds, more than {low:g} and at most {high:g}, not {text!r}"
        ) from None
    if not low < value <= high:
        raise usage.UsageError(f"--{option} must be more than {low:g} and at most {high:g} seconds, not {text}")
    return value


def check_range(option: str, value: int, low: int, high: int | None) -> None:
    if value < low or (high is not None and value > high):
        raise usage.UsageError(f"--{option} must be in {_accepted(low, high)}, not {value}")


def _accepted(low: int, high: int | None) -> str:
    return f"{low}..{high}" if high is not None else f">= {low}"


def argv_from_env(environ: Mapping[str, str], names: Mapping[str, str]) -> list[str]:
    """Turn ``TM3_PIPES=4``-style variables into ``["--pipes", "4"]``.

    ``names`` maps each environment variable to its option; a flag option is
    given as ``"--flag"`` and set by any of 1/true/yes/on."""
    argv: list[str] = []
    for var, option in names.items():
        if var not in environ:
            continue
        value = environ[var]
        if option.startswith("flag:"):
            if value.strip().lower() in ("1", "true", "yes", "on"):
                argv.append("--" + option[5:])
            elif value.strip().lower() not in ("0", "false", "no", "off", ""):
                raise usage.UsageError(f"{var} must be 1/true/yes/on or 0/false/no/off, not {value!r}")
            continue
        if option.startswith("list:"):
            for item in value.split():
                argv += ["--" + option[5:], item]
            continue
        argv += ["--" + option, value]
    return argv
