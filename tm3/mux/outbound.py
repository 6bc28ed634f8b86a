"""The outbound half of a session: sockets -> pipes, bound late.

Bytes read from a connection's socket wait in that connection's queue, in
user space, until a pipe can really send them (late binding). A pipe can
take a batch when its transport has handed everything to the kernel and the
kernel holds little unsent data (``TCP_NOTSENT_LOWAT``: tm3/mux/pipes.py).
Then :meth:`Outbound.fill` gives it one batch of ``pipe_lowat`` bytes:
CREDIT messages first, then messages of the connections chosen by
:class:`~tm3.core.schedule.LeastServedFirst` (SYN and FIN first, then the
connection that has sent the least; one pick in eight for the one that has
waited longest). A message is framed, and takes its sequence number, only
then; so a pipe that stalls on a loss holds at most its batch and the
kernel's little unsent data, and everything else goes to the pipes that
move.

Reading sockets is bounded by what waits: a socket whose connection has
more than ``send_queue`` bytes queued is paused until half of it has gone;
past ``total_send_queue`` for the whole session, a socket is paused as soon
as it brings a read (lazily: pausing every socket at once would cost
O(connections) on every blip), and past ``OVERDRAFT_LIMIT`` more bytes read
in that state all are paused at once. All resume once the session is under
half its limit again.

Version 2 adds a window per connection (:mod:`tm3.core.credit`): a socket
that brings more than the peer's credit allows keeps the rest in the
connection's backlog and is not read again until the peer's CREDIT lets the
backlog out; its EOF waits behind the backlog, so the FIN follows the bytes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall

from tm3.core.lifecycle import State
from tm3.core.schedule import CONTROL_FIRST, LeastServedFirst
from tm3.core.wire import HEADER, REASON_FIN, SEQ_MASK, encode_credit, encode_fin
from tm3.mux.connection import Connection, OutControl
from tm3.mux.pipes import PipeProtocol, PipeSet

if TYPE_CHECKING:
    from tm3.mux.session import Session

MiB = 1024 * 1024
# Past this many bytes read from sockets while the session is over its
# queue limit, stop reading all sockets at once (see the module doc).
OVERDRAFT_LIMIT = 1 * MiB
# What one queued chunk costs beyond its payload: the deque slot and the
# bytes object's header, rounded up.
OUT_CHUNK_OVERHEAD = 64
# One pick takes at most this much of a connection's queue before the
# scheduler chooses again (at least one whole message).
QUANTUM = 16 * 1024

# Why a socket is not being read (Connection.read_paused bits).
PAUSE_CREDIT = 1  # version 2: its window is used up
PAUSE_QUEUE = 2  # its own queue is over ``send_queue``
PAUSE_SESSION = 4  # the session is over ``total_send_queue``

_OPEN = State.OPEN
_OPEN_PEER_DONE = State.OPEN_PEER_DONE


class Outbound:
    def __init__(self, session: Session, pipes: Sequence[PipeProtocol]) -> None:
        self.session = session
        self.stats = session.stats
        settings = session.settings
        self.max_payload = settings.max_payload
        self.batch = settings.pipe_lowat
        self.conn_limit = settings.send_queue
        self.total_limit = settings.total_send_queue
        self.ready: LeastServedFirst[Connection] = LeastServedFirst(settings.send_share)
        self.control: deque[bytes] = deque()  # CREDIT messages: unsequenced, first
        self.queued = 0  # what waits in user space: payload + OUT_CHUNK_OVERHEAD a chunk
        self.pipes = PipeSet(
            pipes, session.reactor, self.fill, settings.pipe_scheduler, settings.pipe_lowat, settings.pipe_congestion
        )
        self.paused: set[Connection] = set()  # paused because the session is over its limit
        self.over = False  # the session is over total_send_queue (until under half)
        self.overdraft = 0  # socket bytes read while over
        self.paused_all = False
        self.when_sent: dict[Connection, Callable[[], None]] = {}
        self._kick: IDelayedCall | None = None
        self._reactor = session.reactor

    # -- from the sockets ----------------------------------------------------------

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
            self._enqueue(conn, data, n)
        if self.over:
            self.pause_reader(conn, PAUSE_SESSION)
            self.overdraft += n
            if self.overdraft > OVERDRAFT_LIMIT and not self.paused_all:
                self._pause_all()

    def _enqueue(self, conn: Connection, item: bytes | OutControl, n: int) -> None:
        out = conn.out
        if not out:
            self.ready.push(conn, CONTROL_FIRST if type(item) is OutControl else conn.served)
        out.append(item)
        conn.out_bytes += n
        self.queued += n + OUT_CHUNK_OVERHEAD
        if conn.out_bytes > self.conn_limit and not conn.read_paused & PAUSE_QUEUE:
            self.pause_reader(conn, PAUSE_QUEUE)
        if self.queued > self.total_limit and not self.over:
            self.over = True
            self.overdraft = 0
            self.stats.download_pauses += 1
        if self._kick is None and self.pipes.can_take:
            self._kick = self._reactor.callLater(0, self.flush)

    def send(self, conn: Connection, message: bytes) -> None:
        """The LP's SYN (seq 0, the connection's first message)."""
        self._enqueue(conn, OutControl(syn=message), 0)

    def send_fin(self, conn: Connection, reason: int = REASON_FIN) -> None:
        if reason != REASON_FIN:
            # A reset drops what waited for credit, as TCP's drops what it
            # has not sent; what the socket delivered before its reset and is
            # queued goes first, as it would have over a direct connection.
            self.drop_backlog(conn)
        self._enqueue(conn, OutControl(reason=reason), 0)

    def send_credit(self, conn: Connection, increment: int) -> None:
        self.control.append(encode_credit(conn.conn_id, increment))
        self.queued += OUT_CHUNK_OVERHEAD
        self.stats.credits_sent += 1
        if self._kick is None and self.pipes.can_take:
            self._kick = self._reactor.callLater(0, self.flush)

    # -- to the pipes --------------------------------------------------------------

    def flush(self) -> None:
        """Give every pipe that can take a batch one, best pipe first, while
        anything waits (normally once per reactor turn)."""
        self._kick = None
        if self.over and self.queued <= self.total_limit // 2:
            self._under()
        for pipe in self.pipes.takers(self.queued):
            if not self.control and not self.ready:
                return
            self._fill(pipe)
        self._again()

    def _again(self) -> None:
        # A TCP pipe's gate closes as soon as it is written to, and reopens
        # (calling fill) when the kernel has taken the batch. A transport that
        # buffers before it writes (TLS aggregates writes for a turn; a test's
        # never blocks) may still be open: offer it more in the next turn.
        if self._kick is None and (self.control or self.ready) and self.pipes.can_take:
            self._kick = self._reactor.callLater(0, self.flush)

    def fill(self, pipe: PipeProtocol) -> None:
        """``pipe`` can send: hand it one batch of what waits, if anything does."""
        self._fill(pipe)
        self._again()

    def _fill(self, pipe: PipeProtocol) -> None:
        out: list[bytes] = []
        size = 0
        budget = self.batch
        control = self.control
        while control and size < budget:
            message = control.popleft()
            out.append(message)
            size += len(message)
            self.queued -= OUT_CHUNK_OVERHEAD
        ready = self.ready
        messages = 0
        while size < budget:
            conn = ready.pop()
            if conn is None:
                break
            taken, count = self._take(conn, min(budget - size, QUANTUM), out)
            size += taken
            messages += count
            if conn.out:
                ready.push(conn, CONTROL_FIRST if type(conn.out[0]) is OutControl else conn.served)
            elif conn in self.when_sent:
                self.when_sent.pop(conn)()
        if out:
            self.stats.messages_sent += messages
            pipe.write_batch(out)
        if self.over and self.queued <= self.total_limit // 2:
            self._under()

    def _take(self, conn: Connection, limit: int, out: list[bytes]) -> tuple[int, int]:
        """Frame messages from the head of ``conn``'s queue into ``out``:
        about ``limit`` bytes, at least one message. Returns the wire bytes
        and the messages taken."""
        queue = conn.out
        maxp = self.max_payload
        pack = HEADER.pack
        cid = conn.conn_id
        seq = conn.tx_seq
        offset = conn.out_offset
        size = 0
        payload_bytes = 0
        count = 0
        chunks_done = 0
        while queue and (size < limit or count == 0):
            head = queue[0]
            if type(head) is OutControl:
                if head.syn:
                    message = head.syn
                else:
                    message = encode_fin(cid, seq, head.reason)
                out.append(message)
                size += len(message)
                seq = (seq + 1) & SEQ_MASK
                count += 1
                queue.popleft()
                chunks_done += 1
                continue
            assert type(head) is bytes
            left = len(head) - offset
            while left > 0 and (size < limit or count == 0):
                n = maxp if left > maxp else left
                if offset == 0 and n == len(head):
                    payload = head
                else:
                    payload = head[offset : offset + n]
                out.append(pack(cid, seq, n + 8))
                out.append(payload)
                seq = (seq + 1) & SEQ_MASK
                offset += n
                left -= n
                size += n + 8
                payload_bytes += n
                count += 1
            if left == 0:
                queue.popleft()
                offset = 0
                chunks_done += 1
            else:
                break
        conn.tx_seq = seq
        conn.out_offset = offset
        conn.out_bytes -= payload_bytes
        conn.served += payload_bytes
        self.queued -= payload_bytes + chunks_done * OUT_CHUNK_OVERHEAD
        if conn.read_paused & PAUSE_QUEUE and conn.out_bytes <= self.conn_limit // 2:
            self.resume_reader(conn, PAUSE_QUEUE)
        return size, count

    def after_sent(self, conn: Connection, then: Callable[[], None]) -> None:
        """Call ``then`` once all ``conn`` has queued is on a pipe (or
        dropped): now, if nothing is queued."""
        if conn.out:
            self.when_sent[conn] = then
        else:
            then()

    def drop_queue(self, conn: Connection) -> None:
        then = self.when_sent.pop(conn, None)
        if then is not None:
            then()
        if not conn.out:
            return
        dropped = conn.out_bytes
        chunks = len(conn.out)
        self.stats.tail_bytes_dropped += dropped
        self.queued -= dropped + chunks * OUT_CHUNK_OVERHEAD
        conn.out.clear()
        conn.out_offset = 0
        conn.out_bytes = 0
        self.ready.discard(conn)
        if conn.read_paused & PAUSE_QUEUE:
            self.resume_reader(conn, PAUSE_QUEUE)
        if self.over and self.queued <= self.total_limit // 2:
            self._under()

    # -- version 2: the send credit ----------------------------------------------

    def _past_credit(self, conn: Connection, data: bytes) -> None:
        """The socket brought more than the peer lets us send: send what we
        may, keep the rest, and stop reading the socket until credit comes."""
        conn.backlog += data
        self._send_backlog(conn)
        if conn.backlog and not conn.credit_blocked:
            conn.credit_blocked = True
            self.stats.credit_stalls += 1
            self.pause_reader(conn, PAUSE_CREDIT)

    def _send_backlog(self, conn: Connection) -> None:
        n = min(conn.credit, len(conn.backlog))
        if n:
            chunk, conn.backlog = conn.backlog[:n], conn.backlog[n:]
            conn.credit -= n
            self._enqueue(conn, chunk, n)

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
            conn.read_paused &= ~PAUSE_CREDIT  # the socket has ended: nothing to read again
            self.session.event(conn, held)  # the socket's end, now that its bytes are out
        else:
            self.resume_reader(conn, PAUSE_CREDIT)

    def drop_backlog(self, conn: Connection) -> None:
        if conn.backlog:
            self.stats.tail_bytes_dropped += len(conn.backlog)
            conn.backlog = b""
        conn.held_event = None

    # -- pausing sockets -------------------------------------------------------

    def socket_attached(self, conn: Connection) -> None:
        if self.over:
            self.pause_reader(conn, PAUSE_SESSION)

    def pause_reader(self, conn: Connection, why: int) -> None:
        was = conn.read_paused
        if was & why:
            return
        conn.read_paused = was | why
        if why == PAUSE_SESSION:
            self.paused.add(conn)
        elif why == PAUSE_QUEUE:
            self.stats.download_pauses += 1
        if not was and conn.stream is not None:
            conn.stream.pause_reading()

    def resume_reader(self, conn: Connection, why: int) -> None:
        was = conn.read_paused
        if not was & why:
            return
        conn.read_paused = was & ~why
        if not conn.read_paused and conn.stream is not None:
            conn.stream.resume_reading()

    def forget(self, conn: Connection) -> None:
        """The socket is gone or no longer ours."""
        self.paused.discard(conn)

    def _pause_all(self) -> None:
        # Many sockets that were quiet are each bringing one read while the
        # session is over its limit: stop them all now rather than one read
        # at a time.
        self.paused_all = True
        for conn in self.session.sockets:
            self.pause_reader(conn, PAUSE_SESSION)

    def _under(self) -> None:
        self.over = False
        self.overdraft = 0
        self.paused_all = False
        paused, self.paused = self.paused, set()
        for conn in paused:
            self.resume_reader(conn, PAUSE_SESSION)

    def close(self, clean: bool = False) -> None:
        if self._kick is not None and self._kick.active():
            self._kick.cancel()
        self._kick = None
        self.paused.clear()
        self.when_sent.clear()
        self.control.clear()
        self.pipes.close(clean)
