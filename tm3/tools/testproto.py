"""The experiment tools' wire format and deterministic payload, without I/O.

This module owns what ``tm3-testserver`` and ``tm3-testclient`` must agree on:

* The request header.  Every request is a 16-byte header followed by the
  request body; the server answers with exactly ``response_length`` bytes and
  nothing else (no response header: the client knows what it asked for)::

      offset  size  field
      0       4     magic b"TM3T"
      4       4     request index        u32, big-endian
      8       4     request body length  u32, big-endian
      12      4     response length      u32, big-endian

* The deterministic byte pattern that fills request bodies and responses.
  Byte ``p`` of the request body (or response) of request ``index`` is
  ``PATTERN[(start(index, stream) + p) % PATTERN_PERIOD]``, where ``PATTERN``
  is the first 65521 bytes of SHAKE-256 of ``PATTERN_SEED``.  The period is
  prime so that no power-of-two sized transfer lines up with it, and the start
  depends on the index and the direction, so a response sent for the wrong
  request, a request echoed back, or bytes shifted by a lost or duplicated
  segment all show up as mismatches.

Everything here works on whole slices (``bytes`` compare with ``memcmp``);
Python-level per-byte loops run only after a slice has already been found to
differ, to locate the first wrong byte for the error message.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Iterator

from attrs import define, field, frozen

__all__ = [
    "CHUNK_SIZE",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_U32",
    "PATTERN_PERIOD",
    "PATTERN_SEED",
    "HeaderError",
    "Mismatch",
    "PatternChecker",
    "RequestHeader",
    "Stream",
    "decode_header",
    "encode_header",
    "find_mismatch",
    "pattern_byte",
    "pattern_bytes",
    "pattern_chunks",
    "pattern_start",
]

MAGIC = b"TM3T"
HEADER = struct.Struct("!4sIII")
HEADER_SIZE = HEADER.size
MAX_U32 = 2**32 - 1

#: Largest prime below 2**16.
PATTERN_PERIOD = 65521
PATTERN_SEED = b"TM3 test pattern v1"
#: How far the start of consecutive request indices is apart in the pattern.
#: Any stride coprime with the (prime) period visits every start position.
_INDEX_STRIDE = 7919

#: Responses are written and requests checked in pieces of this size: big
#: enough that per-call overhead is negligible, small enough that a paused
#: transport holds at most a couple of them beyond its own 64 KiB buffer.
CHUNK_SIZE = 64 * 1024

# The largest slice served without joining.  The buffer repeats the pattern
# so that any slice of up to _MAX_SLICE bytes starting anywhere in the first
# period is one contiguous bytes slice (one memcpy, no modulo per byte).
_MAX_SLICE = 4 * CHUNK_SIZE
_PATTERN = hashlib.shake_256(PATTERN_SEED).digest(PATTERN_PERIOD)
_BUFFER = _PATTERN * (1 + -(-_MAX_SLICE // PATTERN_PERIOD))


class HeaderError(ValueError):
    """A request header that is not a TM3 test request."""


class Stream(enum.IntEnum):
    """Which direction's pattern: requests and responses use different ones."""

    REQUEST = 0
    RESPONSE = 1


_STREAM_SALT = {Stream.REQUEST: 0, Stream.RESPONSE: PATTERN_PERIOD // 2}


def _check_u32(name: str, value: int) -> int:
    if not 0 <= value <= MAX_U32:
        raise ValueError(f"{name} must be in 0..{MAX_U32}, got {value}")
    return value


@frozen
class RequestHeader:
    """The fixed header in front of every request body."""

    index: int = field(converter=int)
    request_length: int = field(converter=int)
    response_length: int = field(converter=int)

    def __attrs_post_init__(self) -> None:
        _check_u32("index", self.index)
        _check_u32("request_length", self.request_length)
        _check_u32("response_length", self.response_length)

    def encode(self) -> bytes:
        return HEADER.pack(MAGIC, self.index, self.request_length, self.response_length)


def encode_header(index: int, request_length: int, response_length: int) -> bytes:
    """The 16 header bytes for one request."""
    return RequestHeader(index, request_length, response_length).encode()


def decode_header(data: bytes | bytearray | memoryview, offset: int = 0) -> RequestHeader:
    """Parse the header at ``data[offset:offset + HEADER_SIZE]``.

    Raises :class:`HeaderError` when the magic is wrong and ``ValueError``
    (from :mod:`struct`) when fewer than :data:`HEADER_SIZE` bytes are there.
    """
    try:
        magic, index, request_length, response_length = HEADER.unpack_from(data, offset)
    except struct.error as e:
        raise ValueError(f"need {HEADER_SIZE} header bytes: {e}") from e
    if magic != MAGIC:
        raise HeaderError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    return RequestHeader(index, request_length, response_length)


def pattern_start(index: int, stream: Stream) -> int:
    """Where in the pattern the body of request ``index`` (or its response) starts."""
    return (index * _INDEX_STRIDE + _STREAM_SALT[stream]) % PATTERN_PERIOD


def pattern_byte(index: int, stream: Stream, position: int) -> int:
    """The single byte at ``position``; for error messages, not for bulk work."""
    return _PATTERN[(pattern_start(index, stream) + position) % PATTERN_PERIOD]


def pattern_bytes(index: int, stream: Stream, offset: int, length: int) -> bytes:
    """Bytes ``offset .. offset + length`` of the body (or response) of ``index``."""
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
    start = (pattern_start(index, stream) + offset) % PATTERN_PERIOD
    if length <= _MAX_SLICE:
        return _BUFFER[start : start + length]
    return b"".join(pattern_chunks(index, stream, length, _MAX_SLICE, offset))


def pattern_chunks(
    index: int,
    stream: Stream,
    length: int,
    chunk_size: int = CHUNK_SIZE,
    offset: int = 0,
) -> Iterator[bytes]:
    """``length`` pattern bytes from ``offset``, as chunks of at most ``chunk_size``.

    Lazy, so a 4 GiB response costs one chunk of memory at a time.
    """
    if not 0 < chunk_size <= _MAX_SLICE:
        raise ValueError(f"chunk_size must be in 1..{_MAX_SLICE}, got {chunk_size}")
    start = pattern_start(index, stream)
    end = offset + length
    while offset < end:
        n = min(chunk_size, end - offset)
        s = (start + offset) % PATTERN_PERIOD
        yield _BUFFER[s : s + n]
        offset += n


@frozen
class Mismatch:
    """The first wrong byte: ``position`` counts from the start of the body or response."""

    position: int
    expected: int
    actual: int

    def describe(self) -> str:
        return f"byte mismatch at offset {self.position} (expected 0x{self.expected:02x}, got 0x{self.actual:02x})"


def find_mismatch(
    index: int,
    stream: Stream,
    offset: int,
    data: bytes | bytearray | memoryview,
) -> Mismatch | None:
    """Check that ``data`` is the pattern from ``offset`` on; ``None`` if it is."""
    view = memoryview(data).cast("B")
    done = 0
    total = len(view)
    while done < total:
        n = min(_MAX_SLICE, total - done)
        # bytes == bytes is a memcmp; memoryview == bytes would compare item
        # by item and is ~40 times slower.
        got = bytes(view[done : done + n])
        want = pattern_bytes(index, stream, offset + done, n)
        if got != want:
            i = next(i for i in range(n) if got[i] != want[i])
            return Mismatch(offset + done + i, want[i], got[i])
        done += n
    return None


@define
class PatternChecker:
    """Verifies one body (or response) as it arrives in arbitrary pieces."""

    index: int
    stream: Stream
    length: int
    received: int = 0

    @property
    def remaining(self) -> int:
        return self.length - self.received

    @property
    def complete(self) -> bool:
        return self.received == self.length

    def feed(self, data: bytes | bytearray | memoryview) -> Mismatch | None:
        """Check the next piece; callers slice off anything beyond :attr:`remaining`."""
        if len(data) > self.remaining:
            raise ValueError(f"{len(data)} bytes fed, only {self.remaining} expected")
        mismatch = find_mismatch(self.index, self.stream, self.received, data)
        self.received += len(data)
        return mismatch
