"""What the proxies' logs look like: ``--log-format`` (text or JSON lines),
the level they show (info and up), Twisted's own start-up noise left out,
and two helpers for the lines themselves (:func:`plural`, :class:`RateLimit`).

Under ``twistd``, :func:`use_log_format` hands twistd (before it starts
logging) an observer factory: twistd's own observer for ``text`` (so
``--logfile``, ``--syslog`` and ``-n`` mean what they always mean), or one
JSON object per line on standard output for ``json``; either way behind a
filter that drops debug events and the listening ports' ``Foo starting on
6000`` / ``(TCP Port 6000 Closed)`` lines (``listening on ...`` says it
already). A ``.tac`` file sets the same observer as the application's
``ILogObserver`` (:func:`tac_observer`).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
)
from twisted.python import log as legacy_log
from zope.interface import implementer

LOG_FORMATS = ("text", "json")

# Keys the legacy log system adds to an event (twisted.logger._legacy); the
# JSON line carries the event's own fields, not these.
_LEGACY_KEYS = frozenset({"message", "format", "isError", "system", "time", "why", "failure"})
# Listening ports' legacy lines: our ListeningService says where it listens.
_PORT_NOISE = re.compile(r"^(\S+ starting on \S+|\(\S+ Port \S+ Closed\)|(Starting|Stopping) factory .*)$")


def plural(n: int, word: str) -> str:
    """``1 pipe``, ``2 pipes``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class RateLimit:
    """At most one line per ``interval`` seconds of a kind that can flood:
    :meth:`allow` says whether to log now, and :attr:`suppressed` how many
    were left out since the last line (log it with the line)."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.suppressed = 0
        self._last = -interval

    def allow(self) -> bool:
        now = self.clock()
        if now - self._last < self.interval:
            self.suppressed += 1
            return False
        self._last = now
        return True

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n

    def level(self) -> tuple[LogLevel, str]:
        """For lines of a kind that stays at debug when it floods: info (and
        how many went to debug since the last) once per interval, else debug."""
        if not self.allow():
            return LogLevel.debug, ""
        n = self.take_suppressed()
        return LogLevel.info, f" ({n} more since the last such line, at debug)" if n else ""


@implementer(ILogObserver)
class JsonLines:
    """One JSON object per event and line: ``time`` (ISO 8601, UTC),
    ``level``, ``namespace``, ``text`` (the formatted line), then the event's
    own fields (``conn_id``, ``host``, ``how``, ...) as keys; a failure's
    traceback as ``traceback``."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: LogEvent) -> None:
        self.out.write(event_as_json(event) + "\n")
        self.out.flush()


def event_as_json(event: LogEvent) -> str:
    level = event.get("log_level")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", time.time()), UTC).isoformat(timespec="milliseconds"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "text": formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY_KEYS or key in record:
            continue
        record[key] = value
    return json.dumps(record, default=repr)


@implementer(ILogFilterPredicate)
class _NotNoise:
    def __call__(self, event: LogEvent) -> Any:
        if "message" in event or "log_io" in event:  # a legacy line
            if _PORT_NOISE.match(formatEvent(event)):
                return PredicateResult.no
        return PredicateResult.maybe


# A worker of a --workers RP (tm3/rp/worker.py) says which it is on every line.
_label = ""


def set_label(label: str) -> None:
    """Begin every line of this process with ``LABEL: `` (and give JSON
    lines a ``process`` field): set before twistd starts logging."""
    global _label
    _label = label


@implementer(ILogObserver)
class _Labelled:
    def __init__(self, observer: ILogObserver, label: str) -> None:
        self.observer = observer
        self.label = label

    def __call__(self, event: LogEvent) -> None:
        text = event.get("log_format")
        if text is not None and "message" not in event:  # ours, not a legacy line
            event = {**event, "log_format": f"{self.label}: {text}", "process": self.label}
        self.observer(event)


def filtered(observer: ILogObserver, level: LogLevel = LogLevel.info) -> ILogObserver:
    """``observer`` behind the level filter and without the ports' noise
    (and with this process's label, if it has one)."""
    if _label:
        observer = _Labelled(observer, _label)
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level), _NotNoise()])


def _as_new_style(observer: Any) -> ILogObserver:
    if ILogObserver.providedBy(observer):
        return observer  # type: ignore[no-any-return]
    assert legacy_log.ILogObserver.providedBy(observer) or callable(observer)
    return LegacyLogObserverWrapper(observer)


# twistd's options, for twistd_text_observer (set by use_log_format).
_twistd_options: Any = None


def use_log_format(config: Any, log_format: str) -> None:
    """Under ``twistd`` (``config.parent`` is twistd's options): make twistd
    log through our observer, unless ``--logger`` chose one. (twistd takes
    ``--logger`` as a name to import, after our options are parsed.)"""
    global _twistd_options
    parent = getattr(config, "parent", None)
    if parent is None or parent.get("logger"):
        return
    _twistd_options = parent
    parent["logger"] = f"{__name__}.{'json' if log_format == 'json' else 'twistd_text'}_observer"


def json_observer() -> ILogObserver:
    """JSON lines on standard output, info and up."""
    return filtered(JsonLines(sys.stdout))


def twistd_text_observer() -> ILogObserver:
    """twistd's own observer (``--logfile``, ``--syslog``), info and up."""
    from twisted.scripts.twistd import _SomeApplicationRunner  # type: ignore[attr-defined]

    return filtered(_as_new_style(_SomeApplicationRunner.loggerFactory(_twistd_options)._getLogObserver()))


def tac_observer(log_format: str) -> ILogObserver | None:
    """The ``ILogObserver`` a ``.tac`` file sets for ``TM3_LOG_FORMAT``: JSON
    lines on standard output, or ``None`` for text (twistd's own observer,
    so ``--logfile`` still works)."""
    return json_observer() if log_format == "json" else None
