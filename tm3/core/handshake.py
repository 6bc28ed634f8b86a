"""The version 2 pipe handshake (docs/protocol.md, "Version 2"): pure, no I/O.

Only our LP starts it, and only when it has a key: its first bytes on a pipe
are a HELLO that begins with :data:`MAGIC`, whose v1 ``length`` field (bytes
6-7) is 0, which no v1 message can have. A v1 peer never sees any of it: the
reference LP sends no hello, and our RP answers only a hello.

Each pipe proves the shared key over fresh nonces from both sides, in both
directions (HMAC-SHA256, compared in constant time)::

    LP -> RP  HELLO      magic, lp_nonce, session_id, n, index, lp_window   (48 bytes)
    RP -> LP  CHALLENGE  magic, rp_nonce, rp_window, rp_proof               (60 bytes)
    LP -> RP  PROOF      lp_proof                                           (32 bytes)

    transcript = HELLO (48 bytes) + rp_nonce + rp_window (u32 LE)
    rp_proof   = HMAC(key, "TM3v2 RP proof\\0" + transcript)
    lp_proof   = HMAC(key, "TM3v2 LP proof\\0" + transcript)

The RP proves itself first over the LP's fresh nonce, so a peer without the
key learns nothing it can replay; the LP's proof covers the RP's fresh nonce,
so a recorded handshake is worth nothing either; both cover the session id,
the pipe's index and count and both initial windows, so no field can be
changed on the way, and the distinct labels keep one side's proof from ever
serving as the other's. Pipe messages follow the PROOF on the same stream.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from attrs import frozen

MAGIC = b"TM3v2\x00\x00\x00"
_HELLO = struct.Struct("<8s16s16sHHI")
_CHALLENGE = struct.Struct("<8s16sI32s")
HELLO_SIZE = _HELLO.size  # 48
CHALLENGE_SIZE = _CHALLENGE.size  # 60
PROOF_SIZE = 32
NONCE_SIZE = 16
SESSION_ID_SIZE = 16
MIN_KEY_BYTES = 32  # characters of the file: 128 bits as hex, more as base64
MAX_PIPES = 1024
_RP_LABEL = b"TM3v2 RP proof\x00"
_LP_LABEL = b"TM3v2 LP proof\x00"


class HandshakeError(Exception):
    """The peer's handshake is malformed, or it does not know the key."""


@frozen
class Hello:
    nonce: bytes
    session_id: bytes
    n: int
    index: int
    window: int

    def encode(self) -> bytes:
        return _HELLO.pack(MAGIC, self.nonce, self.session_id, self.n, self.index, self.window)

    @classmethod
    def decode(cls, data: bytes) -> Hello:
        magic, nonce, session_id, n, index, window = _HELLO.unpack(data)
        if magic != MAGIC:
            raise HandshakeError(f"not a TM3 v2 hello (bytes {bytes(data[:8]).hex(' ')})")
        if not 1 <= n <= MAX_PIPES or index >= n:
            raise HandshakeError(f"hello for pipe {index} of {n} (a set has 1..{MAX_PIPES} pipes)")
        if window == 0:
            raise HandshakeError("hello with an initial window of 0 bytes")
        return cls(nonce, session_id, n, index, window)


def load_key(data: bytes, where: str = "the key") -> bytes:
    """The key in a key file's bytes: surrounding whitespace is ignored (so
    ``head -c 32 /dev/urandom | base64 > key`` works). Raises ``ValueError``."""
    key = data.strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"{where} has {len(key)} bytes; use at least {MIN_KEY_BYTES}"
            " (for example: head -c 32 /dev/urandom | base64 > tm3.key)"
        )
    return key


def _proof(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


def _transcript(hello: bytes, rp_nonce: bytes, rp_window: int) -> bytes:
    return hello + rp_nonce + struct.pack("<I", rp_window)


def looks_like_hello(first: bytes) -> bool | None:
    """Whether a pipe's first bytes are a v2 hello: True, False (a v1
    message), or None (too few bytes to tell yet)."""
    n = min(len(first), len(MAGIC))
    if first[:n] != MAGIC[:n]:
        return False
    return True if n == len(MAGIC) else None


class ServerHandshake:
    """The RP's side, for one pipe: :meth:`feed` it bytes; it returns what to
    send, and sets :attr:`hello` once the LP has proved the key."""

    def __init__(self, key: bytes, window: int, nonce: bytes | None = None) -> None:
        self._key = key
        self._window = window
        self._nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        self._buf = b""
        self._transcript = b""
        self._offered: Hello | None = None
        self.hello: Hello | None = None  # set when done
        self.rest = b""  # bytes after the PROOF: the first pipe messages

    @property
    def done(self) -> bool:
        return self.hello is not None

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the LP; returns bytes to send (the CHALLENGE, once)."""
        self._buf += data
        out = b""
        if self._offered is None:
            if len(self._buf) < HELLO_SIZE:
                return out
            raw, self._buf = self._buf[:HELLO_SIZE], self._buf[HELLO_SIZE:]
            self._offered = Hello.decode(raw)
            self._transcript = _transcript(raw, self._nonce, self._window)
            proof = _proof(self._key, _RP_LABEL, self._transcript)
            out = _CHALLENGE.pack(MAGIC, self._nonce, self._window, proof)
        if self.hello is None and len(self._buf) >= PROOF_SIZE:
            proof, self.rest = self._buf[:PROOF_SIZE], self._buf[PROOF_SIZE:]
            self._buf = b""
            if not hmac.compare_digest(proof, _proof(self._key, _LP_LABEL, self._transcript)):
                raise HandshakeError("wrong proof: the LP does not have this RP's key")
            self.hello = self._offered
        return out


class ClientHandshake:
    """The LP's side, for one pipe: send :meth:`hello_bytes`, then :meth:`feed`
    what the RP answers; it returns the PROOF to send and sets
    :attr:`peer_window` once the RP has proved the key."""

    def __init__(
        self, key: bytes, session_id: bytes, n: int, index: int, window: int, nonce: bytes | None = None
    ) -> None:
        self._key = key
        nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        self._hello = Hello(nonce, session_id, n, index, window).encode()
        self._buf = b""
        self.peer_window: int | None = None  # set when done
        self.rest = b""

    @property
    def done(self) -> bool:
        return self.peer_window is not None

    def hello_bytes(self) -> bytes:
        return self._hello

    def feed(self, data: bytes) -> bytes:
        self._buf += data
        if self.peer_window is not None or len(self._buf) < CHALLENGE_SIZE:
            return b""
        raw, self.rest = self._buf[:CHALLENGE_SIZE], self._buf[CHALLENGE_SIZE:]
        self._buf = b""
        magic, rp_nonce, rp_window, proof = _CHALLENGE.unpack(raw)
        if magic != MAGIC:
            raise HandshakeError(f"the RP did not answer with a TM3 v2 challenge (bytes {raw[:8].hex(' ')})")
        transcript = _transcript(self._hello, rp_nonce, rp_window)
        if not hmac.compare_digest(proof, _proof(self._key, _RP_LABEL, transcript)):
            raise HandshakeError("wrong proof: the RP does not have our key")
        if rp_window == 0:
            raise HandshakeError("the RP offered an initial window of 0 bytes")
        self.peer_window = rp_window
        return _proof(self._key, _LP_LABEL, transcript)


def new_session_id() -> bytes:
    return os.urandom(SESSION_ID_SIZE)
