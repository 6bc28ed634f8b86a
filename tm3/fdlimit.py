"""The process's file descriptors: what is left of ``RLIMIT_NOFILE`` for
client and server sockets, so that pipes never meet the limit.

At the limit, ``accept()`` fails with EMFILE and Twisted closes the new
socket at once (with a spare descriptor it keeps for that), and a pipe that
reconnects or a server connect fails: every session suffers for the sockets
of a few clients. So each proxy keeps the sockets it opens for others under
a ceiling of its own, computed once it listens:

    ceiling = RLIMIT_NOFILE - what is open at start - room for pipes - --fd-reserve

(room for pipes: 2 sets of ``--pipes`` on the LP, which redials a set while
the old one may still close; ``--max-pending-pipes`` plus the sessions' pipes
on the RP.) At the ceiling the LP stops accepting clients (they wait in the
kernel's backlog; it resumes below 95% of it) and the RP refuses new
connections (FIN 0x99, ``how`` "fd-limit"); pipes and open connections go on.

Both proxies first raise their soft limit to the hard one (as Go programs
do): 1024, Debian's soft default, would otherwise cap a proxy that systemd
or the shell let have far more.
"""

from __future__ import annotations

import os
import resource

from attrs import define

#: Descriptors kept free by default for what neither side counts: log files,
#: DNS sockets, metrics scrapes, the reactor's own.
DEFAULT_FD_RESERVE = 64
#: Accepting resumes once the sockets in use fall below this share of the ceiling.
RESUME_AT = 0.95
#: A ceiling below this is logged as a warning: the limit leaves little room
#: (raise LimitNOFILE / ulimit -n, or lower --pipes, --max-pending-pipes or --fd-reserve).
LOW_CEILING = 100


def raise_soft_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one where it can;
    ``(before, after)``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= soft:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard


def soft_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def open_fds() -> int:
    """Descriptors open in this process now (0 where /proc is not there)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less listdir's own
    except OSError:
        return 0


def start_ceiling(reserve: int, pipes: int) -> tuple[FdCeiling, str]:
    """Raise the soft limit, then the ceiling for a proxy that has started
    listening; with the words for its log line."""
    before, after = raise_soft_limit()
    raised = f", raised from {before}" if after != before else ""
    return FdCeiling.at_start(reserve, pipes), f"RLIMIT_NOFILE {after}{raised}; --fd-reserve {reserve}"


@define
class SocketCount:
    """Sockets of one kind open now (the RP's server sockets: one from the
    connect until the connect fails or the connection is lost)."""

    n: int = 0


@define
class FdCeiling:
    """The sockets a proxy may open for clients or servers, and whether it
    stopped taking new ones: :meth:`update` with the count in use says when
    to stop (``"full"``) and when to start again (``"room"``)."""

    ceiling: int
    full: bool = False

    @classmethod
    def at_start(cls, reserve: int, pipes: int, limit: int | None = None, in_use: int | None = None) -> FdCeiling:
        """The ceiling for a process that has ``in_use`` descriptors open
        (its listeners, logs, reactor) and needs room for ``pipes`` more."""
        limit = soft_limit() if limit is None else limit
        in_use = open_fds() if in_use is None else in_use
        return cls(max(1, limit - in_use - pipes - reserve))

    def has_room(self, in_use: int) -> bool:
        return in_use < self.ceiling

    def update(self, in_use: int) -> str | None:
        if not self.full and in_use >= self.ceiling:
            self.full = True
            return "full"
        if self.full and in_use < max(1, int(self.ceiling * RESUME_AT)):
            self.full = False
            return "room"
        return None
