"""Loopback ports with nothing listening on them, for "connection refused".

- :data:`HOST`: every test server and proxy here listens on 127.0.0.1 only.
- :func:`free_port`: a port nothing listens on, released at once.
- :func:`refusing_socket`: a socket bound but not listening, so connects to
  its port are refused and no other listener can take the port while the
  socket is open.
"""

from __future__ import annotations

import socket

HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback port with nothing listening (for "connection refused")."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def refusing_socket(port: int = 0, reuse_addr: bool = False) -> socket.socket:
    """A socket bound to ``HOST:port`` and not listening. ``reuse_addr``: bind
    even while the port's old connections sit in TIME_WAIT."""
    s = socket.socket()
    if reuse_addr:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST, port))
    return s
