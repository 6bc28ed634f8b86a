"""Recovering where a redirected TCP connection was originally headed.

This module owns the one kernel query the local proxy's transparent listener
needs: ``getsockopt(SOL_IP, SO_ORIGINAL_DST)``, which asks conntrack for the
destination a connection had before an iptables ``REDIRECT`` (installed by
``tm3-redirect``, see :mod:`tm3.lp.redirect`) rewrote it to the proxy's port.

It is IPv4 only, like ``tm3-redirect``: the transparent listener must listen on
an IPv4 address (``tcp:6001:interface=0.0.0.0``), not on ``::``.
"""

from __future__ import annotations

import errno
import socket
import struct

from twisted.internet.interfaces import ISystemHandle

__all__ = [
    "SO_ORIGINAL_DST",
    "NotRedirectedError",
    "original_destination",
    "original_destination_of",
    "parse_sockaddr_in",
]

#: From <linux/netfilter_ipv4.h>; Python's socket module does not export it.
SO_ORIGINAL_DST = 80

#: sizeof(struct sockaddr_in): family, port, address and 8 bytes of padding.
_SOCKADDR_IN_LEN = 16

# sa_family is in host byte order, sin_port in network order, then sin_addr.
_SOCKADDR_IN = struct.Struct("=H")
_PORT = struct.Struct("!H")

# The errors conntrack gives when it has nothing to tell: ENOENT means no
# conntrack entry matches the socket, ENOPROTOOPT that nf_conntrack is not
# loaded (or the socket is not TCP/SCTP). Both mean "not redirected here".
_NOT_REDIRECTED_ERRNOS = frozenset({errno.ENOENT, errno.ENOPROTOOPT})


class NotRedirectedError(OSError):
    """The connection has no original destination other than its own.

    Raised when the kernel has no NAT record for the connection, or when the
    record's destination is the socket's own local address: then the client
    connected straight to the proxy's port instead of being redirected to it,
    and forwarding "to the original destination" would loop back into the
    proxy.
    """


def parse_sockaddr_in(raw: bytes) -> tuple[str, int]:
    """Decode a ``struct sockaddr_in`` into ``(dotted_quad, port)``.

    :raises ValueError: if ``raw`` is too short or not ``AF_INET``.
    """
    if len(raw) < 8:
        raise ValueError(f"sockaddr_in needs at least 8 bytes, got {len(raw)}")
    (family,) = _SOCKADDR_IN.unpack_from(raw, 0)
    if family != socket.AF_INET:
        raise ValueError(f"not an AF_INET sockaddr (family {family})")
    (port,) = _PORT.unpack_from(raw, 2)
    return socket.inet_ntoa(raw[4:8]), port


def _query(sock: socket.socket) -> tuple[str, int]:
    if sock.family != socket.AF_INET:
        raise ValueError(
            "SO_ORIGINAL_DST is IPv4 only: listen on an IPv4 address "
            f"(socket family is {socket.AddressFamily(sock.family).name})"
        )
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
    except OSError as e:
        if e.errno in _NOT_REDIRECTED_ERRNOS:
            raise NotRedirectedError(
                e.errno,
                f"connection was not redirected (no NAT record: {e.strerror}); is tm3-redirect on?",
            ) from e
        raise
    original = parse_sockaddr_in(raw)
    # When conntrack is loaded but the connection was never NATed, the kernel
    # happily answers with the destination the client used, which is us.
    local = sock.getsockname()
    if original == (local[0], local[1]):
        raise NotRedirectedError(
            errno.ENOENT,
            f"connection was not redirected: it was made directly to "
            f"{original[0]}:{original[1]}, the proxy's own address",
        )
    return original


def original_destination(sock_or_fileno: socket.socket | int) -> tuple[str, int]:
    """Return the ``(ip, port)`` a redirected TCP connection was sent to.

    :param sock_or_fileno: the *accepted* connection, as a socket object or
        a file descriptor (which is left open and owned by the caller).
    :raises NotRedirectedError: the connection was not redirected.
    :raises ValueError: the socket is not IPv4.
    :raises OSError: any other failure of the query (e.g. a closed socket).
    """
    if isinstance(sock_or_fileno, socket.socket):
        return _query(sock_or_fileno)
    # socket.socket(fileno=...) would take ownership of the descriptor and
    # close it on garbage collection; detach() hands it back untouched.
    sock = socket.socket(fileno=sock_or_fileno)
    try:
        return _query(sock)
    finally:
        sock.detach()


def original_destination_of(transport: object) -> tuple[str, int]:
    """Like :func:`original_destination`, for an accepted Twisted TCP transport.

    Call it from ``connectionMade`` of the protocol built by the transparent
    listener's factory (``self.transport``).

    :raises TypeError: the transport has no OS socket (e.g. a test
        ``StringTransport``), so it cannot have been redirected.
    """
    if not ISystemHandle.providedBy(transport):
        raise TypeError(
            f"{type(transport).__name__} has no system socket handle "
            "(ISystemHandle); cannot ask for its original destination"
        )
    handle: object = transport.getHandle()
    if not isinstance(handle, socket.socket):
        raise TypeError(f"transport handle is {type(handle).__name__}, not a socket")
    return original_destination(handle)
