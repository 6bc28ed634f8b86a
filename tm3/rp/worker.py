"""A worker of a ``--workers N`` RP: where its pipes come from.

A worker is the RP's own service (tm3/rp/tap.py: a Multiplexer and a
PipeFactory) with a :class:`PipeReceiver` where the listening port would be.
The front (tm3/rp/front.py) accepts each pipe, learns from its first bytes
which worker gathers its set (tm3/rp/routing.py), and passes the connected
socket over a Unix socket (``SOCK_SEQPACKET``, one message a pipe: the
front's verdict as the data, the socket as ``SCM_RIGHTS``). The receiver
adopts it as a pipe; the front has only peeked, so every byte the LP sent is
still in the socket.

The front starts each worker as ``twistd -n --pidfile= tm3rp`` with its own
options, and says in :data:`WORKER_ENV` which worker it is and on which
descriptor the front's socket is. When that socket ends (the front is gone),
the worker stops as on SIGTERM: it takes no new connections and drains.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable, Mapping
from typing import Any

from attrs import frozen
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from tm3.logs import RateLimit
from tm3.rp.routing import VERDICTS

#: ``INDEX:FD``: set by the front for each worker it starts (never by hand).
WORKER_ENV = "TM3RP_WORKER"
#: A verdict is a few bytes; a message with more is not from our front.
MAX_TAG = 64
#: Messages taken per reactor turn, so a burst of pipes cannot starve the rest.
BATCH = 64


@frozen
class WorkerRole:
    index: int  # 1..N, as the logs say it ("worker 2: ...")
    fd: int  # the front's Unix socket


def worker_from_env(environ: Mapping[str, str]) -> WorkerRole | None:
    """The role :data:`WORKER_ENV` gives this process, if any."""
    text = environ.get(WORKER_ENV)
    if not text:
        return None
    index, _, fd = text.partition(":")
    try:
        return WorkerRole(int(index), int(fd))
    except ValueError:
        raise ValueError(f"{WORKER_ENV}={text!r} is not INDEX:FD (it is set by a --workers front)") from None


class PipeReceiver(Service):
    """Takes the pipes the front passes on the Unix socket ``fd`` and hands
    each to ``adopt(fd, family, verdict)``; ``front_gone`` when the front
    has closed its end."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorFDSet,
        fd: int,
        adopt: Callable[[int, int, str], object],
        front_gone: Callable[[], object],
    ) -> None:
        self.reactor = reactor
        self.channel = socket.socket(fileno=fd)
        self.channel.setblocking(False)
        self.adopt = adopt
        self.front_gone = front_gone
        self._reader = _Reader(self)
        self.received = 0  # pipes adopted
        self.taken = 0  # messages read from the front, a pipe each
        self._truncated = RateLimit()

    def startService(self) -> None:
        super().startService()
        self.reactor.addReader(self._reader)
        self.log.info("taking pipes from the front")

    def stopService(self) -> None:
        super().stopService()
        self.reactor.removeReader(self._reader)

    def read(self) -> None:
        taken = self.taken
        try:
            self._read()
        finally:
            if self.taken != taken:
                self._tell_taken()

    def _tell_taken(self) -> None:
        """Tell the front how many pipes we have taken, so that it can say
        how many died unread with us; lost when it cannot be sent now (the
        next count says it)."""
        try:
            self.channel.send(str(self.taken).encode())
        except OSError:
            pass

    def _read(self) -> None:
        for _ in range(BATCH):
            try:
                data, fds, flags, _addr = socket.recv_fds(self.channel, MAX_TAG, 1)
            except BlockingIOError:
                return
            except OSError as e:
                self._gone(f"its socket failed: {e.strerror}")
                return
            if not data and not fds:
                self._gone("it closed its socket")
                return
            self.taken += 1
            if flags & socket.MSG_CTRUNC and self._truncated.allow():
                # The kernel dropped the descriptor: we are at our descriptor limit.
                self.log.warn(
                    "a pipe from the front was lost: its descriptor did not fit (out of descriptors?)",
                    suppressed=self._truncated.take_suppressed(),
                )
            for fd in fds:
                try:
                    self._take(fd, data.decode("ascii", "replace"))
                except Exception as e:  # a bug in taking one pipe must not stop us taking the rest
                    self.log.warn("a pipe from the front could not be taken: {why!r}; closed", why=e)
                finally:
                    os.close(fd)

    def _take(self, fd: int, verdict: str) -> None:
        if verdict not in VERDICTS:
            self.log.warn("a pipe from the front with an unknown verdict {verdict!r}: closed", verdict=verdict)
            return
        probe = socket.socket(fileno=fd)
        family = probe.family
        probe.detach()
        if family not in (socket.AF_INET, socket.AF_INET6):
            self.log.warn("a pipe from the front that is not a TCP socket: closed")
            return
        os.set_blocking(fd, False)
        self.received += 1
        try:
            self.adopt(fd, family, verdict)
        except OSError as e:  # gone before we got to it (getpeername fails)
            self.log.info("a pipe from the front was gone before it could be taken: {why}", why=e.strerror)

    def _gone(self, why: str) -> None:
        self.reactor.removeReader(self._reader)
        if self.running:
            self.log.warn("the front is gone ({why}): stopping", why=why)
            self.front_gone()


@implementer(IReadDescriptor)
class _Reader:
    def __init__(self, receiver: PipeReceiver) -> None:
        self.receiver = receiver

    def fileno(self) -> int:
        return self.receiver.channel.fileno()

    def doRead(self) -> None:
        self.receiver.read()

    def connectionLost(self, reason: Failure) -> None:
        # The reactor dropped us (read() raised): a worker that no longer
        # reads its socket would hold its pipes unread for good; it ends
        # instead, and the front starts it again.
        self.receiver._gone(f"reading its socket failed: {reason.getErrorMessage()}")

    def logPrefix(self) -> str:
        return "PipeReceiver"


class StopOnce:
    """Stops the reactor the first time it is called, and ignores the rest.

    A worker is told to stop by its front (SIGTERM), by the front's end (its
    socket closes), and, under systemd's default ``KillMode=control-group``,
    by systemd's own SIGTERM as well; a front by a second SIGTERM or ^C while
    its workers drain. twistd's handler would call ``reactor.stop()`` again,
    which raises. :meth:`install` (once the reactor runs: it installs its own
    handlers as it starts) puts this in their place, for SIGTERM and SIGINT."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.asked = False

    def __call__(self) -> None:
        if not self.asked:
            self.asked = True
            self.reactor.stop()

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda signum, frame: self.reactor.callFromThread(self))
