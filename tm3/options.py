"""Option parsing shared by the ``tm3rp`` and ``tm3lp`` plugins: sizes with
units, ranges checked with a message naming the option and the range, and
the environment variables a ``.tac`` file reads."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from twisted.internet import endpoints
from twisted.python import usage

from tm3.core.handshake import load_key
from tm3.core.schedule import DEFAULT_SHARE
from tm3.core.wire import DEFAULT_PAYLOAD, MAX_PAYLOAD
from tm3.fdlimit import DEFAULT_FD_RESERVE
from tm3.logs import LOG_FORMATS, use_log_format
from tm3.mux.pipes import PIPE_ORDERS
from tm3.mux.settings import Settings
from tm3.reactor import default_reactor
from tm3.tls import BadTLSFile

# --send-order: how often the longest-waiting connection is served instead of
# the least-served one (tm3/core/schedule.py): 1 in 8, or always.
SEND_ORDERS = {"least-served": DEFAULT_SHARE, "arrival": 1}

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


def parse_seconds_or_off(option: str, text: str, high: float) -> float:
    """Seconds in 0..``high``, where 0 means off."""
    try:
        value = float(str(text))
    except ValueError:
        value = -1.0
    if not 0 <= value <= high:  # (also NaN)
        raise usage.UsageError(f"--{option} must be a number of seconds in 0..{high:g} (0: off), not {text!r}")
    return value


def parse_choice(option: str, text: str, choices: tuple[str, ...]) -> str:
    if text not in choices:
        raise usage.UsageError(f"--{option} must be one of {', '.join(choices)}, not {text!r}")
    return text


AVAILABLE_CONGESTION = "/proc/sys/net/ipv4/tcp_available_congestion_control"


def parse_congestion(option: str, text: str) -> str:
    """A congestion control this kernel has (or "" for the system's default)."""
    if not text:
        return ""
    try:
        with open(AVAILABLE_CONGESTION) as f:
            available = f.read().split()
    except OSError:
        return text  # not Linux: setting it will say
    if text not in available:
        raise usage.UsageError(f"--{option} must be one of {', '.join(available)} (this kernel's), not {text!r}")
    return text


def check_range(option: str, value: int, low: int, high: int | None) -> None:
    if value < low or (high is not None and value > high):
        raise usage.UsageError(f"--{option} must be in {_accepted(low, high)}, not {value}")


def _accepted(low: int, high: int | None) -> str:
    return f"{low}..{high}" if high is not None else f">= {low}"


def argv_from_env(environ: Mapping[str, str], names: Mapping[str, str]) -> list[str]:
    """Turn ``TM3_PIPES=4``-style variables into ``["--pipes", "4"]``;
    ``names`` maps each environment variable to its option."""
    return [arg for var, option in names.items() if var in environ for arg in ("--" + option, environ[var])]


OptionsT = TypeVar("OptionsT", bound=usage.Options)


def options_from_environment(
    make: Callable[[], OptionsT],
    environ: Mapping[str, str],
    names: Mapping[str, str],
    flags: Mapping[str, str],
    required: str,
) -> OptionsT:
    """Options for a ``.tac`` file, from ``TM3_*`` variables: ``names`` maps a
    variable to the option it sets, ``flags`` a variable to a flag it sets
    when it is 1, yes or true. ``required`` says which variables must be set.

    Raises ``usage.UsageError`` naming the variable when one is malformed."""
    argv = argv_from_env(environ, names)
    for var, flag in flags.items():
        value = environ.get(var, "").strip().lower()
        if value in ("1", "yes", "true"):
            argv.append("--" + flag)
        elif value not in ("", "0", "no", "false"):
            raise usage.UsageError(f"{var}={environ[var]!r}: use 1, yes or true to set --{flag}, 0, no or false not to")
    config = make()
    try:
        config.parseOptions(argv)
    except usage.UsageError as e:
        text = str(e)
        for var, option in names.items():  # name the one variable at fault
            if text.startswith((f"--{option} ", f"--{option}:")):
                if var in environ:
                    raise usage.UsageError(f"{var}={environ[var]!r}: {text}") from None
                raise usage.UsageError(f"{var} is not set: {text}") from None
        set_names = ", ".join(f"{k}={environ[k]!r}" for k in names if k in environ) or "none set"
        raise usage.UsageError(f"{e} (from the environment: {set_names}; {required})") from None
    return config


# The tuning options both proxies take, in usage.Options' optParameters form;
# what "queued" means is said from the RP's side (the LP's peer is a client).
TUNING_PARAMETERS: list[list[Any]] = [
    ["max-payload", None, str(DEFAULT_PAYLOAD), f"Payload bytes per DATA message sent on the pipes (1..{MAX_PAYLOAD}); "
     "the reference LP is only known to handle 4096."],
    ["connect-timeout", None, "10", "Seconds to wait for a connect before reporting failure (0 < s <= 3600)."],
    ["conn-queue", None, "4MiB", "v1: bytes queued for one slow socket before all pipes pause (64KiB..1GiB); "
     "a v2 connection is bounded by its window instead."],
    ["total-queue", None, "64MiB", "v1: bytes queued for all sockets before all pipes pause (64KiB..16GiB)."],
    ["stall-timeout", None, "10", "Seconds a socket may take none of its queue while the queues keep every pipe "
     "paused; then that connection is reset (0 < s <= 3600)."],
    ["drain-timeout", None, "10", "On SIGTERM (stop): seconds the open connections may take to finish while no new "
     "ones are taken; then they are reset. 0: reset at once (0..86400)."],
    ["max-connections", None, "16384", "Connections open at once: per session on the RP (more SYNs get FIN 0x99), "
     "for the whole LP (more clients are refused); 0: no limit (0..65536)."],
    ["fd-reserve", None, str(DEFAULT_FD_RESERVE), "File descriptors kept free for pipes' needs beyond their own, "
     "logs, DNS and metrics: client (LP) or server (RP) sockets stop at RLIMIT_NOFILE less what is open at start, "
     "room for the pipes and this (16..65536)."],
    ["half-close-timeout", None, "120", "Seconds a connection waits for the peer's FIN after sending ours; then "
     "it is given up (socket reset, id freed). 0: no limit (0..86400)."],
    ["idle-timeout", None, "0", "Seconds a connection may move no byte either way before it is reset; 0: off "
     "(0..86400)."],
    ["initial-window", None, "256KiB", "v2: payload bytes the peer may send on a connection before our first CREDIT "
     "(4KiB..1GiB)."],
    ["max-window", None, "16MiB", "v2: the most a connection's window grows to (--initial-window..1GiB)."],
    ["session-window", None, "64MiB", "v2: how far all connections' windows may grow past --initial-window "
     "together (0..64GiB)."],
    ["pipe-lowat", None, "32KiB", "Late binding: unsent bytes the kernel may hold per pipe (TCP_NOTSENT_LOWAT), and "
     "the batch a pipe is given when it can send (4KiB..16MiB)."],
    ["pipe-scheduler", None, "delivery", "Which pipe gets a batch: 'delivery' (earliest expected delivery, from "
     "TCP_INFO) or 'rotation' (round robin)."],
    ["pipe-congestion", None, "", "TCP congestion control for the pipes (e.g. bbr, cubic; one of "
     "/proc/sys/net/ipv4/tcp_available_congestion_control); default: the system's."],
    ["send-order", None, "least-served", "Which connection's bytes go next: 'least-served' (fewest bytes sent so "
     "far, one pick in 8 for the longest waiting) or 'arrival' (the longest waiting)."],
    ["send-queue", None, "256KiB", "Bytes one connection may queue for the pipes before its socket is paused "
     "(64KiB..1GiB; payload bytes)."],
    ["total-send-queue", None, "16MiB", "Bytes all connections may queue for the pipes before sockets are paused "
     "(1MiB..16GiB; likewise)."],
    ["reorder-window", None, "64MiB", "Bytes one connection may hold for a sequence gap (1MiB..16GiB); more is a protocol error."],
    ["total-reorder-window", None, "256MiB", "Bytes all connections may hold for gaps (1MiB..64GiB); more is a protocol error."],
]  # fmt: skip


# What both proxies show of themselves: metrics, the log's format, the summary line.
OBSERVE_PARAMETERS: list[list[Any]] = [
    ["metrics", None, None, "Serve Prometheus metrics at /metrics on this server endpoint, like "
     "tcp:9100:interface=127.0.0.1 (default: off)."],
    ["log-format", None, "text", "How the log is written: 'text' (twistd's lines) or 'json' (one JSON object per "
     "line on standard output, each event's fields as keys)."],
    ["summary-interval", None, "60", "Seconds between the summary lines in the log (pipes up, connections open, "
     "bytes and rates each way); 0: none, only the one at exit (0..86400)."],
]  # fmt: skip


def parse_observe(config: usage.Options) -> None:
    """Check and convert the :data:`OBSERVE_PARAMETERS` in place, and under
    twistd make it log in ``--log-format``."""
    if config["metrics"] is not None:
        check_server_endpoint("metrics", config["metrics"])
    config["log-format"] = parse_choice("log-format", config["log-format"], LOG_FORMATS)
    text = config["summary-interval"]
    try:
        interval = float(str(text))
    except ValueError:
        interval = -1.0
    if not 0 <= interval <= 86400:
        raise usage.UsageError(f"--summary-interval must be a number of seconds in 0..86400 (0: off), not {text!r}")
    config["summary-interval"] = interval
    use_log_format(config, config["log-format"])


# Each tuning option's environment variable for the .tac files: TM3_ and the
# option's name in capitals (--pipe-lowat: TM3_PIPE_LOWAT).
TUNING_ENVIRONMENT = {"TM3_" + p[0].upper().replace("-", "_"): p[0] for p in TUNING_PARAMETERS}


def parse_tuning(config: usage.Options) -> None:
    """Check and convert the :data:`TUNING_PARAMETERS` in place."""
    config["max-payload"] = parse_size("max-payload", config["max-payload"], 1, MAX_PAYLOAD)
    config["connect-timeout"] = parse_seconds("connect-timeout", config["connect-timeout"], 0, 3600)
    config["conn-queue"] = parse_size("conn-queue", config["conn-queue"], 64 * 1024, 1024**3)
    config["total-queue"] = parse_size("total-queue", config["total-queue"], 64 * 1024, 16 * 1024**3)
    config["stall-timeout"] = parse_seconds("stall-timeout", config["stall-timeout"], 0, 3600)
    config["drain-timeout"] = parse_seconds_or_off("drain-timeout", config["drain-timeout"], 86400)
    config["max-connections"] = parse_int("max-connections", config["max-connections"], 0, 65536)
    config["fd-reserve"] = parse_int("fd-reserve", config["fd-reserve"], 16, 65536)
    config["half-close-timeout"] = parse_seconds_or_off("half-close-timeout", config["half-close-timeout"], 86400)
    config["idle-timeout"] = parse_seconds_or_off("idle-timeout", config["idle-timeout"], 86400)
    config["initial-window"] = parse_size("initial-window", config["initial-window"], 4096, 1024**3)
    config["max-window"] = parse_size("max-window", config["max-window"], config["initial-window"], 1024**3)
    config["session-window"] = parse_size("session-window", config["session-window"], 0, 64 * 1024**3)
    config["pipe-lowat"] = parse_size("pipe-lowat", config["pipe-lowat"], 4096, 16 * 1024**2)
    config["pipe-scheduler"] = parse_choice("pipe-scheduler", config["pipe-scheduler"], PIPE_ORDERS)
    config["pipe-congestion"] = parse_congestion("pipe-congestion", config["pipe-congestion"])
    config["send-order"] = parse_choice("send-order", config["send-order"], tuple(SEND_ORDERS))
    config["send-queue"] = parse_size("send-queue", config["send-queue"], 64 * 1024, 1024**3)
    config["total-send-queue"] = parse_size("total-send-queue", config["total-send-queue"], 1024**2, 16 * 1024**3)
    config["reorder-window"] = parse_size("reorder-window", config["reorder-window"], 1024**2, 16 * 1024**3)
    config["total-reorder-window"] = parse_size(
        "total-reorder-window", config["total-reorder-window"], 1024**2, 64 * 1024**3
    )


def settings_from(config: usage.Options) -> Settings:
    return Settings(
        max_payload=config["max-payload"],
        connect_timeout=config["connect-timeout"],
        conn_queue_limit=config["conn-queue"],
        total_queue_limit=config["total-queue"],
        stall_timeout=config["stall-timeout"],
        half_close_timeout=config["half-close-timeout"],
        max_connections=config["max-connections"],
        fd_reserve=config["fd-reserve"],
        drain_timeout=config["drain-timeout"],
        idle_timeout=config["idle-timeout"],
        initial_window=config["initial-window"],
        max_window=config["max-window"],
        session_window=config["session-window"],
        window_bytes=config["reorder-window"],
        total_window_bytes=config["total-reorder-window"],
        pipe_lowat=config["pipe-lowat"],
        pipe_scheduler=config["pipe-scheduler"],
        pipe_congestion=config["pipe-congestion"],
        send_share=SEND_ORDERS[config["send-order"]],
        send_queue=config["send-queue"],
        total_send_queue=config["total-send-queue"],
    )


def read_key_file(option: str, path: str) -> bytes:
    """The shared key in the file at ``path`` (tm3/core/handshake.py), or a
    usage error naming the option."""
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except OSError as e:
        raise usage.UsageError(f"--{option}: cannot read {path!r}: {e.strerror}") from None
    try:
        return load_key(data, repr(path))
    except ValueError as e:
        raise usage.UsageError(f"--{option}: {e}") from None


def check_server_endpoint(
    option: str, description: str, build: Callable[[Any, str], object] = endpoints.serverFromString
) -> None:
    """A usage error unless ``description`` is a server endpoint string that
    ``build`` takes; one naming the file when a ``tls:`` file is bad."""
    reactor = default_reactor()
    try:
        build(reactor, description)
    except BadTLSFile as e:
        raise usage.UsageError(f"--{option}: {e}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise usage.UsageError(f"--{option}: not a server endpoint string: {description!r} ({e})") from None


def check_client_endpoint(option: str, description: str) -> None:
    """A usage error unless ``description`` is a Twisted client endpoint string."""
    reactor = default_reactor()
    try:
        endpoints.clientFromString(reactor, description)
    except (ValueError, KeyError, TypeError, ImportError) as e:
        raise usage.UsageError(f"--{option}: not a client endpoint string: {description!r} ({e})") from None
