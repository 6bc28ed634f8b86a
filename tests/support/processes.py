"""Child processes for tests and benchmarks: where the checkout and ``twistd``
are, the environment a child gets, and a child whose output can be awaited.

- :data:`REPO_ROOT`, :data:`TWISTD`, :data:`CURL`, and :data:`LISTENING`, the
  line ``twistd`` logs with its port.
- :func:`python_env`: this environment with the checkout first on
  ``PYTHONPATH`` (for ``python -m tm3...`` in any directory or namespace);
  :func:`clean_env`: this environment without ``TM3_*`` variables, so a
  developer's settings cannot leak into a ``twistd`` under test.
- :class:`Proc` and :func:`spawn`: a child in the reactor whose output is
  collected and matched (``await proc.when_output(regex)``).
- :func:`curl`: ``curl`` with no ``~/.curlrc`` and no proxy variables.
- :func:`cpu_seconds`: a process's CPU time so far (Linux ``/proc``).
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue

from tests.support.waiting import Event, reactor

#: The checkout under test.
REPO_ROOT = Path(__file__).resolve().parents[2]
#: The ``twistd`` of the Python running the tests.
TWISTD = str(Path(sys.executable).parent / "twistd")
CURL = "/usr/bin/curl"
#: What ``twistd`` logs once it listens on TCP at 127.0.0.1; group 1 is the port.
LISTENING = rb"listening on IPv4Address\(type='TCP', host='127\.0\.0\.1', port=(\d+)\)"


def python_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without ``TM3_*`` variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TM3_")}
    env.update(extra or {})
    return env


class Proc(ProcessProtocol):
    """A child process whose output is collected and can be awaited."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended = Event()
        self._patterns: list[tuple[re.Pattern[bytes], Event]] = []

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._check()

    errReceived = outReceived

    def _check(self) -> None:
        # Firing runs the waiter at once, which may call when_output (and so
        # this) again: take each pattern out before firing it, and keep the
        # ones added meanwhile.
        for entry in list(self._patterns):
            m = entry[0].search(self.output)
            if m and entry in self._patterns:
                self._patterns.remove(entry)
                entry[1].fire(m)

    def when_output(self, regex: bytes) -> defer.Deferred[Any]:
        """Fires with the match once the output (stdout and stderr) matches."""
        ev = Event()
        self._patterns.append((re.compile(regex), ev))
        self._check()
        return ev.wait()

    def processEnded(self, reason: Any) -> None:
        self.ended.fire(reason.value)

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")


def spawn(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Proc:
    """Start ``argv`` in the checkout with :func:`clean_env` plus ``env``."""
    proc = Proc()
    reactor().spawnProcess(proc, argv[0], list(argv), env=clean_env(env), path=str(REPO_ROOT))
    return proc


def curl(*args: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
    """``curl ARGS`` -> (stdout, stderr, exit code). ``-q`` ignores
    ``~/.curlrc``, and a minimal environment leaves no ``*_proxy`` or
    ``NO_PROXY`` variable to route the request around a proxy under test."""
    return getProcessOutputAndValue(CURL, ["-q", *args], env={"PATH": "/usr/bin:/bin"}, reactor=reactor())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll ``predicate`` (blocking, every 50 ms) until it holds, or fail
    naming ``what``: for tests that drive child processes, not the reactor."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
