"""Which worker a pipe goes to, with ``--workers N``: pure, no I/O.

The front (tm3/rp/front.py) peeks at a new pipe's first bytes without taking
them (``MSG_PEEK``) and asks :func:`route` what it has learned:

- a v2 HELLO (the magic, then 40 more bytes): key ``v2`` and its session id,
  so every pipe of a v2 set lands on the worker that gathers it, whatever
  address each pipe comes from;
- first bytes that are not the magic (a v1 message), or nothing at all for
  the hello wait (an idle v1 LP): key ``addr`` and the source address, the
  key a v1 set is gathered by (tm3/rp/service.py);
- part of the magic, or nothing yet: not decided, wait for more.

:func:`worker_for` maps a key to a worker with a hash that is the same in
every process and every run (not Python's ``hash()``, which is salted per
process), so a restarted front sends a set where it sent its first pipes.
The front tells the worker what it learned in a tag (:data:`VERDICTS`) sent
with the socket; the worker still reads the bytes itself.
"""

from __future__ import annotations

import hashlib

from attrs import frozen

from tm3.core.handshake import HELLO_SIZE, MAGIC, NONCE_SIZE, SESSION_ID_SIZE, looks_like_hello

#: The front saw first bytes that are not the magic: a v1 pipe.
V1 = "v1"
#: The front saw a whole v2 HELLO.
V2 = "v2"
#: The pipe said nothing for the hello wait: v1 (an idle LP) where v1 is
#: served; the worker need not wait again.
QUIET = "quiet"
VERDICTS = (V1, V2, QUIET)

_SESSION_ID = slice(len(MAGIC) + NONCE_SIZE, len(MAGIC) + NONCE_SIZE + SESSION_ID_SIZE)
#: What the front peeks at: enough for a HELLO.
PEEK_SIZE = HELLO_SIZE


@frozen
class Route:
    verdict: str  # one of VERDICTS
    key: bytes  # what the worker is chosen by


def route(peeked: bytes, host: str, waited: bool = False) -> Route | None:
    """The route of a pipe from ``host`` whose first bytes so far are
    ``peeked``; ``waited``: the hello wait is over. ``None``: not decided."""
    verdict = looks_like_hello(peeked)
    if verdict is False:
        return Route(V1, address_key(host))
    if verdict is None:  # nothing yet, or part of the magic
        return Route(QUIET, address_key(host)) if waited and not peeked else None
    if len(peeked) < HELLO_SIZE:
        return None
    return Route(V2, b"v2 " + peeked[_SESSION_ID])


def address_key(host: str) -> bytes:
    return b"addr " + host.encode()


def worker_for(key: bytes, workers: int) -> int:
    """The worker (0..workers-1) for ``key``: the same in every process."""
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") % workers
