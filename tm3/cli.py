"""What TM3's command lines say about themselves: the version, usage errors,
and a proxy that cannot start.

- :func:`version` is the installed package's version (its metadata, the one
  ``pip`` and ``pyproject.toml`` know), for every ``--version``.
- :class:`ProxyOptions` is the base of the ``tm3rp`` and ``tm3lp`` options.
  Under ``twistd``, a usage error is printed as one line, then a one-line hint,
  and ``twistd`` exits with :data:`EXIT_USAGE`. Twistd's own handler
  (``twisted.application.app.run``) prints the whole ``--help`` text first and
  the error last; parsed anywhere else (a ``.tac`` file, a test), the
  ``UsageError`` is raised as usual, for the caller to report.
- :func:`cannot_start` ends a proxy that cannot do its job (a port in use,
  iptables refusing its rules) with one line instead of a traceback.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any, NoReturn

from twisted.python import usage

import tm3
import twisted

#: Exit status for a usage error: the command line (or a ``TM3_*``
#: variable) is wrong, so restarting will not help (systemd units say
#: ``RestartPreventExitStatus=2``).
EXIT_USAGE = 2


def version() -> str:
    """TM3's version from the installed package's metadata; ``tm3.__version__``
    (marked so) when TM3 runs from a checkout that was never installed."""
    try:
        return metadata.version("tm3")
    except metadata.PackageNotFoundError:
        return f"{tm3.__version__} (not installed)"


def version_line(prog: str) -> str:
    """``PROG (TM3) VERSION``, the line every ``--version`` prints."""
    return f"{prog} (TM3) {version()}"


class ProxyOptions(usage.Options):
    """``usage.Options`` with TM3's ``--version`` and short usage errors."""

    #: The twistd command (the plugin's tapname).
    command = "tm3"

    def opt_version(self) -> NoReturn:
        """Print TM3's version and exit."""
        print(version_line(self._prog()))
        print(f"Twisted {twisted.__version__}, Python {sys.version.split()[0]}")
        sys.exit(0)

    def _prog(self) -> str:
        return f"twistd {self.command}"

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:  # a .tac file or a test: the caller reports it
                raise
            prog = self._prog()
            sys.stderr.write(f"{prog}: {e}\n(`{prog} --help` lists the options)\n")
            sys.exit(EXIT_USAGE)


def cannot_start(prog: str, what: str) -> NoReturn:
    """Stop a starting proxy with the one line ``PROG: WHAT``.

    Called from ``startService``, under ``twistd`` or from a ``.tac`` file:
    ``SystemExit`` with a message goes past twistd's handlers, and Python
    writes the message to ``sys.stderr``, which twistd has by then turned
    into its log (the terminal or journal with ``-n``, else the log file),
    and exits with status 1; a service manager may retry (the port may be
    free by then)."""
    raise SystemExit(f"{prog}: {what}")


def os_reason(error: BaseException) -> str:
    """``address already in use`` from ``[Errno 98] Address already in use``."""
    text = str(getattr(error, "strerror", None) or error)
    if len(text) > 1 and text[1].isupper():  # an acronym: EOF, TLS
        return text
    return text[:1].lower() + text[1:]
