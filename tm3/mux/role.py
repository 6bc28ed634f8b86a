"""What differs between the two proxies, as one small interface.

The session (tm3/mux/session.py) is the same on both sides; a role object
plugged into it decides what the session cannot: how connections begin and
what a message for an id means. The RP's role (tm3/rp/role.py) connects on a
SYN and keeps docs/protocol.md rules 8 and 9; the LP's (tm3/lp/role.py) opens
connections itself, allocates ids (rule 7) and relays a server's reset only
after the bytes before it (flush, then reset).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from tm3.core.wire import Message, Syn
    from tm3.mux.connection import Connection


class IRole(Interface):
    upload_from_pipes = Attribute(
        "True where bytes from the pipes go to the server (the RP): which way the log's 'up' and 'down' point."
    )

    def route(msg: Message) -> None:
        """Give a message from the pipes to its connection (the session's
        ``inbound.push``), or hold or drop it. May raise ``ProtocolError``."""

    def syn_delivered(conn: Connection, msg: Syn) -> None:
        """The connection's SYN is in order: start it, or leave it parked."""

    def after_fin(conn: Connection, messages: list[Message]) -> None:
        """Messages numbered past ``conn``'s FIN (another connection's, with the same id)."""

    def connect(conn: Connection) -> None:
        """Open the connection's socket (Action.CONNECT)."""

    def cancel_connect(conn: Connection) -> None:
        """Stop a connect in flight, if there is one (part of Action.RESET_SOCKET)."""

    def peer_reset(conn: Connection) -> None:
        """The peer reset the connection (Action.PEER_RESET): reset the socket
        the way this role does it, and dispose of the queue."""

    def connection_over(conn: Connection) -> None:
        """The connection is over for this side: forget its id."""

    def session_ended() -> None:
        """The session ended: cancel timers, drop what is held."""
