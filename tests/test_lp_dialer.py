"""The LP's redial policy (tm3/lp/dialer.py), without sockets."""

from __future__ import annotations

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock

from tm3.lp.dialer import INITIAL_BACKOFF, MAX_BACKOFF, PipeDialer


def make_dialer() -> PipeDialer:
    reactor = MemoryReactorClock()
    return PipeDialer(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", 6000), 4, lambda pipes, terms: None)


def test_sessions_that_die_at_once_back_off_exponentially() -> None:
    """An RP that expects another --pipes closes every set at once: the LP
    must not redial in a tight loop."""
    dialer = make_dialer()
    delays = [dialer.next_delay(session_was_useful=False) for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert max(delays) == MAX_BACKOFF


def test_a_useful_session_resets_the_backoff() -> None:
    dialer = make_dialer()
    for _ in range(5):
        dialer.next_delay(session_was_useful=False)
    assert dialer.next_delay(session_was_useful=True) == INITIAL_BACKOFF
    assert dialer.backoff == INITIAL_BACKOFF  # a failed redial then retries in 0.5 s
