"""The connection life cycle (tm3/core/lifecycle.py), driven without sockets:
the table's rows one by one, and every event sequence a real connection can
produce (hypothesis) against the protocol's rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tm3.core.lifecycle import TRANSITIONS, Action, Event, Lifecycle, LifecycleError, State

A, E, S = Action, Event, State


def run(start: State, *events: Event) -> tuple[Lifecycle, list[Action]]:
    life = Lifecycle(start)
    actions: list[Action] = []
    for event in events:
        actions.extend(life.step(event))
    return life, actions


# -- the paths of docs/protocol.md, "Connection life cycle" --------------------------


def test_rp_connection_client_closes_first() -> None:
    life, actions = run(S.PARKED, E.CONNECT, E.CONNECTED, E.PEER_FIN, E.SOCKET_EOF)
    assert actions == [A.CONNECT, A.SHUTDOWN_WRITE, A.SEND_FIN]
    assert life.over and life.how == "fin" and life.peer_done


def test_server_closes_first_then_the_client() -> None:
    life, actions = run(S.CONNECTING, E.CONNECTED, E.SOCKET_EOF, E.PEER_FIN)
    assert actions == [A.SEND_FIN, A.SHUTDOWN_WRITE]
    assert life.over and life.how == "fin"


def test_the_socket_closing_whole_sends_fin_and_waits_for_the_peer() -> None:
    life, actions = run(S.CONNECTING, E.CONNECTED, E.SOCKET_CLOSED)
    assert actions == [A.SEND_FIN, A.DROP_QUEUE]
    assert life.state is S.CLOSED_LOCAL_DONE and not life.over
    assert life.step(E.PEER_FIN) == ()
    assert life.over and life.how == "fin"


def test_a_failed_connect_is_0x99_and_over() -> None:
    life, actions = run(S.CONNECTING, E.CONNECT_FAILED)
    assert actions == [A.SEND_RST, A.DROP_QUEUE]
    assert life.over and life.how == "connect-failed"


def test_a_connect_failing_after_the_peer_finished_sending_is_still_0x99() -> None:
    life, actions = run(S.CONNECTING, E.PEER_FIN, E.CONNECT_FAILED)
    assert actions == [A.SEND_RST, A.DROP_QUEUE]
    assert life.how == "connect-failed"


def test_the_peer_finishing_before_the_connect_half_closes_once_connected() -> None:
    life, actions = run(S.CONNECTING, E.PEER_FIN, E.CONNECTED)
    assert actions == [A.SHUTDOWN_WRITE]
    assert life.state is S.OPEN_PEER_DONE


def test_peer_reset_while_connecting_stops_the_connect() -> None:
    life, actions = run(S.CONNECTING, E.PEER_RST)
    assert actions == [A.RESET_SOCKET, A.DROP_QUEUE]
    assert life.over and life.how == "rst"
    # The connect we stopped reports back; nothing more happens.
    assert life.step(E.CONNECT_FAILED) == ()


def test_peer_reset_of_an_open_connection_is_the_roles_reset() -> None:
    life, actions = run(S.CONNECTING, E.CONNECTED, E.PEER_RST)
    assert actions == [A.PEER_RESET]
    assert life.over and life.how == "rst"


def test_socket_reset_is_0x99() -> None:
    life, actions = run(S.CONNECTING, E.CONNECTED, E.SOCKET_RESET)
    assert actions == [A.SEND_RST, A.DROP_QUEUE]
    assert life.over and life.how == "rst"


def test_a_reset_after_our_fin_cannot_be_reported_in_v1() -> None:
    life, actions = run(S.CONNECTING, E.CONNECTED, E.SOCKET_EOF, E.SOCKET_RESET)
    assert actions == [A.SEND_FIN, A.DROP_QUEUE]
    assert life.state is S.CLOSED_LOCAL_DONE


def test_parked_then_reset_by_the_peer_never_connects() -> None:
    life, actions = run(S.PARKED, E.PEER_RST)
    assert actions == [A.DROP_QUEUE]
    assert life.over


def test_parked_with_the_peer_done_connects_and_half_closes() -> None:
    life, actions = run(S.PARKED, E.PEER_FIN, E.CONNECT, E.CONNECTED)
    assert actions == [A.CONNECT, A.SHUTDOWN_WRITE]


def test_a_denied_destination_is_0x99_without_a_connect() -> None:
    life, actions = run(S.PARKED, E.PEER_FIN, E.DENIED)
    assert actions == [A.SEND_RST, A.DROP_QUEUE]
    assert life.over and life.how == "denied"


def test_a_stalled_connection_is_reset_both_ways() -> None:
    life, actions = run(S.CONNECTING, E.CONNECTED, E.STALLED)
    assert actions == [A.RESET_SOCKET, A.SEND_RST, A.DROP_QUEUE]
    assert life.over and life.how == "stalled"
    # After our 0x88 the peer cannot be told: the socket goes, its data is dropped.
    life, actions = run(S.CONNECTING, E.CONNECTED, E.SOCKET_EOF, E.STALLED)
    assert actions == [A.SEND_FIN, A.RESET_SOCKET, A.DROP_QUEUE]
    assert life.state is S.CLOSED_LOCAL_DONE


def test_abort_names_why() -> None:
    life, actions = run(S.CONNECTING, E.CONNECTED)
    assert life.step(E.ABORT, "id-reused") == (A.RESET_SOCKET, A.DROP_QUEUE)
    assert life.how == "id-reused"
    assert life.step(E.ABORT, "session-lost") == ()
    assert life.how == "id-reused"  # the first reason stays


def test_given_up_while_connecting_resets_the_socket_that_arrives() -> None:
    life, _ = run(S.CONNECTING, E.ABORT)
    assert life.step(E.CONNECTED) == (A.RESET_SOCKET,)


def test_an_impossible_event_is_an_error_in_one_place() -> None:
    life, _ = run(S.CONNECTING, E.CONNECTED, E.PEER_FIN)
    with pytest.raises(LifecycleError, match="peer FIN 0x88 cannot happen while open, peer sent FIN"):
        life.step(E.PEER_FIN)
    with pytest.raises(LifecycleError):
        Lifecycle(S.OPEN)


def test_every_row_leads_somewhere_reachable() -> None:
    reachable = {S.PARKED, S.CONNECTING}
    frontier = list(reachable)
    while frontier:
        state = frontier.pop()
        for (s, _), t in TRANSITIONS.items():
            if s is state and t.next not in reachable:
                reachable.add(t.next)
                frontier.append(t.next)
    assert reachable == set(State)
    # Leaving a state for OVER always says why, unless the caller does (ABORT).
    for (s, e), t in TRANSITIONS.items():
        if s is not S.OVER and t.next is S.OVER and e is not E.ABORT:
            assert t.how, (s, e)


# -- every sequence a real connection can produce ----------------------------------


class Model:
    """What the world allows: a socket exists once connected and closes once;
    its EOF comes at most once and before it closes; the peer's messages stop
    after its FIN; we stop a connect when we give up on it."""

    def __init__(self, start: State) -> None:
        self.life = Lifecycle(start)
        self.connecting = False
        self.connected = False
        self.socket_gone = False
        self.eof_seen = False
        self.peer_done = False
        self.fins_sent: list[Action] = []
        self.reset = False  # we reset the socket (RESET_SOCKET or PEER_RESET)
        self.writes_after_reset = 0

    def possible(self) -> list[Event]:
        events = [E.ABORT]
        state = self.life.state
        if state in (S.PARKED, S.PARKED_PEER_DONE):
            events += [E.CONNECT, E.DENIED]
        if self.connecting and not self.connected and not self.socket_gone:
            events += [E.CONNECTED, E.CONNECT_FAILED]
        if self.connected and not self.socket_gone and not self.reset:
            if not self.eof_seen:
                events.append(E.SOCKET_EOF)
            events += [E.SOCKET_CLOSED, E.SOCKET_RESET]
        if not self.peer_done and state is not S.OVER:
            events += [E.PEER_FIN, E.PEER_RST]
        # The stall check picks connections with a queue: any but one whose
        # socket is gone for good.
        if state is not S.CLOSED_LOCAL_DONE and (state is not S.OVER or (self.connected and not self.socket_gone)):
            if not self.reset:
                events.append(E.STALLED)
        return events

    def apply(self, event: Event) -> None:
        if event is E.CONNECTED:
            self.connected = True
        elif event is E.CONNECT_FAILED:
            self.socket_gone = True
        elif event is E.SOCKET_EOF:
            self.eof_seen = True
        elif event in (E.SOCKET_CLOSED, E.SOCKET_RESET):
            self.socket_gone = True
        elif event in (E.PEER_FIN, E.PEER_RST):
            self.peer_done = True
        for action in self.life.step(event):
            if action in (A.SEND_FIN, A.SEND_RST):
                self.fins_sent.append(action)
            elif action is A.CONNECT:
                self.connecting = True
            elif action in (A.RESET_SOCKET, A.PEER_RESET):
                if not self.connected:
                    self.socket_gone = True  # the connect was stopped
                self.reset = True
            elif action is A.SHUTDOWN_WRITE and self.reset:
                self.writes_after_reset += 1


@settings(max_examples=400, deadline=None)
@given(start=st.sampled_from([S.PARKED, S.CONNECTING]), picks=st.lists(st.integers(0, 100), max_size=12))
def test_any_possible_sequence_keeps_the_rules(start: State, picks: list[int]) -> None:
    m = Model(start)
    if start is S.CONNECTING:
        m.connecting = True
    for pick in picks:
        choices = m.possible()
        m.apply(choices[pick % len(choices)])
        life = m.life
        # At most one FIN from our side, and nothing after a 0x99.
        assert len(m.fins_sent) <= 1
        # Never a write (half-close) to a socket we reset.
        assert m.writes_after_reset == 0
        # "Over" is exactly the protocol's definition.
        both_fins = bool(m.fins_sent) and m.peer_done
        a_reset = A.SEND_RST in m.fins_sent or (life.peer_done and life.how == "rst")
        given_up = life.how in ("session-lost", "id-reused", "stalled", "") and life.over
        if life.over:
            assert both_fins or a_reset or given_up or life.how in ("connect-failed", "denied"), (life, m.fins_sent)
        else:
            assert not both_fins and not a_reset
        if life.over:
            assert life.how or not (both_fins or a_reset)
