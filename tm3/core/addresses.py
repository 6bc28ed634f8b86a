"""IPv4 addresses: the one parser every part of TM3 uses (pure, no I/O).

The SYN carries an IPv4 address and nothing else, so every address that may
end up in one (an option, a SOCKS request, a redirected connection's original
destination) is checked here, by :mod:`ipaddress`'s strict parser: four
decimal octets, no leading zeros. ``socket.inet_aton`` is not used anywhere:
it reads ``010.0.0.1`` as octal (8.0.0.1), ``127.1`` as 127.0.0.1 and
ignores anything after a space, so an option it accepted could name another
host than the user meant.
"""

from __future__ import annotations

import ipaddress
import re

_NUMERIC = re.compile(r"(0[xX][0-9a-fA-F]*|[0-9]+)(\.(0[xX][0-9a-fA-F]*|[0-9]+))*\.?")


class NotIPv4(ValueError):
    """The text is not a dotted-quad IPv4 address."""


def parse_ipv4(text: str) -> ipaddress.IPv4Address:
    """The address ``text`` names, or :class:`NotIPv4` saying why not."""
    try:
        return ipaddress.IPv4Address(text)
    except (ipaddress.AddressValueError, TypeError, ValueError) as e:
        raise NotIPv4(f"{text!r} is not an IPv4 address ({e}); give four decimal octets like 192.0.2.7") from None


def ipv4_literal(text: str) -> str | None:
    """``text`` as a canonical IPv4 literal; ``None`` if it is a name (to be
    resolved). Text made only of digits, dots and hex notation is never a
    name (no top-level domain is numeric), so a malformed literal such as
    ``010.0.0.1`` or ``127.1`` is :class:`NotIPv4`, not handed to a resolver
    that would read it the ``inet_aton`` way."""
    try:
        return str(parse_ipv4(text))
    except NotIPv4:
        if _NUMERIC.fullmatch(text.strip()):
            raise
        return None


def pack_ipv4(text: str) -> bytes:
    """The 4 bytes of ``text`` in network order (first octet first)."""
    return parse_ipv4(text).packed
