"""Blocking TCP servers in threads: :class:`ThreadServer`.

For sockets the reactor should not serve: ones made inside another network
namespace (a handful of connections, and the test's reactor stays in the
root namespace), or a benchmark's source and sink, whose cost must stay out
of the reactor being measured.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


class ThreadServer:
    """Accepts on the listening socket ``sock`` in a daemon thread and calls
    ``respond(conn)`` for each connection, then closes it; an ``OSError``
    from ``respond`` (the peer went away) ends that connection only.

    ``once``: serve the first connection only, closing the listening socket
    as soon as it is accepted. ``conn_timeout`` bounds every blocking call on
    a connection (``None``: no bound)."""

    def __init__(
        self,
        sock: socket.socket,
        respond: Callable[[socket.socket], None],
        *,
        once: bool = False,
        conn_timeout: float | None = 5.0,
    ) -> None:
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.respond = respond
        self.once = once
        self.conn_timeout = conn_timeout
        self.stop = threading.Event()
        sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @classmethod
    def on_loopback(
        cls, respond: Callable[[socket.socket], None], *, once: bool = False, conn_timeout: float | None = 5.0
    ) -> ThreadServer:
        """A server on a new socket listening on 127.0.0.1, port 0 (see :attr:`port`)."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        return cls(sock, respond, once=once, conn_timeout=conn_timeout)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.once:
                self.sock.close()
            with conn:
                conn.settimeout(self.conn_timeout)
                try:
                    self.respond(conn)
                except OSError:
                    pass
            if self.once:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()
