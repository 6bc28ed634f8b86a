"""One carried application connection: what the session knows of it.

Each field has one owner, named in the comments: the life cycle
(:mod:`tm3.core.lifecycle`) decides what may happen next, the inbound half
(pipes -> socket, :mod:`tm3.mux.inbound`) owns the reorder buffer and the
queue of bytes the socket has not taken, the outbound half (socket -> pipes,
:mod:`tm3.mux.outbound`) owns the send sequence number, the read pause and
the send credit (version 2).
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from tm3.core.credit import ReceiveWindow
from tm3.core.lifecycle import Event, Lifecycle, State
from tm3.core.reorder import HeldBudget, ReorderBuffer
from tm3.core.wire import Message

if TYPE_CHECKING:
    from tm3.mux.stream import StreamProtocol


class OutControl:
    """A SYN or FIN waiting in a connection's outbound queue: encoded with
    the connection's next sequence number when it is bound to a pipe."""

    __slots__ = ("syn", "reason")

    def __init__(self, syn: bytes = b"", reason: int = 0) -> None:
        self.syn = syn  # the encoded SYN (always seq 0), or b"" for a FIN
        self.reason = reason  # the FIN's reason


# Version 1 has no window: the send credit never runs out.
UNLIMITED = 1 << 62


class Connection:
    __slots__ = (
        "conn_id", "host", "port", "started", "life", "stream",
        "rx", "queue", "queued", "shut_pending", "bytes_in",
        "tx_seq", "read_paused", "bytes_out", "out", "out_offset", "out_bytes", "served",
        "rwin", "credit", "credit_blocked", "backlog", "held_event",
        "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        conn_id: int,
        host: str,
        port: int,
        window_bytes: int,
        budget: HeldBudget,
        state: State = State.CONNECTING,
        rwin: ReceiveWindow | None = None,
        credit: int = UNLIMITED,
    ) -> None:
        self.conn_id = conn_id
        self.host = host
        self.port = port
        self.started = time.monotonic()
        self.life = Lifecycle(state, v2=rwin is not None)
        # The socket while it is up and ours to use (session: attach, reset).
        self.stream: StreamProtocol | None = None
        # Inbound: messages from the pipes, and bytes the socket has not taken.
        self.rx: ReorderBuffer[Message] = ReorderBuffer(0, window_bytes, budget)
        self.queue: deque[bytes] = deque()
        self.queued = 0  # what the queue costs: payload plus QUEUE_CHUNK_OVERHEAD a chunk
        self.shut_pending = False  # half-close the socket once the queue is written
        self.bytes_in = 0  # payload from the pipes, written to the socket
        self.rwin = rwin  # version 2: what we let the peer send (and grant as the socket takes it)
        # Outbound: bytes from the socket, queued until a pipe can send them
        # (late binding), then framed: the sequence number is taken when a
        # message is bound to a pipe, so what is dropped from the queue (a
        # reset) leaves no gap.
        self.tx_seq = 0
        self.read_paused = 0  # why the socket is not read: PAUSE_* bits (outbound)
        self.bytes_out = 0  # read from the socket
        self.out: deque[bytes | OutControl] = deque()  # payload chunks, a SYN or FIN at the end
        self.out_offset = 0  # how much of out[0] (payload) is already framed
        self.out_bytes = 0  # payload queued in ``out``
        self.served = 0  # payload bound to pipes (the scheduler's attained service)
        # Version 2: payload bytes the peer lets us send; what the socket
        # brought past that waits in the backlog (one read at most), with
        # the socket paused; its EOF or orderly close waits behind it.
        self.credit = credit
        self.credit_blocked = False
        self.backlog = b""
        self.held_event: Event | None = None  # SOCKET_EOF or SOCKET_CLOSED, fed once the backlog is out

    def __repr__(self) -> str:
        return f"<Connection {self.conn_id} {self.host}:{self.port} {self.life.state.value}>"
