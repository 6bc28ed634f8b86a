"""Level 4 for real, part two: big downloads and faults across the emulated
WAN, through TM3 (tests/support/level4.py), each outcome checked, and after
each scenario no connection state left in either proxy.

The bulk tests run on a fast link (:data:`FAST`: 10 ms RTT, no loss, no rate
limit: as fast as the delay daemons and the proxies go on the machine); the
faults and the small-connection latency test on the bed's default link (40 ms
RTT, 0.5% loss, 50 Mbit/s). Figures are printed (``pytest -s`` shows them).

After every scenario :func:`check_clean` asks for more than
:meth:`Level4.settled` (open fds back to their baseline): each proxy has
logged exactly one "conn N to ... ended" line for every connection the
scenario opened, and neither namespace holds a carried socket (the RP's to
the web, the LP's from the client) in a live state.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from attrs import define
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.support.level4 import RP_PORT, SOCKS_PORT, TRANSPARENT_PORT, Level4, Proxy, wait_for
from tests.support.wan import WanSpec

pytestmark = pytest.mark.netns

MiB = 1 << 20
GiB = 1 << 30
#: The link for bulk transfers: real delay, nothing else in the way.
FAST = WanSpec(rtt_ms=10)


# -- the content -----------------------------------------------------------------------------------


def write_pattern(path: Path, size: int, seed: int) -> str:
    """``size`` bytes of an AES-CTR keystream (fast, deterministic, never
    repeating, so a misplaced message cannot go unnoticed); returns the sha256."""
    enc = Cipher(algorithms.AES(seed.to_bytes(16, "big")), modes.CTR(bytes(16))).encryptor()
    digest = hashlib.sha256()
    zeros = bytes(8 * MiB)
    with path.open("wb") as f:
        left = size
        while left:
            block = enc.update(zeros[: min(left, len(zeros))])
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


@define
class Site:
    """nginx's web root and the sha256 of every file in it."""

    root: Path
    digests: dict[str, str]

    def small_files(self) -> list[str]:
        return sorted((n for n in self.digests if n.startswith("small/")), key=lambda n: int(n[6:-4]))


#: Browser-sized objects: 32 files from 512 B to 64 KiB.
SMALL_SIZES = [512 * (1 + (i * 37) % 128) for i in range(32)]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("www")
    (root / "small").mkdir()
    digests = {
        "page.bin": write_pattern(root / "page.bin", 256 * 1024, 1),
        "mid.bin": write_pattern(root / "mid.bin", 20 * MiB, 2),
        "long.bin": write_pattern(root / "long.bin", 64 * MiB, 3),  # 10 s at 50 Mbit/s
    }
    for i, size in enumerate(SMALL_SIZES):
        digests[f"small/{i}.bin"] = write_pattern(root / f"small/{i}.bin", size, 100 + i)
    yield Site(root, digests)
    shutil.rmtree(root, ignore_errors=True)  # 1.1 GiB with gib.bin: not worth keeping among pytest's last runs


@pytest.fixture(scope="module")
def gib(site: Site) -> str:
    """``gib.bin`` (1 GiB) in the site; its sha256. Made once per module (about 3 s)."""
    if "gib.bin" not in site.digests:
        site.digests["gib.bin"] = write_pattern(site.root / "gib.bin", GiB, 4)
    return site.digests["gib.bin"]


# -- downloads on the client -----------------------------------------------------------------------


def fetch_argv(bed: Level4, url: str, via: str = "transparent", timeout: float = 120, out: str = "") -> list[str]:
    """curl on the client piped to ``openssl dgst`` (about 6 times faster than
    sha256sum here, which matters at 1 GiB); ``out``: also keep the body there."""
    socks = f"--socks5 127.0.0.1:{SOCKS_PORT}" if via == "socks" else ""
    tee = f"| tee {out} " if out else ""
    return [
        "bash",
        "-c",
        f"set -o pipefail; curl -sS --fail --cacert {bed.ca} --max-time {timeout:g} {socks} '{url}' {tee}"
        "| openssl dgst -sha256 -r",
    ]


def fetch_result(proc: subprocess.Popen[str], timeout: float = 150) -> tuple[str, str]:
    """A :func:`fetch_argv` process's (sha256, curl's error text or "")."""
    out, err = proc.communicate(timeout=timeout)
    return (out.split()[0] if proc.returncode == 0 else ""), err.strip()


def fetch(bed: Level4, url: str, via: str = "transparent", timeout: float = 120) -> tuple[str, str, float]:
    """(sha256, error, seconds) of one download on the client."""
    started = time.monotonic()
    proc = bed.client.popen(fetch_argv(bed, url, via, timeout))
    digest, err = fetch_result(proc, timeout + 30)
    return digest, err, time.monotonic() - started


# -- what is left behind ---------------------------------------------------------------------------


def sockets(bed: Level4, host: str) -> list[list[str]]:
    """``ss -tanp`` in a host of the bed: [state, recv-q, send-q, local, peer,
    and the owning processes if a process still holds the socket] rows."""
    h = {"client": bed.client, "rp": bed.rp_host, "web": bed.web}[host]
    return [line.split() for line in h.run(["ss", "-Htanp"]).stdout.splitlines() if line.strip()]


def carried_sockets(bed: Level4) -> list[str]:
    """Sockets of carried connections that a proxy still holds, in any state:
    the RP's towards the web (all but its pipes and listener) and the LP's
    accepted ones (SOCKS and transparent)."""
    rp = [r for r in sockets(bed, "rp") if len(r) > 5 and r[0] != "LISTEN" and not r[3].endswith(f":{RP_PORT}")]
    lp_ports = (f":{SOCKS_PORT}", f":{TRANSPARENT_PORT}")
    lp = [r for r in sockets(bed, "client") if len(r) > 5 and r[0] != "LISTEN" and r[3].endswith(lp_ports)]
    return [" ".join(r) for r in rp + lp]


class Ledger:
    """The proxies' "ended" lines, counted from now (their logs restart with them)."""

    def __init__(self, bed: Level4) -> None:
        assert bed.rp is not None and bed.lp is not None
        self.bed = bed
        self.rp: Proxy = bed.rp
        self.lp: Proxy = bed.lp
        self.rp_from = self.rp.ended()
        self.lp_from = self.lp.ended()

    def ended(self) -> tuple[int, int]:
        return self.rp.ended() - self.rp_from, self.lp.ended() - self.lp_from


def check_clean(bed: Level4, ledger: Ledger, opened: int, timeout: float = 10) -> None:
    """Nothing of the scenario's ``opened`` connections is left: each proxy
    logged one "ended" line for each, neither holds a socket of one, and
    their fds are back to the baseline."""
    want = (opened, opened)
    wait_for(lambda: ledger.ended() == want, f"(RP, LP) ended lines {want}", timeout)
    wait_for(lambda: not carried_sockets(bed), "no carried socket left", timeout)
    bed.settled(timeout)
    time.sleep(0.2)  # nothing more trickles in
    assert ledger.ended() == want, f"(RP, LP) ended lines {ledger.ended()}, want {want}"
    assert carried_sockets(bed) == []


def up(make_level4: Callable[..., Level4], site: Site, spec: WanSpec | None = None, *rp_args: str) -> Level4:
    """A bed with nginx serving ``site``, the RP (with ``rp_args``) and the LP up."""
    bed = make_level4(spec)
    bed.start_nginx(site.root)
    bed.start_rp(4, *rp_args)
    bed.start_lp(4)
    return bed


def mb_per_s(size: int, seconds: float) -> float:
    return size / seconds / 1e6


# -- bulk ------------------------------------------------------------------------------------------


def test_one_gib_over_http_and_https(make_level4: Callable[..., Level4], site: Site, gib: str) -> None:
    """1 GiB through TM3 in transparent mode, over HTTP and over HTTPS, with
    the right sha256; each well inside CI's patience."""
    bed = up(make_level4, site, FAST)
    bed.redirect(True)
    ledger = Ledger(bed)
    for scheme, origin in (("http", bed.origins[0]), ("https", bed.origins[1])):
        digest, err, seconds = fetch(bed, f"{scheme}://{origin}/gib.bin")
        assert (digest, err) == (gib, "")
        print(f"\n1 GiB over {scheme} through TM3 ({FAST}): {seconds:.1f} s, {mb_per_s(GiB, seconds):.0f} MB/s")
        assert seconds < 90
    check_clean(bed, ledger, 2)
    assert bed.carried(bed.origins[0]) == bed.carried(bed.origins[1]) == 1


def test_fifty_parallel_downloads(make_level4: Callable[..., Level4], site: Site) -> None:
    """50 downloads of 20 MiB at once, half transparent and half SOCKS, HTTP
    and HTTPS, over the three origins: all complete, all right."""
    bed = up(make_level4, site, FAST)
    bed.redirect(True)
    ledger = Ledger(bed)
    started = time.monotonic()
    procs = []
    for i in range(50):
        scheme = ("http", "https")[(i // 2) % 2]
        url = f"{scheme}://{bed.origins[i % 3]}/mid.bin"
        procs.append(bed.client.popen(fetch_argv(bed, url, via=("transparent", "socks")[i % 2])))
    results = [fetch_result(p) for p in procs]
    seconds = time.monotonic() - started
    assert results == [(site.digests["mid.bin"], "")] * 50
    print(f"\n50 x 20 MiB in parallel through TM3: {seconds:.1f} s, {mb_per_s(50 * 20 * MiB, seconds):.0f} MB/s in all")
    check_clean(bed, ledger, 50)
