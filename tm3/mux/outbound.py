"""The outbound half of a session: sockets -> pipes.

Bytes read from a connection's socket are cut into DATA messages of at most
``max_payload`` bytes, numbered with the connection's send sequence, and
handed to the pipe scheduler (:class:`~tm3.mux.pipes.PipeSet`), which puts
each whole message on one pipe that is not blocked.

Version 2 adds a window per connection (:mod:`tm3.core.credit`): a socket
that brings more than the peer's credit allows keeps the rest in the
connection's backlog and is not read again until the peer's CREDIT lets the
backlog out; its EOF waits behind the backlog, so the FIN follows the bytes.

Download backpressure: when every pipe is blocked there is nowhere to put
more, so the session stops reading sockets. Pausing all of them at that
moment would cost O(connections) on every blip, so it is lazy: the sockets
that sent since the pipes were last all blocked (``recent``) are paused at
once, and any other socket as soon as it brings a read. Sockets that were
quiet can each still bring one read, which a broad burst over many sockets
could add up; past ``OVERDRAFT_LIMIT`` bytes read while blocked, all are
paused at once. All resume as soon as one pipe can take messages again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tm3.core.lifecycle import State
from tm3.core.wire import HEADER, REASON_FIN, SEQ_MASK, encode_credit, encode_fin
from tm3.mux.connection import Connection
from tm3.mux.pipes import PipeProtocol, PipeSet

if TYPE_CHECKING:
    from tm3.mux.session import Session

MiB = 1024 * 1024
# Past this many bytes read from sockets while every pipe is blocked, stop
# reading all sockets at once (see the module doc). Sockets the epoll reactor
# already found ready in the same poll still get their one read.
OVERDRAFT_LIMIT = 1 * MiB

_OPEN = State.OPEN
_OPEN_PEER_DONE = State.OPEN_PEER_DONE


class Outbound:
    def __init__(self, session: Session, pipes: Sequence[PipeProtocol]) -> None:
        self.session = session
        self.stats = session.stats
        self.max_payload = session.settings.max_payload
        self.pipes = PipeSet(pipes, session.reactor, self._all_blocked, self._unblocked)
        self.paused: set[Connection] = set()
        self.recent: set[Connection] = set()
        self.overdraft = 0  # socket bytes read while every pipe was blocked
        self.paused_all = False

    def socket_data(self, conn: Connection, data: bytes) -> None:
        state = conn.life.state
        if state is not _OPEN and state is not _OPEN_PEER_DONE:
            return  # we have sent our FIN: nothing more goes out
        n = len(data)
        conn.bytes_out += n
        self.stats.bytes_to_pipes += n
        if n > conn.credit or conn.backlog:
            self._past_credit(conn, data)
        else:
            conn.credit -= n
            self._frame(conn, data)
        if self.pipes.unblocked == 0:
            self.pause_reader(conn)
            self.overdraft += n
            if self.overdraft > OVERDRAFT_LIMIT and not self.paused_all:
                self._pause_all()
        else:
            self.recent.add(conn)

    def _frame(self, conn: Connection, data: bytes) -> None:
        """Cut ``data`` into DATA messages for the pipes."""
        n = len(data)
        maxp = self.max_payload
        pipes = self.pipes
        cid = conn.conn_id
        seq = conn.tx_seq
        pack = HEADER.pack
        if n <= maxp:
            pipes.send_data(pack(cid, seq, n + 8), data)
            seq += 1
            sent = 1
        else:
            view = memoryview(data)
            sent = 0
            for off in range(0, n, maxp):
                chunk = bytes(view[off : off + maxp])
                pipes.send_data(pack(cid, seq & SEQ_MASK, len(chunk) + 8), chunk)
                seq += 1
                sent += 1
        conn.tx_seq = seq & SEQ_MASK
        self.stats.messages_sent += sent

    # -- version 2: the send credit ----------------------------------------------

    def _past_credit(self, conn: Connection, data: bytes) -> None:
        """The socket brought more than the peer lets us send: send what we
        may, keep the rest, and stop reading the socket until credit comes."""
        conn.backlog += data
        self._send_backlog(conn)
        if conn.backlog and not conn.credit_blocked:
            conn.credit_blocked = True
            self.stats.credit_stalls += 1
            if not conn.read_paused and conn.stream is not None:
                conn.stream.pause_reading()

    def _send_backlog(self, conn: Connection) -> None:
        n = min(conn.credit, len(conn.backlog))
        if n:
            chunk, conn.backlog = conn.backlog[:n], conn.backlog[n:]
            conn.credit -= n
            self._frame(conn, chunk)

    def credit(self, conn_id: int, increment: int) -> None:
        """The peer's CREDIT: send what waited for it, read the socket again."""
        conn = self.session.conns.get(conn_id)
        if conn is None or conn.life.over:
            self.stats.credits_dropped += 1  # the connection is over here: nothing waits for it
            return
        conn.credit += increment
        if not conn.backlog:
            return
        if conn.life.state is _OPEN or conn.life.state is _OPEN_PEER_DONE or conn.held_event is not None:
            self._send_backlog(conn)
        if conn.backlog:
            return
        conn.credit_blocked = False
        held, conn.held_event = conn.held_event, None
        if held is not None:
            self.session.event(conn, held)  # the socket's end, now that its bytes are out
        elif not conn.read_paused and conn.stream is not None:
            conn.stream.resume_reading()

    def send_credit(self, conn: Connection, increment: int) -> None:
        self.pipes.send(encode_credit(conn.conn_id, increment))
        self.stats.credits_sent += 1

    def drop_backlog(self, conn: Connection) -> None:
        if conn.backlog:
            self.stats.tail_bytes_dropped += len(conn.backlog)
            conn.backlog = b""
        conn.held_event = None

    def send(self, conn: Connection, message: bytes) -> None:
        """A whole control message (SYN or FIN) that takes the next sequence number."""
        self.pipes.send(message)
        conn.tx_seq = (conn.tx_seq + 1) & SEQ_MASK
        self.stats.messages_sent += 1

    def send_fin(self, conn: Connection, reason: int = REASON_FIN) -> None:
        if reason != REASON_FIN:
            self.drop_backlog(conn)  # a reset drops what was not sent, as TCP's does
        self.send(conn, encode_fin(conn.conn_id, conn.tx_seq, reason))

    # -- pausing sockets -------------------------------------------------------

    def socket_attached(self, conn: Connection) -> None:
        if self.pipes.all_blocked:
            self.pause_reader(conn)

    def pause_reader(self, conn: Connection) -> None:
        stream = conn.stream
        if not conn.read_paused and stream is not None:
            conn.read_paused = True
            if not conn.credit_blocked:
                stream.pause_reading()
            self.paused.add(conn)

    def forget(self, conn: Connection) -> None:
        """The socket is gone or no longer ours."""
        self.paused.discard(conn)
        self.recent.discard(conn)

    def _all_blocked(self) -> None:
        self.stats.download_pauses += 1
        self.overdraft = 0
        senders, self.recent = self.recent, set()
        for conn in senders:
            self.pause_reader(conn)

    def _pause_all(self) -> None:
        # Many sockets that were quiet are each bringing one read while the
        # pipes are blocked: stop them all now rather than one read at a time.
        self.paused_all = True
        for conn in self.session.sockets:
            self.pause_reader(conn)

    def _unblocked(self) -> None:
        self.overdraft = 0
        self.paused_all = False
        paused, self.paused = self.paused, set()
        for conn in paused:
            conn.read_paused = False
            if conn.stream is not None and not conn.credit_blocked:
                conn.stream.resume_reading()

    def close(self) -> None:
        self.paused.clear()
        self.recent.clear()
        self.pipes.close()
