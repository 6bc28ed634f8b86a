"""The life of one carried connection, as a pure state machine (no I/O).

A connection has two ends: the **socket** (to the server on the RP, from the
client on the LP) and the **peer** (the other proxy, reached through the
pipes). Each direction closes on its own (TCP half-close), and either side
may abort. The rules (docs/protocol.md, "Connection life cycle"):

- the peer's FIN 0x88 half-closes the socket's write side once every earlier
  byte is written; its 0x99 resets the socket;
- the socket's EOF becomes our FIN 0x88; a socket that is reset, or a connect
  that fails, becomes our 0x99;
- each side sends at most one FIN, as its last message;
- the connection is **over** when FINs have gone both ways, or a 0x99 either
  way, or we gave it up (session lost, id reused). This module is the one
  place that decides it.

Like ``h2.stream``, the states are an ``Enum`` and every legal
``(state, event)`` pair is one row of :data:`TRANSITIONS`, giving the actions
for the glue to carry out and the next state. An event with no row is a bug
in the caller and raises :class:`LifecycleError` here, in one place.

"Over" is about the protocol, not the socket: a connection that is over may
still be writing the peer's last bytes to its socket before the half-close,
so socket events keep arriving after it and are accepted as no-ops.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from attrs import frozen


class State(enum.Enum):
    PARKED = "parked"  # RP: SYN taken, connect not started (the id's older connection is not over)
    PARKED_PEER_DONE = "parked, peer done"
    CONNECTING = "connecting"  # no socket yet (RP connect in flight; LP before attach)
    CONNECTING_PEER_DONE = "connecting, peer done"
    OPEN = "open"
    OPEN_LOCAL_DONE = "open, we sent FIN"  # the socket's peer finished sending
    OPEN_PEER_DONE = "open, peer sent FIN"  # the socket's write side is shut (or soon)
    CLOSED_LOCAL_DONE = "socket gone, we sent FIN"  # waiting for the peer's FIN
    OVER = "over"


class Event(enum.Enum):
    CONNECT = "connect"  # start the connect (RP: the SYN, or a parked connection's turn)
    CONNECTED = "connected"  # the socket is up and attached
    CONNECT_FAILED = "connect failed"
    DENIED = "destination denied"  # RP: the destination policy refuses the SYN's address
    PEER_FIN = "peer FIN 0x88"  # in order, from the pipes
    PEER_RST = "peer FIN 0x99"
    SOCKET_EOF = "socket EOF"  # the socket's peer finished sending
    SOCKET_CLOSED = "socket closed"  # connectionLost, orderly
    SOCKET_RESET = "socket reset"  # connectionLost, anything else
    ABORT = "abort"  # our own decision: session lost, id reused
    STALLED = "stalled"  # its socket took nothing for a while its queue held every pipe paused


class Action(enum.Enum):
    CONNECT = "connect"  # open the socket (RP)
    SEND_FIN = "send FIN 0x88"
    SEND_RST = "send FIN 0x99"
    SHUTDOWN_WRITE = "half-close the socket once its queue is written"
    RESET_SOCKET = "reset the socket or stop the connect now, dropping its queue"
    PEER_RESET = "the peer reset: reset the socket as the role does it"
    DROP_QUEUE = "drop what the socket has not taken"


@frozen
class Transition:
    actions: tuple[Action, ...]
    next: State
    how: str = ""  # why the connection is over, when ``next`` is OVER and the caller gave none


class LifecycleError(Exception):
    """An event that cannot happen in this state: a bug in the caller."""


S, E, A = State, Event, Action
_OVER = S.OVER


def _t(next_state: State, *actions: Action, how: str = "") -> Transition:
    return Transition(actions, next_state, how)


_NOTHING = _t(_OVER)
_ABORT_SOCKET = _t(_OVER, A.RESET_SOCKET, A.DROP_QUEUE)

TRANSITIONS: Mapping[tuple[State, Event], Transition] = {
    # -- before the socket exists ------------------------------------------
    (S.PARKED, E.CONNECT): _t(S.CONNECTING, A.CONNECT),
    (S.PARKED, E.PEER_FIN): _t(S.PARKED_PEER_DONE),
    (S.PARKED, E.PEER_RST): _t(_OVER, A.DROP_QUEUE, how="rst"),
    (S.PARKED, E.ABORT): _t(_OVER, A.DROP_QUEUE),
    (S.PARKED_PEER_DONE, E.CONNECT): _t(S.CONNECTING_PEER_DONE, A.CONNECT),
    (S.PARKED, E.DENIED): _t(_OVER, A.SEND_RST, A.DROP_QUEUE, how="denied"),
    (S.PARKED_PEER_DONE, E.DENIED): _t(_OVER, A.SEND_RST, A.DROP_QUEUE, how="denied"),
    (S.PARKED_PEER_DONE, E.ABORT): _t(_OVER, A.DROP_QUEUE),
    (S.CONNECTING, E.CONNECTED): _t(S.OPEN),
    (S.CONNECTING, E.CONNECT_FAILED): _t(_OVER, A.SEND_RST, A.DROP_QUEUE, how="connect-failed"),
    (S.CONNECTING, E.PEER_FIN): _t(S.CONNECTING_PEER_DONE),
    (S.CONNECTING, E.PEER_RST): _t(_OVER, A.RESET_SOCKET, A.DROP_QUEUE, how="rst"),
    (S.CONNECTING, E.ABORT): _ABORT_SOCKET,
    (S.CONNECTING_PEER_DONE, E.CONNECTED): _t(S.OPEN_PEER_DONE, A.SHUTDOWN_WRITE),
    (S.CONNECTING_PEER_DONE, E.CONNECT_FAILED): _t(_OVER, A.SEND_RST, A.DROP_QUEUE, how="connect-failed"),
    (S.CONNECTING_PEER_DONE, E.ABORT): _ABORT_SOCKET,
    # -- both directions open ------------------------------------------------
    (S.OPEN, E.PEER_FIN): _t(S.OPEN_PEER_DONE, A.SHUTDOWN_WRITE),
    (S.OPEN, E.PEER_RST): _t(_OVER, A.PEER_RESET, how="rst"),
    (S.OPEN, E.SOCKET_EOF): _t(S.OPEN_LOCAL_DONE, A.SEND_FIN),
    (S.OPEN, E.SOCKET_CLOSED): _t(S.CLOSED_LOCAL_DONE, A.SEND_FIN, A.DROP_QUEUE),
    (S.OPEN, E.SOCKET_RESET): _t(_OVER, A.SEND_RST, A.DROP_QUEUE, how="rst"),
    (S.OPEN, E.ABORT): _ABORT_SOCKET,
    # -- one direction done --------------------------------------------------
    (S.OPEN_LOCAL_DONE, E.PEER_FIN): _t(_OVER, A.SHUTDOWN_WRITE, how="fin"),
    (S.OPEN_LOCAL_DONE, E.PEER_RST): _t(_OVER, A.PEER_RESET, how="rst"),
    # v1 allows one FIN per side: a reset after our 0x88 cannot be reported.
    (S.OPEN_LOCAL_DONE, E.SOCKET_CLOSED): _t(S.CLOSED_LOCAL_DONE, A.DROP_QUEUE),
    (S.OPEN_LOCAL_DONE, E.SOCKET_RESET): _t(S.CLOSED_LOCAL_DONE, A.DROP_QUEUE),
    (S.OPEN_LOCAL_DONE, E.ABORT): _ABORT_SOCKET,
    (S.OPEN_PEER_DONE, E.SOCKET_EOF): _t(_OVER, A.SEND_FIN, how="fin"),
    (S.OPEN_PEER_DONE, E.SOCKET_CLOSED): _t(_OVER, A.SEND_FIN, A.DROP_QUEUE, how="fin"),
    (S.OPEN_PEER_DONE, E.SOCKET_RESET): _t(_OVER, A.SEND_RST, A.DROP_QUEUE, how="rst"),
    (S.OPEN_PEER_DONE, E.ABORT): _ABORT_SOCKET,
    (S.CLOSED_LOCAL_DONE, E.PEER_FIN): _t(_OVER, how="fin"),
    (S.CLOSED_LOCAL_DONE, E.PEER_RST): _t(_OVER, how="rst"),
    (S.CLOSED_LOCAL_DONE, E.ABORT): _t(_OVER),
    # -- given up because its queue stalled every pipe (v1 has no window) ------
    (S.PARKED, E.STALLED): _t(_OVER, A.SEND_RST, A.DROP_QUEUE, how="stalled"),
    (S.PARKED_PEER_DONE, E.STALLED): _t(_OVER, A.SEND_RST, A.DROP_QUEUE, how="stalled"),
    (S.CONNECTING, E.STALLED): _t(_OVER, A.RESET_SOCKET, A.SEND_RST, A.DROP_QUEUE, how="stalled"),
    (S.CONNECTING_PEER_DONE, E.STALLED): _t(_OVER, A.RESET_SOCKET, A.SEND_RST, A.DROP_QUEUE, how="stalled"),
    (S.OPEN, E.STALLED): _t(_OVER, A.RESET_SOCKET, A.SEND_RST, A.DROP_QUEUE, how="stalled"),
    (S.OPEN_PEER_DONE, E.STALLED): _t(_OVER, A.RESET_SOCKET, A.SEND_RST, A.DROP_QUEUE, how="stalled"),
    # Our 0x88 is out: the peer can only be told by dropping what it sends.
    (S.OPEN_LOCAL_DONE, E.STALLED): _t(S.CLOSED_LOCAL_DONE, A.RESET_SOCKET, A.DROP_QUEUE),
    (S.OVER, E.STALLED): _t(_OVER, A.RESET_SOCKET, A.DROP_QUEUE),
    # -- over: the socket may still be finishing its teardown ----------------
    (S.OVER, E.CONNECTED): _t(_OVER, A.RESET_SOCKET),  # given up while the connect was in flight
    (S.OVER, E.CONNECT_FAILED): _NOTHING,  # we stopped that connect ourselves
    (S.OVER, E.SOCKET_EOF): _NOTHING,
    (S.OVER, E.SOCKET_CLOSED): _t(_OVER, A.DROP_QUEUE),
    (S.OVER, E.SOCKET_RESET): _t(_OVER, A.DROP_QUEUE),
    (S.OVER, E.ABORT): _NOTHING,
}

# Version 2 lets a reset follow a half-close (0x99 after our own 0x88, either
# way), so a client that half-closes and then resets tears the server side
# down, and the other way round; v1 allows one FIN per side.
V2_TRANSITIONS: Mapping[tuple[State, Event], Transition] = {
    **TRANSITIONS,
    (S.OPEN_LOCAL_DONE, E.SOCKET_RESET): _t(_OVER, A.SEND_RST, A.DROP_QUEUE, how="rst"),
    (S.OPEN_LOCAL_DONE, E.STALLED): _t(_OVER, A.RESET_SOCKET, A.SEND_RST, A.DROP_QUEUE, how="stalled"),
    (S.OPEN_PEER_DONE, E.PEER_RST): _t(_OVER, A.PEER_RESET, how="rst"),
    (S.CONNECTING_PEER_DONE, E.PEER_RST): _t(_OVER, A.RESET_SOCKET, A.DROP_QUEUE, how="rst"),
    (S.PARKED_PEER_DONE, E.PEER_RST): _t(_OVER, A.DROP_QUEUE, how="rst"),
}

V2_RESET_AFTER_FIN = frozenset(
    {(S.OPEN_PEER_DONE, E.PEER_RST), (S.CONNECTING_PEER_DONE, E.PEER_RST), (S.PARKED_PEER_DONE, E.PEER_RST)}
)

# Before the socket is up: the peer's DATA waits in the connection's queue.
WAITING = frozenset({S.PARKED, S.PARKED_PEER_DONE, S.CONNECTING, S.CONNECTING_PEER_DONE})
# The socket's bytes are still wanted (we have sent no FIN).
SENDING = frozenset({S.OPEN, S.OPEN_PEER_DONE})


class Lifecycle:
    """One connection's state; :meth:`step` is the only way it changes."""

    __slots__ = ("state", "how", "peer_done", "table")

    def __init__(self, state: State = State.CONNECTING, v2: bool = False) -> None:
        if state not in (State.CONNECTING, State.PARKED):
            raise LifecycleError(f"a connection starts connecting or parked, not {state.value}")
        self.state: State = state
        self.table = V2_TRANSITIONS if v2 else TRANSITIONS
        self.how = ""  # why it is over (log and metrics): fin, rst, connect-failed, ...
        # Whether the peer's FIN (either reason) came: what follows it in
        # sequence belongs to the next connection with this id (rule 8), but
        # for a v2 0x99 after a 0x88 (see :meth:`may_reset_after_fin`).
        self.peer_done = False

    @property
    def over(self) -> bool:
        return self.state is State.OVER

    def step(self, event: Event, how: str = "") -> tuple[Action, ...]:
        """Apply ``event``; returns the actions for the caller to carry out,
        in order. ``how`` names why, for an :attr:`Event.ABORT`."""
        try:
            t = self.table[self.state, event]
        except KeyError:
            raise LifecycleError(f"{event.value} cannot happen while {self.state.value}") from None
        if self.state is not State.OVER and t.next is State.OVER:
            self.how = how or t.how
        if event is Event.PEER_FIN or event is Event.PEER_RST:
            self.peer_done = True
        self.state = t.next
        return t.actions

    @property
    def may_reset_after_fin(self) -> bool:
        """Version 2: the peer sent 0x88 and may still send a 0x99 (the next
        seq), which is this connection's, not the next one's with the id."""
        return self.table is V2_TRANSITIONS and (self.state, Event.PEER_RST) in V2_RESET_AFTER_FIN

    def __repr__(self) -> str:
        return f"<Lifecycle {self.state.value}{' (' + self.how + ')' if self.how else ''}>"
