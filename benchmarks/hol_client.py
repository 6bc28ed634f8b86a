"""The two clients of the head-of-line benchmark (benchmarks/hol.py), run by it
inside the Level 4 bed's client namespace. Standard library only.

``page SPEC.json``: a page-like load without a browser. SPEC lists the
objects (origin, path, size, sha256) and the connections per origin. Each
origin gets its own pool of that many persistent HTTP/1.1 connections (as a
browser keeps six per host), all opened at once; each connection takes the
next object of its origin's queue (page order), sends one GET and reads the
response to its last byte before taking another (no pipelining). Every
body is checked against its size and sha256. Prints one JSON object:
``load_ms`` (the first connect started to the last byte of the last object:
the handshakes count, as they do in a browser's load time), ``request_ms``
(the first request sent to that last byte), the CLOCK_MONOTONIC start and
end (to line up with the bulk download), the bytes and objects read, and
``errors`` (empty if every object arrived intact).

``bulk ORIGIN PATH``: one long download on one connection. It reads until
its stdin closes (or the body ends), noting (time, bytes so far) about every
20 ms, then prints them as JSON: what the benchmark needs to compute the
download's throughput during a page load.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import sys
import threading
import time
from typing import Any

SAMPLE_EVERY_S = 0.02


def _request(origin: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {origin}\r\nUser-Agent: tm3-hol\r\nAccept: */*\r\n\r\n".encode()


def _content_length(head: bytes) -> tuple[int, int]:
    """(status, Content-Length) of a response head."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return status, int(value.strip())
    raise ValueError(f"no Content-Length in {lines[0]!r}")


class Page:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.queues: dict[str, list[dict[str, Any]]] = {}
        for obj in spec["objects"]:
            self.queues.setdefault(obj["origin"], []).append(obj)
        self.errors: list[str] = []
        self.bytes = 0
        self.done = 0
        self.first_request: float | None = None
        self.last_byte = 0.0

    async def connection(self, origin: str) -> None:
        queue = self.queues[origin]
        if not queue:
            return
        try:
            reader, writer = await asyncio.open_connection(origin, self.spec.get("port", 80))
        except OSError as e:
            self.errors.append(f"connect {origin}: {e}")
            return
        try:
            while queue:
                obj = queue.pop(0)
                if self.first_request is None:
                    self.first_request = time.monotonic()
                writer.write(_request(origin, obj["path"]))
                head = await reader.readuntil(b"\r\n\r\n")
                status, length = _content_length(head)
                digest = hashlib.sha256()
                left = length
                while left:
                    chunk = await reader.read(min(left, 1 << 18))
                    if not chunk:
                        raise ConnectionError(f"EOF with {left} of {length} bytes to go")
                    digest.update(chunk)
                    left -= len(chunk)
                self.last_byte = time.monotonic()
                self.bytes += length
                if status != 200 or length != obj["size"] or digest.hexdigest() != obj["sha256"]:
                    self.errors.append(f"{origin}{obj['path']}: status {status}, {length} of {obj['size']} bytes")
                else:
                    self.done += 1
        except (OSError, ValueError, asyncio.IncompleteReadError, ConnectionError) as e:
            self.errors.append(f"{origin}: {type(e).__name__}: {e}")
        finally:
            writer.close()

    async def run(self) -> dict[str, Any]:
        start = time.monotonic()
        per_origin = int(self.spec["connections_per_origin"])
        tasks = [self.connection(origin) for origin in self.queues for _ in range(per_origin)]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), self.spec.get("timeout", 120))
        except TimeoutError:
            self.errors.append(f"timed out after {self.spec.get('timeout', 120)} s")
        expected = len(self.spec["objects"])
        if self.done != expected and not self.errors:
            self.errors.append(f"{self.done} of {expected} objects")
        first = self.first_request if self.first_request is not None else start
        return {
            "load_ms": (self.last_byte - start) * 1000,
            "request_ms": (self.last_byte - first) * 1000,
            "start": start,
            "end": self.last_byte,
            "objects": self.done,
            "bytes": self.bytes,
            "errors": self.errors,
        }


def bulk(origin: str, path: str) -> dict[str, Any]:
    sock = socket.create_connection((origin, 80), timeout=30)
    sock.settimeout(None)
    stop = threading.Event()

    def watch_stdin() -> None:
        sys.stdin.read()
        stop.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes the recv below
        except OSError:
            pass

    threading.Thread(target=watch_stdin, daemon=True).start()
    sock.sendall(_request(origin, path))
    samples: list[tuple[float, int]] = [(time.monotonic(), 0)]
    total = 0
    error = ""
    buf = bytearray(1 << 20)
    try:
        while not stop.is_set():
            n = sock.recv_into(buf)
            if not n:
                if not stop.is_set():
                    error = "the server closed the download"
                break
            total += n
            now = time.monotonic()
            if now - samples[-1][0] >= SAMPLE_EVERY_S:
                samples.append((now, total))
    except OSError as e:
        if not stop.is_set():
            error = f"{type(e).__name__}: {e}"
    samples.append((time.monotonic(), total))
    sock.close()
    return {"samples": samples, "bytes": total, "error": error}


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "page":
        with open(argv[2]) as f:
            spec = json.load(f)
        result = asyncio.run(Page(spec).run())
    elif len(argv) == 4 and argv[1] == "bulk":
        result = bulk(argv[2], argv[3])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
