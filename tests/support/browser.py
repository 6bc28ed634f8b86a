"""A real browser on the Level 4 bed: Debian's ``/usr/bin/chromium`` driven by
Playwright for Python, inside the client's network namespace.

The test process stays in the root namespace, so the browser cannot be driven
from it directly: :class:`Browser` starts this module as a script under
``ip netns exec`` (``python -m tests.support.browser OPTIONS``), which launches
Chromium through Playwright (headless, ``--no-sandbox`` since we run as root)
and then serves commands, one JSON object a line on its stdin, one
``RESULT {json}`` line on its stdout for each. Chromium and Playwright's own
driver are children of the script, so everything runs in the client's
namespace. One Chromium serves many commands; each command gets a fresh
browser context (no cache, no cookies, no open connections from before:
Chromium gives each context its own network context and socket pools).

Modes, chosen when the browser starts:

* direct and transparent: no proxy (``--no-proxy-server``); whether the
  client's connections go through TM3 is up to the bed's redirect rules
  (``Level4.redirect``).
* SOCKS5: ``--proxy-server=socks5://127.0.0.1:1080`` and
  ``--proxy-bypass-list=<-loopback>`` (without it Chromium sends loopback
  destinations direct).

HTTPS: Chromium trusts the bed's web server by the hash of its public key
(``--ignore-certificate-errors-spki-list``), that key only, not by ignoring
certificate errors.

Commands: :meth:`Browser.load` (a page load: load time from navigation start
to the load event, resource timing entries, failed requests, a full-page
screenshot) and :meth:`Browser.video` (play a ``<video>``, seek, play on).
:func:`screenshot_difference` compares two screenshots pixel by pixel (PNGs
decoded by ffmpeg).

The script's HOME and TMPDIR are directories under the ``workdir`` given to
:class:`Browser`, so Chromium's profile, caches and crash reports stay there;
but when that path is too long for the UNIX socket Chromium keeps in TMPDIR
(pytest's directories are), TMPDIR (and with it the profile) is a fresh
directory in the system's temporary directory instead, removed on
:meth:`Browser.close`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attrs import frozen

if TYPE_CHECKING:
    from tests.support.netns import Host

__all__ = [
    "CHROMIUM",
    "Browser",
    "BrowserError",
    "PageLoad",
    "Request",
    "Resource",
    "VideoRun",
    "screenshot_difference",
    "spki_hash",
]

CHROMIUM = "/usr/bin/chromium"
VIEWPORT_WIDTH, VIEWPORT_HEIGHT = 1280, 900
RESULT = "RESULT "
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")


class BrowserError(RuntimeError):
    """The driver failed or answered with an error."""


@frozen
class Resource:
    """One resource timing entry (``performance.getEntriesByType('resource')``)."""

    name: str
    initiator: str
    #: Bytes over the network, headers included (0 for a cache hit).
    transfer_size: int
    #: The body as sent (before content decoding).
    encoded_size: int
    start_ms: float
    duration_ms: float
    protocol: str


@frozen
class Request:
    """A request Chromium made, as Playwright saw it."""

    url: str
    resource_type: str
    range: str  # the Range header, "" without one
    at_s: float  # seconds since the command started


@frozen
class PageLoad:
    url: str
    #: Navigation start to the load event's end (``loadEventEnd``), ms.
    load_ms: float
    dom_content_loaded_ms: float
    #: The page itself (its navigation timing entry's encodedBodySize).
    document_size: int
    resources: tuple[Resource, ...]
    #: Requests that failed (network errors) or got an HTTP status >= 400.
    failed: tuple[str, ...]
    #: Uncaught exceptions in the page.
    errors: tuple[str, ...]
    #: The text of every element whose id starts with ``js-`` (what the scripts wrote).
    marks: tuple[str, ...]
    screenshot: Path | None
    requests: tuple[Request, ...]

    def resource_names(self) -> set[str]:
        return {r.name for r in self.resources}


@frozen
class VideoRun:
    url: str
    #: The video's state after playing, before the seek, and at the end:
    #: currentTime, paused, ended, readyState, error, buffered ranges [[start, end], ...].
    before_seek: dict[str, Any]
    after_seek: dict[str, Any]
    seek_to: float
    #: Wall-clock seconds to play up to ``before_seek["currentTime"]`` from play().
    play_s: float
    #: Wall-clock seconds from setting currentTime to playing on past seek_to + the margin.
    seek_s: float
    requests: tuple[Request, ...]
    #: Seconds since the command started at which the seek was made.
    seek_at_s: float
    #: Requests that failed, and errors in the page.
    failed: tuple[str, ...]
    #: Media requests Chromium cancelled itself ("URL RANGE"): the stream it
    #: was reading when the seek needed another.
    aborted: tuple[str, ...]

    def media_requests(self, after_seek: bool) -> list[Request]:
        return [r for r in self.requests if r.resource_type == "media" and (r.at_s >= self.seek_at_s) == after_seek]


def spki_hash(cert_pem: Path) -> str:
    """base64(sha256(SubjectPublicKeyInfo)) of a certificate: what
    ``--ignore-certificate-errors-spki-list`` takes."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


class Browser:
    """Chromium in ``host``'s namespace, driven over the script's stdin/stdout.

    ``socks``: ``"127.0.0.1:1080"`` for SOCKS5 mode, None for none.
    ``trust``: a certificate (PEM) whose public key Chromium accepts for HTTPS.
    """

    def __init__(
        self,
        host: Host,
        workdir: Path,
        *,
        socks: str | None = None,
        trust: Path | None = None,
        timeout: float = 120,
    ) -> None:
        self.host = host
        self.workdir = workdir
        self.timeout = timeout
        workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("home", "tmp"):
            (workdir / sub).mkdir(exist_ok=True)
        # Chromium puts a UNIX socket in TMPDIR (org.chromium.Chromium.XXXXXX/SingletonSocket)
        # and aborts if its path passes sun_path's 108 bytes: pytest's directories are long.
        self._short_tmp: str | None = None
        tmpdir = str(workdir / "tmp")
        if len(tmpdir) + len("/org.chromium.Chromium.XXXXXX/SingletonSocket") >= 108:
            self._short_tmp = tmpdir = tempfile.mkdtemp(prefix="tm3-browser-")
        options = {"socks": socks, "spki": spki_hash(trust) if trust is not None else None}
        env = {k: v for k, v in _driver_env().items() if k.lower() not in _PROXY_VARIABLES}
        env.update(
            HOME=str(workdir / "home"),
            TMPDIR=tmpdir,
            XDG_CONFIG_HOME=str(workdir / "home" / ".config"),
            XDG_CACHE_HOME=str(workdir / "home" / ".cache"),
        )
        self._stderr = (workdir / "driver.log").open("w")
        self.proc = host.popen(
            host.python_argv("-m", "tests.support.browser", json.dumps(options)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
            bufsize=1,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, name="browser-driver", daemon=True).start()
        try:
            ready = self._answer(60)
        except BaseException:
            self.close()
            raise
        self.version = str(ready.get("version", ""))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT):
                self._lines.put(line[len(RESULT) :])
        self._lines.put(None)

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise BrowserError(
                f"no answer from the browser driver in {timeout:g} s; see {self.workdir / 'driver.log'}"
            ) from None
        if line is None:
            raise BrowserError(f"the browser driver exited; see {self.workdir / 'driver.log'}: {self._log_tail()}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise BrowserError(answer["error"])
        return answer

    def _log_tail(self) -> str:
        self._stderr.flush()
        return (self.workdir / "driver.log").read_text(errors="replace")[-2000:]

    def _command(self, **command: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._answer(self.timeout + 30)

    def load(self, url: str, screenshot: Path | None = None) -> PageLoad:
        """Load ``url`` in a fresh context; with ``screenshot``, a full-page
        PNG there once every image has decoded."""
        a = self._command(op="load", url=url, screenshot=str(screenshot) if screenshot else None, timeout=self.timeout)
        return PageLoad(
            url=url,
            load_ms=a["load_ms"],
            dom_content_loaded_ms=a["dom_content_loaded_ms"],
            document_size=a["document_size"],
            resources=tuple(Resource(**r) for r in a["resources"]),
            failed=tuple(a["failed"]),
            errors=tuple(a["errors"]),
            marks=tuple(a["marks"]),
            screenshot=screenshot,
            requests=tuple(Request(**r) for r in a["requests"]),
        )

    def video(self, url: str, *, rate: float = 4, play_to: float = 12, seek_margin: float = 3) -> VideoRun:
        """Open ``url`` (a page with ``<video id="v">``), play at ``rate``
        until currentTime >= ``play_to``, then seek past what Chromium has
        buffered and play on ``seek_margin`` s of media."""
        a = self._command(
            op="video", url=url, rate=rate, play_to=play_to, seek_margin=seek_margin, timeout=self.timeout
        )
        return VideoRun(
            url=url,
            before_seek=a["before_seek"],
            after_seek=a["after_seek"],
            seek_to=a["seek_to"],
            play_s=a["play_s"],
            seek_s=a["seek_s"],
            requests=tuple(Request(**r) for r in a["requests"]),
            seek_at_s=a["seek_at_s"],
            failed=tuple(a["failed"]),
            aborted=tuple(a["aborted"]),
        )

    def close(self) -> None:
        """Ask the driver to quit (it closes Chromium); kill its whole process
        group (the driver, Playwright's node and Chromium) if it has not in 20 s."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            except OSError:
                pass
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # popen made it a session (and group) leader
                self.proc.wait(5)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self._stderr.close()
        if self._short_tmp is not None:
            shutil.rmtree(self._short_tmp, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _driver_env() -> dict[str, str]:
    from tests.support.processes import python_env

    return python_env()


# -- screenshots ---------------------------------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _rgb(path: Path) -> bytes:
    ffmpeg = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
    done = subprocess.run(
        [ffmpeg, "-nostdin", "-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def screenshot_difference(a: Path, b: Path) -> tuple[int, int]:
    """(pixels that differ, pixels in all) between two screenshots; every
    pixel differs if their sizes do."""
    size_a, size_b = _png_size(a), _png_size(b)
    total = size_a[0] * size_a[1]
    if size_a != size_b:
        return max(total, size_b[0] * size_b[1]), max(total, size_b[0] * size_b[1])
    if a.read_bytes() == b.read_bytes():
        return 0, total
    rgb_a, rgb_b = _rgb(a), _rgb(b)
    row = size_a[0] * 3
    differ = 0
    for y in range(size_a[1]):
        ra, rb = rgb_a[y * row : (y + 1) * row], rgb_b[y * row : (y + 1) * row]
        if ra != rb:
            differ += sum(1 for x in range(0, row, 3) if ra[x : x + 3] != rb[x : x + 3])
    return differ, total


# -- the driver: runs inside the namespace -----------------------------------------------------

_STATE_JS = """v => ({
    currentTime: v.currentTime, paused: v.paused, ended: v.ended, readyState: v.readyState,
    networkState: v.networkState, duration: v.duration, playbackRate: v.playbackRate,
    error: v.error ? {code: v.error.code, message: v.error.message} : null,
    buffered: Array.from({length: v.buffered.length}, (_, i) => [v.buffered.start(i), v.buffered.end(i)]),
})"""

_MARKS_JS = "() => Array.from(document.querySelectorAll('[id^=\"js-\"]'), e => e.textContent)"

_RESOURCES_JS = """() => performance.getEntriesByType('resource').map(e => ({
    name: e.name, initiator: e.initiatorType, transfer_size: e.transferSize, encoded_size: e.encodedBodySize,
    start_ms: e.startTime, duration_ms: e.duration, protocol: e.nextHopProtocol,
}))"""

_DECODE_JS = "() => Promise.all(Array.from(document.images, i => i.decode().then(() => 'ok', e => String(e))))"


class _Driver:
    def __init__(self, options: dict[str, Any]) -> None:
        from playwright.sync_api import sync_playwright

        args = ["--no-sandbox", "--autoplay-policy=no-user-gesture-required", "--disable-component-update"]
        if options.get("socks"):
            args += [f"--proxy-server=socks5://{options['socks']}", "--proxy-bypass-list=<-loopback>"]
        else:
            args.append("--no-proxy-server")
        if options.get("spki"):
            args.append(f"--ignore-certificate-errors-spki-list={options['spki']}")
        self.playwright = sync_playwright().start()
        self.browser = self.playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)

    def context(self) -> Any:
        return self.browser.new_context(
            viewport={"width": VIEWPORT_WIDTH, "height": VIEWPORT_HEIGHT}, device_scale_factor=1
        )

    @staticmethod
    def watch(page: Any, start: float) -> tuple[list[str], list[dict[str, Any]], list[str], list[str]]:
        """Collects failed requests, every request, page errors, and apart from
        the failures the media requests Chromium aborted itself (as it does
        with the stream it was reading when a seek needs another)."""
        failed: list[str] = []
        requests: list[dict[str, Any]] = []
        errors: list[str] = []
        aborted: list[str] = []

        def on_request(r: Any) -> None:
            requests.append(
                {
                    "url": r.url,
                    "resource_type": r.resource_type,
                    "range": r.headers.get("range", ""),
                    "at_s": time.monotonic() - start,
                }
            )

        def on_response(r: Any) -> None:
            if r.status >= 400:
                failed.append(f"{r.url}: HTTP {r.status}")

        def on_failed(r: Any) -> None:
            if r.resource_type == "media" and r.failure == "net::ERR_ABORTED":
                aborted.append(f"{r.url} {r.headers.get('range', '')}")
            else:
                failed.append(f"{r.url}: {r.failure}")

        page.on("request", on_request)
        page.on("requestfailed", on_failed)
        page.on("response", on_response)
        page.on("pageerror", lambda e: errors.append(str(e)))
        return failed, requests, errors, aborted

    @contextmanager
    def opened(
        self, url: str, timeout: float
    ) -> Iterator[tuple[Any, float, list[str], list[Any], list[str], list[str]]]:
        """A fresh context with ``url`` loaded in a watched page: yields the
        page, when it started, and the failed requests, requests, page errors
        and aborted media requests seen so far (lists that keep growing);
        the context is closed on the way out."""
        start = time.monotonic()
        context = self.context()
        try:
            page = context.new_page()
            failed, requests, errors, aborted = self.watch(page, start)
            page.goto(url, wait_until="load", timeout=timeout * 1000)
            yield page, start, failed, requests, errors, aborted
        finally:
            context.close()

    def load(self, url: str, screenshot: str | None, timeout: float) -> dict[str, Any]:
        with self.opened(url, timeout) as (page, _, failed, requests, errors, aborted):
            nav = page.evaluate("() => performance.getEntriesByType('navigation')[0].toJSON()")
            resources = page.evaluate(_RESOURCES_JS)
            marks = page.evaluate(_MARKS_JS)
            if screenshot:
                decoded = page.evaluate(_DECODE_JS)
                errors += [f"image {i}: {d}" for i, d in enumerate(decoded) if d != "ok"]
                page.screenshot(path=screenshot, full_page=True, animations="disabled", caret="hide")
        return {
            "load_ms": nav["loadEventEnd"],
            "dom_content_loaded_ms": nav["domContentLoadedEventEnd"],
            "document_size": nav["encodedBodySize"],
            "resources": resources,
            "failed": failed + aborted,
            "errors": errors,
            "marks": marks,
            "requests": requests,
        }

    def video(self, url: str, rate: float, play_to: float, seek_margin: float, timeout: float) -> dict[str, Any]:
        with self.opened(url, timeout) as (page, start, failed, requests, errors, aborted):
            video = page.locator("#v")
            video.evaluate("v => new Promise(ok => v.readyState >= 2 ? ok() : v.addEventListener('loadeddata', ok))")
            played = time.monotonic()
            video.evaluate(f"v => {{ v.playbackRate = {rate}; return v.play(); }}")
            page.wait_for_function(
                f"() => document.getElementById('v').currentTime >= {play_to}", timeout=timeout * 1000, polling=100
            )
            play_s = time.monotonic() - played
            before = video.evaluate(_STATE_JS)
            # Past everything buffered, so the seek needs bytes Chromium has not fetched.
            buffered_end = max([end for _, end in before["buffered"]], default=0.0)
            seek_to = min(before["duration"] - seek_margin - 2, max(buffered_end + 5, before["duration"] * 0.75))
            seek_at = time.monotonic()
            video.evaluate(f"v => {{ v.currentTime = {seek_to}; }}")
            page.wait_for_function(
                f"() => {{ const v = document.getElementById('v'); return !v.seeking && v.currentTime >= {seek_to + seek_margin}; }}",
                timeout=timeout * 1000,
                polling=100,
            )
            seek_s = time.monotonic() - seek_at
            after = video.evaluate(_STATE_JS)
        return {
            "before_seek": before,
            "after_seek": after,
            "seek_to": seek_to,
            "play_s": play_s,
            "seek_s": seek_s,
            "seek_at_s": seek_at - start,
            "requests": requests,
            "failed": failed + errors,
            "aborted": aborted,
        }

    def close(self) -> None:
        self.browser.close()
        self.playwright.stop()


def _reply(answer: dict[str, Any]) -> None:
    sys.stdout.write(RESULT + json.dumps(answer) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    options = json.loads(argv[1]) if len(argv) > 1 else {}
    try:
        driver = _Driver(options)
    except Exception as e:
        _reply({"error": f"cannot launch {CHROMIUM}: {e}"})
        return 1
    _reply({"ready": True, "version": driver.browser.version, "pid": os.getpid()})
    ops: dict[str, Callable[..., dict[str, Any]]] = {"load": driver.load, "video": driver.video}
    try:
        for line in sys.stdin:
            command = json.loads(line)
            op = command.pop("op")
            if op == "quit":
                _reply({"bye": True})
                break
            try:
                _reply(ops[op](**command))
            except Exception as e:
                _reply({"error": f"{op} {command.get('url', '')}: {type(e).__name__}: {e}"})
    finally:
        driver.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
