"""A generated web site for the Level 4 bed (tests/support/level4.py): what a
browser loads through TM3, known object by object.

:func:`generate` writes into a directory (nothing is cached anywhere else):

* ``index.html``, a page of 120 objects spread over the three origins
  (``http://10.77.2.2/``, ``.3`` and ``.4``): 6 stylesheets, 9 scripts (sync
  in the head, ``defer`` and ``async``), 96 PNG images and 8 JPEG images. The
  PNGs are written here with :mod:`zlib` (palette images of tinted noise, so
  their size is what their pixel count says); the JPEGs come from one
  ``ffmpeg`` run over its ``testsrc2`` pattern. Image sizes run from 1 KiB to
  2 MiB, most of them small, as on real pages::

      42 images   1-10 KiB     36 images  10-60 KiB     14 images  60-250 KiB
       3 images 300-800 KiB     1 image    2 MiB         8 JPEGs    4-70 KiB

  About 7.5 MB in all. ``index-https.html`` is the same page with every URL
  on the HTTPS origins. Every element has a fixed size and every script
  writes a fixed text into a box of its own, so the rendered page does not
  depend on the order in which objects arrive: screenshots of two loads
  compare pixel for pixel.
* ``video.html`` (and ``video-https.html``): a ``<video>`` of
  ``media/testsrc2.mp4``, 90 s of ffmpeg's ``testsrc2`` at 640x360, 25 fps,
  H.264 (Debian's chromium plays it; x264's ultrafast preset makes it
  Constrained Baseline) at a near-lossless quantizer, about 4.5 Mbit/s and
  50 MB, with ``+faststart`` (the index first). Chromium fetches it with
  range requests, as fast as the link allows: over the bed's 50 Mbit/s it
  has about 45 s of it when 12 s have played at 4x speed, so a seek to the
  last quarter needs a new range request, while 4x playback (18 Mbit/s)
  still keeps up. Optional: ``generate(root, video=False)`` skips it (it is
  the slow part: about 3 s of encoding).

The result, :class:`Site`, lists every object (path, origin, size, kind) so a
test can check that each one arrived, and :func:`parse_access_log` reads the
bed's nginx access log back into records to check them against.

Deterministic: the same call writes the same bytes (the noise comes from
seeded generators; ffmpeg runs with ``-bitexact``, and x264 with a fixed
thread count). It takes about a second without the video, four with it.
"""

from __future__ import annotations

import random
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from attrs import frozen

__all__ = [
    "ORIGINS",
    "AccessRecord",
    "Site",
    "WebObject",
    "generate",
    "parse_access_log",
]

ORIGINS = ("10.77.2.2", "10.77.2.3", "10.77.2.4")
FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"

#: (count, smallest, largest) bytes of the PNG images, log-spaced within each band.
PNG_BANDS = (
    (42, 1024, 10 * 1024),
    (36, 10 * 1024, 60 * 1024),
    (14, 60 * 1024, 250 * 1024),
    (3, 300 * 1024, 800 * 1024),
    (1, 2 * 1024 * 1024, 2 * 1024 * 1024),
)
#: JPEG sizes as ffmpeg scale (width, height) and quality (-q:v, 2 best .. 31 worst).
JPEGS = (
    (160, 90, 8),
    (240, 135, 6),
    (320, 180, 5),
    (480, 270, 4),
    (640, 360, 4),
    (800, 450, 3),
    (960, 540, 3),
    (1280, 720, 2),
)
#: (kind, count per origin, smallest, largest) bytes for stylesheets and scripts.
CSS_FILES = 2
JS_FILES = 3
VIDEO_SECONDS = 90
VIDEO_PATH = "/media/testsrc2.mp4"
TILE_W, TILE_H = 112, 84
#: Bits of noise per pixel in the PNGs: what deflate cannot squeeze out.
NOISE_BITS = 6
#: What such a PNG takes a pixel (measured: deflate's blocks and the row filter
#: bytes on top of the noise), and its fixed bytes (signature, chunks, palette).
PNG_BYTES_PER_PIXEL = 0.7585
PNG_OVERHEAD = 260


@frozen
class WebObject:
    """One file of the site, as a page refers to it."""

    #: URL path, e.g. ``/img/p017.png``.
    path: str
    #: The origin's address the page loads it from.
    origin: str
    #: Bytes on disk (what nginx sends for a 200).
    size: int
    #: ``html``, ``css``, ``js``, ``png``, ``jpeg`` or ``mp4``.
    kind: str

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://{self.origin}{self.path}"


@frozen
class Site:
    """What :func:`generate` wrote."""

    root: Path
    #: The page's subresources (the same files for the HTTP and HTTPS page).
    resources: tuple[WebObject, ...]
    #: ``index.html`` and ``index-https.html``.
    pages: dict[str, WebObject]
    #: The MP4 and its two pages, or None if generated without video.
    video: WebObject | None
    video_pages: dict[str, WebObject]

    def page(self, scheme: str = "http") -> WebObject:
        return self.pages[scheme]

    def page_url(self, scheme: str = "http") -> str:
        return self.pages[scheme].url(scheme)

    def page_objects(self, scheme: str = "http") -> list[WebObject]:
        """The page and everything it loads, for ``scheme``."""
        return [self.pages[scheme], *self.resources]

    def video_page_url(self, scheme: str = "http") -> str:
        return self.video_pages[scheme].url(scheme)

    @property
    def total_bytes(self) -> int:
        return self.pages["http"].size + sum(o.size for o in self.resources)


@frozen
class AccessRecord:
    """One line of the bed's nginx access log (its ``tm3`` log format)."""

    remote: str
    server: str  # address:port
    method: str
    path: str
    status: int
    bytes_sent: int
    range: str  # the request's Range header, "" without one
    connection: int  # nginx's connection serial number (-1 if the line has none)

    @property
    def server_ip(self) -> str:
        return self.server.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.server.rsplit(":", 1)[1])


_LOG_LINE = re.compile(
    r'^(?P<remote>\S+) (?P<server>\S+) "(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d+) (?P<bytes>\d+) '
    r'"(?P<range>[^"]*)" \S+(?: (?P<conn>\d+))?'
)


def parse_access_log(lines: list[str]) -> list[AccessRecord]:
    """The requests in ``lines`` (from ``Level4.access_log()``); lines of any
    other shape are skipped."""
    records = []
    for line in lines:
        m = _LOG_LINE.match(line)
        if m is None:
            continue
        records.append(
            AccessRecord(
                remote=m["remote"],
                server=m["server"],
                method=m["method"],
                path=m["path"],
                status=int(m["status"]),
                bytes_sent=int(m["bytes"]),
                range="" if m["range"] == "-" else m["range"],
                connection=int(m["conn"]) if m["conn"] else -1,
            )
        )
    return records


# -- images ------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_noise(width: int, height: int, seed: int) -> bytes:
    """A palette PNG of ``width`` x ``height`` pixels: noise in
    2**NOISE_BITS shades of one hue (from ``seed``), so deflate leaves about
    NOISE_BITS/8 bytes a pixel."""
    rng = random.Random(seed)
    hue = [rng.randrange(256) for _ in range(3)]
    shades = 1 << NOISE_BITS
    palette = bytearray()
    for i in range(shades):
        for c in hue:
            palette.append((c * 3 // 4 + i * 64 // shades) & 0xFF)
    mask = bytes(b & (shades - 1) for b in range(256))
    noise = rng.randbytes(width * height).translate(mask)
    raw = b"".join(b"\x00" + noise[y * width : (y + 1) * width] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"PLTE", bytes(palette))
        + _chunk(b"IDAT", zlib.compress(raw, 6))
        + _chunk(b"IEND", b"")
    )


def _png_for_size(target: int, seed: int) -> bytes:
    """A PNG of about ``target`` bytes, 4:3 (or square below 64 pixels)."""
    pixels = max(64, int((target - PNG_OVERHEAD) / PNG_BYTES_PER_PIXEL))
    width = max(8, int((pixels * 4 / 3) ** 0.5))
    height = max(8, pixels // width)
    return png_noise(width, height, seed)


def _png_sizes() -> list[int]:
    sizes = []
    for count, low, high in PNG_BANDS:
        for i in range(count):
            sizes.append(int(low * (high / low) ** (i / max(1, count - 1))) if count > 1 else high)
    return sizes


def _run_ffmpeg(args: list[str], timeout: float) -> None:
    argv = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed (exit {done.returncode}): {done.stderr.strip()}")


def _jpegs(directory: Path) -> list[Path]:
    """The JPEGs, from one ffmpeg run: one frame of testsrc2 scaled per size."""
    n = len(JPEGS)
    split = f"[0:v]split={n}" + "".join(f"[s{i}]" for i in range(n))
    scales = ";".join(f"[s{i}]scale={w}:{h}[o{i}]" for i, (w, h, _) in enumerate(JPEGS))
    args = ["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=1:duration=1", "-filter_complex", f"{split};{scales}"]
    paths = []
    for i, (w, h, q) in enumerate(JPEGS):
        path = directory / f"j{i:02d}-{w}x{h}.jpg"
        args += ["-map", f"[o{i}]", "-frames:v", "1", "-q:v", str(q), "-threads", "1"]
        args += ["-fflags", "+bitexact", "-flags:v", "+bitexact", str(path)]
        paths.append(path)
    _run_ffmpeg(args, timeout=60)
    return paths


def _video(path: Path) -> None:
    _run_ffmpeg(
        [
            "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=25:duration={VIDEO_SECONDS},format=yuv420p",
            "-c:v", "libx264", "-preset", "ultrafast", "-qp", "1", "-g", "50", "-threads", "2",
            "-movflags", "+faststart", "-fflags", "+bitexact", "-flags:v", "+bitexact", str(path),
        ],
        timeout=120,
    )  # fmt: skip


# -- stylesheets and scripts --------------------------------------------------------------


def _css(index: int, size: int) -> str:
    """A stylesheet: rules the page uses (its own part of the layout), then
    rules for classes nothing has, up to about ``size`` bytes."""
    rng = random.Random(1000 + index)
    used = [
        f".css-mark-{index} {{ background: #{(0x204060 + index * 0x141414) & 0xFFFFFF:06x}; color: #fff; }}",
    ]
    if index == 0:
        used.append(
            "body { margin: 0; font: 13px/16px 'DejaVu Sans', sans-serif; background: #f4f1ea; color: #222; }\n"
            "header { height: 56px; padding: 8px 16px; background: #283845; color: #fff; }\n"
            "header h1 { margin: 0; font-size: 22px; line-height: 32px; }\n"
            ".marks { display: flex; flex-wrap: wrap; gap: 4px; padding: 8px 16px; height: 48px; }\n"
            ".marks div { width: 140px; height: 20px; line-height: 20px; padding: 0 4px; overflow: hidden; white-space: nowrap; }\n"
        )
    if index == 1:
        used.append(
            f".grid {{ display: grid; grid-template-columns: repeat(10, {TILE_W + 12}px); gap: 6px; padding: 8px 16px; }}\n"
            f".tile {{ width: {TILE_W + 12}px; height: {TILE_H + 26}px; background: #fff; box-sizing: border-box; padding: 6px; }}\n"
            f".tile img {{ display: block; width: {TILE_W}px; height: {TILE_H}px; }}\n"
            ".tile span { display: block; font-size: 10px; line-height: 14px; height: 14px; overflow: hidden; }\n"
        )
    lines = "\n".join(used) + "\n"
    n = 0
    while len(lines) < size:
        lines += (
            f".unused-{index}-{n} {{ margin: {rng.randrange(40)}px {rng.randrange(40)}px; "
            f"color: #{rng.randrange(1 << 24):06x}; border: {rng.randrange(5)}px solid #{rng.randrange(1 << 24):06x}; }}\n"
        )
        n += 1
    return lines


def _js(index: int, size: int) -> str:
    """A script: a table of numbers (parsed and summed, so the size is real
    work), then one fixed line of text into the page's box for it."""
    rng = random.Random(2000 + index)
    values: list[str] = []
    length = 120
    while length < size:
        v = str(rng.randrange(1_000_000))
        values.append(v)
        length += len(v) + 1
    total = sum(int(v) for v in values)
    return (
        f"var tm3Table{index} = [{','.join(values)}];\n"
        f"(function () {{\n"
        f"  var s = 0; for (var i = 0; i < tm3Table{index}.length; i++) s += tm3Table{index}[i];\n"
        f"  function mark() {{ document.getElementById('js-{index}').textContent = 'js {index}: ' + "
        f"(s === {total} ? 'ok' : 'BAD') + ' ' + tm3Table{index}.length; }}\n"
        f"  if (document.getElementById('js-{index}')) mark(); else document.addEventListener('DOMContentLoaded', mark);\n"
        f"}})();\n"
    )


# -- the site ----------------------------------------------------------------------------------


def generate(root: Path, *, video: bool = True, origins: tuple[str, ...] = ORIGINS) -> Site:
    """Write the site into ``root`` (created if missing) and describe it."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("css", "js", "img", "media"):
        (root / sub).mkdir(exist_ok=True)

    def origin(i: int) -> str:
        return origins[i % len(origins)]

    resources: list[WebObject] = []
    css: list[WebObject] = []
    for i in range(CSS_FILES * len(origins)):
        path = f"/css/s{i}.css"
        (root / path[1:]).write_text(_css(i, 2048 * 3**i if i < 4 else 24 * 1024))
        css.append(WebObject(path, origin(i), (root / path[1:]).stat().st_size, "css"))
    js: list[WebObject] = []
    js_sizes = (1500, 4 * 1024, 12 * 1024, 30 * 1024, 60 * 1024, 100 * 1024, 160 * 1024, 220 * 1024, 300 * 1024)
    for i in range(JS_FILES * len(origins)):
        path = f"/js/a{i}.js"
        (root / path[1:]).write_text(_js(i, js_sizes[i % len(js_sizes)]))
        js.append(WebObject(path, origin(i + 1), (root / path[1:]).stat().st_size, "js"))
    images: list[WebObject] = []
    # Sizes interleaved (largest, smallest, ...) so big and small mix on every origin and row.
    sizes = _png_sizes()
    order = [sizes[(len(sizes) - 1 - i // 2) if i % 2 == 0 else i // 2] for i in range(len(sizes))]
    for i, target in enumerate(order):
        path = f"/img/p{i:03d}.png"
        data = _png_for_size(target, seed=i)
        (root / path[1:]).write_bytes(data)
        images.append(WebObject(path, origin(i), len(data), "png"))
    for i, jpeg in enumerate(_jpegs(root / "img")):
        path = f"/img/{jpeg.name}"
        images.insert(i * 12 + 5, WebObject(path, origin(i + 2), jpeg.stat().st_size, "jpeg"))
    resources = [*css, *js, *images]

    pages = {}
    for scheme, name in (("http", "index.html"), ("https", "index-https.html")):
        (root / name).write_text(_page_html(scheme, css, js, images))
        pages[scheme] = WebObject(f"/{name}", origins[0], (root / name).stat().st_size, "html")

    video_obj = None
    video_pages = {}
    if video:
        _video(root / VIDEO_PATH[1:])
        video_obj = WebObject(VIDEO_PATH, origins[1], (root / VIDEO_PATH[1:]).stat().st_size, "mp4")
        for scheme, name in (("http", "video.html"), ("https", "video-https.html")):
            (root / name).write_text(_video_html(video_obj.url(scheme)))
            video_pages[scheme] = WebObject(f"/{name}", origins[0], (root / name).stat().st_size, "html")
    return Site(root, tuple(resources), pages, video_obj, video_pages)


def _page_html(scheme: str, css: list[WebObject], js: list[WebObject], images: list[WebObject]) -> str:
    head_js = [o for i, o in enumerate(js) if i % 3 == 0]
    defer_js = [o for i, o in enumerate(js) if i % 3 == 1]
    async_js = [o for i, o in enumerate(js) if i % 3 == 2]
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>TM3 Level 4 page</title>",
        '<link rel="icon" href="data:,">',
        "<script>performance.setResourceTimingBufferSize(1000);</script>",
    ]
    out += [f'<link rel="stylesheet" href="{o.url(scheme)}">' for o in css]
    out += [f'<script src="{o.url(scheme)}"></script>' for o in head_js]
    out += [f'<script defer src="{o.url(scheme)}"></script>' for o in defer_js]
    out += [f'<script async src="{o.url(scheme)}"></script>' for o in async_js]
    out += [
        "</head><body>",
        f"<header><h1>TM3 Level 4: {len(css) + len(js) + len(images) + 1} objects on three origins</h1></header>",
        '<div class="marks">',
    ]
    out += [f'<div class="css-mark-{i}">css {i}</div>' for i in range(len(css))]
    out += [f'<div class="css-mark-{i % len(css)}" id="js-{i}">js {i}: waiting</div>' for i in range(len(js))]
    out += ["</div>", '<div class="grid">']
    for o in images:
        name = o.path.rsplit("/", 1)[1]
        out.append(
            f'<div class="tile"><img src="{o.url(scheme)}" width="{TILE_W}" height="{TILE_H}" alt="{name}">'
            f"<span>{name} {o.size // 1024} KiB .{o.origin.rsplit('.', 1)[1]}</span></div>"
        )
    out += ["</div>", "</body></html>", ""]
    return "\n".join(out)


def _video_html(src: str) -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8"><title>TM3 Level 4 video</title>'
        '<link rel="icon" href="data:,"></head>\n'
        '<body style="margin:0;background:#111">\n'
        f'<video id="v" src="{src}" width="640" height="360" muted playsinline preload="auto"></video>\n'
        "</body></html>\n"
    )
