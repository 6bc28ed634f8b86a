"""One session: ``n`` pipes, the connections they carry, and the wiring
between the parts that do the work.

- :class:`~tm3.mux.inbound.Inbound` (pipes -> sockets) and
  :class:`~tm3.mux.outbound.Outbound` (sockets -> pipes) are the two
  directions, as in magic-wormhole's Dilation;
- each :class:`~tm3.mux.connection.Connection` has a pure life cycle
  (:mod:`tm3.core.lifecycle`): :meth:`Session.event` feeds it an event and
  carries out the actions it returns; it is the only place a connection
  changes state or becomes over;
- a role (:class:`~tm3.mux.role.IRole`) plugs in what differs between the RP
  and the LP.

A session ends when a pipe closes, on a protocol error, or when its owner
ends it: every connection is reset, the pipes are closed, all state goes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from twisted.logger import Logger
from twisted.python.failure import Failure

from tm3.core.credit import ReceiveWindow, WindowBudget
from tm3.core.lifecycle import Action, Event, State
from tm3.core.wire import REASON_FIN, REASON_RST, Data, Message
from tm3.mux.connection import Connection, OutControl
from tm3.mux.inbound import Inbound
from tm3.mux.outbound import Outbound
from tm3.mux.pipes import PipeProtocol, PipeSet
from tm3.mux.role import IRole
from tm3.mux.settings import V1, Settings, Stats, Terms
from tm3.mux.stream import StreamProtocol
from tm3.mux.timeouts import Timeouts
from tm3.reactor import IProxyReactor

EndCallback = Callable[["Session", str], None]


class Session:
    log = Logger()

    def __init__(
        self,
        pipes: Sequence[PipeProtocol],
        reactor: IProxyReactor,
        settings: Settings,
        stats: Stats,
        role: Callable[[Session], IRole],
        on_end: EndCallback | None = None,
        name: str = "session",
        terms: Terms = V1,
    ) -> None:
        self.reactor = reactor
        self.terms = terms
        self.windows = WindowBudget(settings.session_window)
        self._rtt = 0.0
        self._rtt_checked = -1.0
        self.settings = settings
        self.stats = stats
        self.name = name
        self.on_end = on_end
        self.ended = False
        self.draining = False  # the proxy is stopping: no new connections
        self.started = time.monotonic()
        self.conns: dict[int, Connection] = {}  # the current connection of each id
        self.live: set[Connection] = set()  # not over yet (with parked ones)
        self.sockets: set[Connection] = set()  # socket attached and ours
        for pipe in pipes:
            pipe.decoder.v2 = terms.v2  # before the early bytes are replayed
        self.inbound = Inbound(self)
        self.outbound = Outbound(self, pipes)
        self.timeouts = Timeouts(self)
        self.role = role(self)
        stats.sessions += 1
        for pipe in pipes:
            pipe.attach(self)  # replays bytes that came before the set was complete

    @property
    def pipes(self) -> PipeSet:
        return self.outbound.pipes

    def new_connection(self, conn_id: int, host: str, port: int, state: State = State.CONNECTING) -> Connection:
        s = self.settings
        if self.terms.v2:
            rwin = ReceiveWindow(s.initial_window, s.max_window, self.windows, self.reactor.seconds, self.rtt)
            conn = Connection(
                conn_id, host, port, s.window_bytes, self.inbound.held_budget, state, rwin, self.terms.peer_window
            )
        else:
            conn = Connection(conn_id, host, port, s.window_bytes, self.inbound.held_budget, state)
        self.live.add(conn)
        self.stats.connections_opened += 1
        return conn

    # -- the life cycle ----------------------------------------------------------

    def event(self, conn: Connection, event: Event, how: str = "") -> None:
        """Feed ``event`` to the connection's life cycle and carry out the
        actions it returns."""
        life = conn.life
        was_over = life.over
        for action in life.step(event, how):
            if action is Action.SEND_FIN:
                self.outbound.send_fin(conn, REASON_FIN)
            elif action is Action.SEND_RST:
                self.outbound.send_fin(conn, REASON_RST)
            elif action is Action.SHUTDOWN_WRITE:
                self.inbound.shutdown_when_drained(conn)
            elif action is Action.DROP_QUEUE:
                self.inbound.drop_queue(conn)
            elif action is Action.RESET_SOCKET:
                self.reset_socket(conn)
            elif action is Action.PEER_RESET:
                self.role.peer_reset(conn)
            else:
                assert action is Action.CONNECT
                self.role.connect(conn)
        if life.over and not was_over:
            self._over(conn, peer_reset=event is Event.PEER_RST)
        elif not life.over:
            self.timeouts.state_changed(conn)

    def attach(self, conn: Connection, stream: StreamProtocol) -> None:
        """The connection's socket is up."""
        if self.ended:
            stream.abort()
            return
        conn.stream = stream
        self.sockets.add(conn)
        self.outbound.socket_attached(conn)
        self.event(conn, Event.CONNECTED)  # over already: given up while connecting, reset
        self.inbound.drain(conn)  # what came while connecting

    def socket_eof(self, conn: Connection, stream: StreamProtocol) -> None:
        if conn.stream is stream and not self.ended:
            if conn.backlog:
                conn.held_event = Event.SOCKET_EOF  # the FIN goes after the bytes waiting for credit
            else:
                self.event(conn, Event.SOCKET_EOF)

    def socket_lost(self, conn: Connection, stream: StreamProtocol, orderly: bool) -> None:
        if conn.stream is not stream:
            return  # we reset it, or handed it off: that was its end here
        self.detach(conn)
        if self.ended:
            return
        if orderly and conn.backlog:
            conn.held_event = Event.SOCKET_CLOSED
        else:
            self.event(conn, Event.SOCKET_CLOSED if orderly else Event.SOCKET_RESET)

    def detach(self, conn: Connection) -> StreamProtocol | None:
        """The socket is no longer the session's to use."""
        stream, conn.stream = conn.stream, None
        self.sockets.discard(conn)
        self.outbound.forget(conn)
        return stream

    def reset_socket(self, conn: Connection) -> None:
        """Reset the socket, or stop the connect, at once."""
        stream = self.detach(conn)
        if stream is not None:
            stream.abort()
        else:
            self.role.cancel_connect(conn)

    def _over(self, conn: Connection, peer_reset: bool = False) -> None:
        self.live.discard(conn)
        self.timeouts.forget(conn)
        self.outbound.drop_backlog(conn)
        if conn.rwin is not None:
            conn.rwin.release()
        self.inbound.conn_over(conn)
        self.stats.ended(conn.life.how)
        self._log_end(conn)
        if self.ended:
            return
        if peer_reset or not (conn.out and type(conn.out[-1]) is OutControl):
            # The peer reset it: what waits for the pipes, our FIN too, is
            # for no one (the peer drops it; rule 6).
            self.outbound.drop_queue(conn)
        # Otherwise our own end (an orderly FIN, or our reset after what the
        # socket delivered) still goes; the LP frees the id only once it has
        # (LocalRole.connection_over), so rule 7's quarantine starts then.
        self.role.connection_over(conn)

    def _log_end(self, conn: Connection) -> None:
        # A connection can be over while its socket still drains its queue
        # (the FIN goes after it): those bytes are on their way, not lost.
        from_pipes = conn.bytes_in + sum(map(len, conn.queue))
        if self.role.upload_from_pipes:
            up, down = from_pipes, conn.bytes_out
        else:
            up, down = conn.bytes_out, from_pipes
        self.log.info(
            "conn {conn_id} to {host}:{port} ended: {how}; up {up} B, down {down} B, {seconds:.3f} s",
            conn_id=conn.conn_id,
            host=conn.host,
            port=conn.port,
            how=conn.life.how,
            up=up,
            down=down,
            seconds=time.monotonic() - conn.started,
        )

    def drop_tail(self, msg: Message) -> None:
        """A message for a connection that is over here: dropped, counted."""
        self.stats.tails_dropped += 1
        if type(msg) is Data:
            self.stats.tail_bytes_dropped += len(msg.payload)

    # -- pipes -------------------------------------------------------------------

    def rtt(self) -> float:
        """The pipes' round-trip time in seconds (the slowest pipe's smoothed
        RTT, from the kernel; refreshed once a second at most)."""
        now = self.reactor.seconds()
        if now - self._rtt_checked >= 1.0:
            self._rtt_checked = now
            self._rtt = max((pipe.rtt() for pipe in self.pipes.pipes), default=0.0)
        return self._rtt

    def pipe_data(self, pipe: PipeProtocol, data: bytes) -> None:
        if not self.ended:
            self.inbound.pipe_data(pipe, data)

    def pipe_lost(self, pipe: PipeProtocol, reason: Failure) -> None:
        self.end(f"{pipe.name} closed: {reason.getErrorMessage()}")

    def protocol_error(self, where: str, reason: str, offset: int, data: bytes) -> None:
        """The LP broke the protocol in the message at ``offset`` of pipe
        ``where`` (or, offset -1, in ``where``): end the session."""
        self.stats.protocol_errors += 1
        at = f" at offset {offset}" if offset >= 0 else ""
        self.log.error(
            "{session}: protocol error on {pipe}{at}: {reason} (bytes: {raw}); ending the session",
            session=self.name,
            pipe=where,
            at=at,
            offset=offset,
            reason=reason,
            raw=data.hex(" "),
        )
        self.end(f"protocol error on {where}")

    # -- ending --------------------------------------------------------------------

    def end(self, why: str, clean: bool = False) -> None:
        """Reset every connection, close the pipes (``clean``: with a FIN
        after what they hold, as a proxy that stops does; else a reset),
        forget everything."""
        if self.ended:
            return
        self.ended = True
        self.stats.sessions_ended += 1
        for conn in list(self.live):
            self.event(conn, Event.ABORT, "session-lost")
            conn.rx.clear()  # what it held for a gap goes now, not when the cycles are collected
        for conn in list(self.sockets):  # over, but still writing their last bytes
            self.reset_socket(conn)
            self.inbound.drop_queue(conn)
        self.conns.clear()
        self.inbound.close()
        self.timeouts.close()
        self.role.session_ended()
        self.outbound.close(clean)
        self.log.info(
            "{session} lost after {seconds:.1f} s: {why}",
            session=self.name,
            seconds=time.monotonic() - self.started,
            why=why,
        )
        if self.on_end is not None:
            self.on_end(self, why)
