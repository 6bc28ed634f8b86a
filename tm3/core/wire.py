"""The TM3 pipe message codec (docs/protocol.md, "Messages"): pure, no I/O.

Owns the byte format and nothing else: encoding SYN, DATA and FIN messages,
and a streaming :class:`Decoder` that cuts a pipe's byte stream into messages
by the length field alone, whatever the TCP segmentation was.

Speed matters here (every byte of every connection passes through it), so the
decoder keeps one ``bytearray`` of unparsed bytes, parses headers with
``struct.unpack_from`` at an offset, copies each payload exactly once, and
compacts the buffer once per read rather than once per message (Twisted's
``IntNStringReceiver`` re-concatenates per read, which is quadratic for large
messages arriving in pieces).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import NamedTuple

from tm3.core.addresses import pack_ipv4

HEADER = struct.Struct("<HIH")
HEADER_SIZE = HEADER.size  # 8
_SYN_BODY = struct.Struct("<4sH")  # address in network order, port little-endian

LEN_SYN = 0xFFFF
LEN_FIN = 0xFFFE
LEN_CREDIT = 1  # version 2 only: invalid in v1, where a length is at least 8
MAX_DATA_LENGTH = 0xFFFD
SYN_SIZE = HEADER_SIZE + _SYN_BODY.size  # 14
FIN_SIZE = HEADER_SIZE + 1  # 9

MAX_PAYLOAD = MAX_DATA_LENGTH - HEADER_SIZE  # 65525
DEFAULT_PAYLOAD = 4096  # what the reference LP is known to handle

REASON_FIN = 0x88  # orderly close (TCP FIN)
REASON_RST = 0x99  # abort (TCP RST)

SEQ_MASK = 0xFFFFFFFF


class Syn(NamedTuple):
    """Open a connection to ``host:port`` (LP -> RP only, always seq 0)."""

    conn_id: int
    seq: int
    host: str
    port: int


class Data(NamedTuple):
    """Payload bytes of one connection, one direction."""

    conn_id: int
    seq: int
    payload: bytes


class Fin(NamedTuple):
    """The sender's last message for a connection: ``REASON_FIN`` or ``REASON_RST``."""

    conn_id: int
    seq: int
    reason: int


class Credit(NamedTuple):
    """Version 2: the receiver lets the sender send ``increment`` more payload
    bytes on the connection (docs/protocol.md, "Flow control"). It takes no
    sequence number and is acted on when it arrives, on whatever pipe."""

    conn_id: int
    increment: int


Message = Syn | Data | Fin


class ProtocolError(Exception):
    """A peer broke docs/protocol.md. ``offset`` is the byte offset in the pipe's
    stream where the offending message starts, ``data`` its first bytes."""

    def __init__(self, reason: str, offset: int = -1, data: bytes = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset
        self.data = data

    def __str__(self) -> str:
        where = f" at offset {self.offset}" if self.offset >= 0 else ""
        raw = f" (bytes {self.data.hex(' ')})" if self.data else ""
        return f"{self.reason}{where}{raw}"


def encode_syn(conn_id: int, host: str, port: int, seq: int = 0) -> bytes:
    """Raises ``ValueError`` (:class:`~tm3.core.addresses.NotIPv4`) for a
    host that is not a dotted-quad IPv4 address, or a port out of range."""
    packed = pack_ipv4(host)
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} is outside 0..65535")
    return HEADER.pack(conn_id, seq, LEN_SYN) + _SYN_BODY.pack(packed, port)


def encode_fin(conn_id: int, seq: int, reason: int) -> bytes:
    return HEADER.pack(conn_id, seq, LEN_FIN) + bytes((reason,))


def encode_credit(conn_id: int, increment: int) -> bytes:
    return HEADER.pack(conn_id, increment, LEN_CREDIT)


def data_header(conn_id: int, seq: int, payload_length: int) -> bytes:
    """The 8 header bytes of a DATA message; the payload follows as-is, so a
    sender can hand ``[header, payload]`` to ``writeSequence`` without a copy."""
    if payload_length > MAX_PAYLOAD:
        raise ValueError(f"DATA payload {payload_length} exceeds {MAX_PAYLOAD}")
    return HEADER.pack(conn_id, seq, payload_length + HEADER_SIZE)


def encode_data(conn_id: int, seq: int, payload: bytes) -> bytes:
    return data_header(conn_id, seq, len(payload)) + payload


def encode(message: Message) -> bytes:
    if isinstance(message, Data):
        return encode_data(message.conn_id, message.seq, message.payload)
    if isinstance(message, Fin):
        return encode_fin(message.conn_id, message.seq, message.reason)
    return encode_syn(message.conn_id, message.host, message.port, message.seq)


def wire_size(message: Message) -> int:
    if isinstance(message, Data):
        return HEADER_SIZE + len(message.payload)
    return FIN_SIZE if isinstance(message, Fin) else SYN_SIZE


class Decoder:
    """Cuts a byte stream into messages.

    ``feed`` is a generator so that :attr:`offset` names the stream offset of
    the message just yielded while the caller acts on it: a protocol error
    found later (a duplicate seq, say) can still be logged with its place.
    Always consume the generator fully (or close it); the unparsed tail is
    kept when it finishes.
    """

    __slots__ = ("_buf", "_base", "offset", "v2")

    def __init__(self, v2: bool = False) -> None:
        self.v2 = v2  # accept version 2's CREDIT messages
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self.offset = 0  # stream offset of the message last yielded

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a whole message."""
        return len(self._buf)

    def feed(self, data: bytes) -> Iterator[Message | Credit]:
        buf = self._buf
        if buf:
            buf += data
            source: bytes | bytearray = buf
        else:
            source = data  # common case: no leftover, parse the read in place
        end = len(source)
        pos = 0
        unpack = HEADER.unpack_from
        view = memoryview(source)
        try:
            while end - pos >= HEADER_SIZE:
                conn_id, seq, length = unpack(source, pos)
                if length <= MAX_DATA_LENGTH:
                    if length < HEADER_SIZE:
                        if length == LEN_CREDIT and self.v2:
                            self.offset = self._base + pos
                            pos += HEADER_SIZE
                            yield Credit(conn_id, seq)
                            continue
                        raise ProtocolError(
                            f"invalid length {length} (must be >= 8)",
                            self._base + pos,
                            bytes(view[pos : pos + HEADER_SIZE]),
                        )
                    if end - pos < length:
                        break
                    self.offset = self._base + pos
                    msg: Message = Data(conn_id, seq, bytes(view[pos + HEADER_SIZE : pos + length]))
                    pos += length
                elif length == LEN_FIN:
                    if end - pos < FIN_SIZE:
                        break
                    self.offset = self._base + pos
                    msg = Fin(conn_id, seq, source[pos + HEADER_SIZE])
                    pos += FIN_SIZE
                else:  # LEN_SYN
                    if end - pos < SYN_SIZE:
                        break
                    self.offset = self._base + pos
                    addr, port = _SYN_BODY.unpack_from(source, pos + HEADER_SIZE)
                    msg = Syn(conn_id, seq, socket.inet_ntoa(addr), port)
                    pos += SYN_SIZE
                yield msg
        finally:
            view.release()
            # Compact once per read, not per message.
            if source is buf:
                del buf[:pos]
            elif pos < end:
                self._buf = bytearray(memoryview(data)[pos:])
            self._base += pos
