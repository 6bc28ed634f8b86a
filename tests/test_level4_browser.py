"""Level 4 with a real browser: Debian's Chromium, driven by Playwright inside
the client's namespace (tests/support/browser.py), loads a generated site of
120 objects on three origins (tests/support/website.py) and plays a video,
across the emulated WAN (40 ms RTT, 0.5% loss, 50 Mbit/s) and through TM3
(4 pipes, v2), in transparent mode and through the LP's SOCKS5.

Screenshots go to ``<tmp_path>/screenshots/`` (pytest's per-test directory,
e.g. ``/tmp/pytest-of-root/pytest-N/test_page_loads_through_tm3_tr0/screenshots``):
``direct-http.png`` and ``direct-https.png`` (without TM3, the reference),
``<mode>-http.png`` and ``<mode>-https.png`` (through TM3). The browser's
profile and its driver's log (``driver.log``) are in ``<tmp_path>/browser-*``,
nginx's access log in ``<tmp_path>/nginx/``, the proxies' logs in
``<tmp_path>/rp.log`` and ``lp.log``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.browser import Browser, PageLoad, screenshot_difference
from tests.support.level4 import SOCKS_PORT, Level4, wait_for
from tests.support.website import AccessRecord, Site, generate, parse_access_log

pytestmark = pytest.mark.netns

SCHEMES = ("http", "https")
PORTS = {"http": 80, "https": 443}
#: Pixels that may differ between a load through TM3 and one without it: one
#: in ten thousand (the loads have so far rendered identically, pixel for pixel).
PIXEL_TOLERANCE = 1e-4


def _bed(make_level4: Callable[..., Level4], tmp_path: Path, video: bool) -> tuple[Level4, Site]:
    site = generate(tmp_path / "www", video=video)
    bed = make_level4()
    bed.start_nginx(site.root)
    bed.start_rp(4)
    bed.start_lp(4)
    return bed, site


def _rp_address(bed: Level4) -> str:
    """Where the RP's connections to the web host come from (10.77.2.1)."""
    return bed.t.tm3.rp_server_side_ip


def _new_records(bed: Level4, since: int) -> list[AccessRecord]:
    return parse_access_log(bed.access_log()[since:])


def _carried_by_origin(bed: Level4, site: Site) -> dict[str, int]:
    return {ip: bed.carried(ip) for ip in {o.origin for o in site.page_objects()}}


def _check_complete(site: Site, scheme: str, load: PageLoad, records: list[AccessRecord], remote: str) -> None:
    """Every object of the page arrived whole, from the right origin, and
    nginx served every one of them to ``remote`` (the client itself without
    TM3, the RP with it) and to no one else."""
    expected = {o.url(scheme): o for o in site.resources}
    names = load.resource_names()
    assert not expected.keys() - names, f"objects without a resource timing entry: {sorted(expected.keys() - names)}"
    assert not names - expected.keys(), (
        f"resource timing entries for unknown objects: {sorted(names - expected.keys())}"
    )
    wrong_size = [
        (r.name, r.encoded_size, expected[r.name].size)
        for r in load.resources
        if r.encoded_size != expected[r.name].size
    ]
    assert not wrong_size, f"bodies of the wrong size (name, got, expected): {wrong_size}"
    cached = [r.name for r in load.resources if r.transfer_size <= r.encoded_size]
    assert not cached, f"objects that did not come over the network: {cached}"
    assert load.document_size == site.page(scheme).size
    assert load.failed == (), f"failed requests: {load.failed}"
    assert load.errors == (), f"errors in the page: {load.errors}"
    assert load.marks and all(re.fullmatch(r"js \d+: ok \d+", m) for m in load.marks), load.marks
    assert 0 < load.load_ms

    assert {r.remote for r in records} == {remote}, (
        f"requests from {sorted({r.remote for r in records})}, not only {remote}"
    )
    served = {(r.server_ip, r.port, r.path) for r in records if r.status == 200 and r.method == "GET"}
    unserved = [o.url(scheme) for o in site.page_objects(scheme) if (o.origin, PORTS[scheme], o.path) not in served]
    assert not unserved, f"objects nginx did not serve with 200: {unserved}"
    sizes = {(r.server_ip, r.path): r.bytes_sent for r in records}
    short = [o.url(scheme) for o in site.page_objects(scheme) if sizes[(o.origin, o.path)] != o.size]
    assert not short, f"objects nginx did not send whole: {short}"


def _check_carried(bed: Level4, before: dict[str, int], records: list[AccessRecord]) -> None:
    """The RP logged, per origin, at least as many carried connections as
    nginx saw connections from it (Chromium may open one it never uses)."""
    connections: dict[str, set[int]] = {}
    for r in records:
        connections.setdefault(r.server_ip, set()).add(r.connection)
    assert set(connections) == set(before), f"connections to {sorted(connections)}, not to every origin"
    for ip, conns in connections.items():
        want = before[ip] + len(conns)
        wait_for(
            lambda ip=ip, want=want: bed.carried(ip) >= want,  # type: ignore[misc]
            f"the RP's lines for {len(conns)} connections to {ip}",
        )


def _check_screenshot(shot: Path, reference: Path) -> None:
    differ, total = screenshot_difference(shot, reference)
    assert differ <= total * PIXEL_TOLERANCE, f"{shot} differs from {reference} in {differ} of {total} pixels"


@pytest.mark.parametrize("mode", ["transparent", "socks"])
def test_page_loads_through_tm3(make_level4: Callable[..., Level4], tmp_path: Path, mode: str) -> None:
    """The page loads completely through TM3 (transparent: the redirect rules
    on, no proxy setting; socks: Chromium's SOCKS5 proxy, the rules off so a
    request that went around the LP would reach nginx from the client's
    address), over HTTP and HTTPS: every object has a resource timing entry
    with its full size, no request failed, every script ran, nginx served
    every object with 200 to the RP only, the RP logged the connections, the
    screenshot matches the one taken without TM3 (``<tmp_path>/screenshots/``,
    see the module docstring), and the proxies settle after each load."""
    bed, site = _bed(make_level4, tmp_path, video=False)
    shots = tmp_path / "screenshots"
    shots.mkdir()

    with Browser(bed.client, tmp_path / "browser-direct", trust=bed.web_cert.cert) as browser:
        for scheme in SCHEMES:
            since, carried = len(bed.access_log()), bed.carried()
            load = browser.load(site.page_url(scheme), shots / f"direct-{scheme}.png")
            print(f"direct {scheme}: load event at {load.load_ms:.0f} ms")
            _check_complete(site, scheme, load, _new_records(bed, since), bed.t.client_ip)
            assert bed.carried() == carried  # the reference did not go through TM3
    _check_screenshot(shots / "direct-https.png", shots / "direct-http.png")  # the two pages render alike

    if mode == "transparent":
        bed.redirect(True)
    socks = f"127.0.0.1:{SOCKS_PORT}" if mode == "socks" else None
    with Browser(bed.client, tmp_path / f"browser-{mode}", socks=socks, trust=bed.web_cert.cert) as browser:
        for scheme in SCHEMES:
            since, by_origin = len(bed.access_log()), _carried_by_origin(bed, site)
            shot = shots / f"{mode}-{scheme}.png"
            load = browser.load(site.page_url(scheme), shot)
            print(f"{mode} {scheme}: load event at {load.load_ms:.0f} ms")
            records = _new_records(bed, since)
            _check_complete(site, scheme, load, records, _rp_address(bed))
            _check_carried(bed, by_origin, records)
            _check_screenshot(shot, shots / f"direct-{scheme}.png")
            bed.settled()


def test_video_plays_and_seeks_through_tm3(make_level4: Callable[..., Level4], tmp_path: Path) -> None:
    """A 90 s H.264 video over HTTPS, transparent mode: Chromium plays it at
    4x until currentTime passes 12 s, then seeks past everything it has
    buffered, which takes a new range request (seen by Playwright and in
    nginx's log as a 206 for a Range starting past 0, from the RP), and plays
    on 3 s of media after the seek point; no media error at any time; the
    RP carried the video's connections and the proxies settle."""
    bed, site = _bed(make_level4, tmp_path, video=True)
    assert site.video is not None
    bed.redirect(True)
    since, carried = len(bed.access_log()), _carried_by_origin(bed, site)
    with Browser(bed.client, tmp_path / "browser-video", trust=bed.web_cert.cert) as browser:
        run = browser.video(site.video_page_url("https"), rate=4, play_to=12, seek_margin=3)

    before, after = run.before_seek, run.after_seek
    print(
        f"video: currentTime {before['currentTime']:.1f} s after {run.play_s:.1f} s at 4x, buffered {before['buffered']};"
        f" seek to {run.seek_to:.1f} s, at {after['currentTime']:.1f} s {run.seek_s:.1f} s later; media requests"
        f" {[r.range for r in run.requests if r.resource_type == 'media']}, aborted {list(run.aborted)}"
    )
    assert before["error"] is None and after["error"] is None, (before["error"], after["error"])
    assert before["currentTime"] >= 12 and not before["paused"]  # played >= 10 s of media
    buffered_end = max(end for _, end in before["buffered"])
    assert run.seek_to > buffered_end, f"the seek target {run.seek_to} s was already buffered (to {buffered_end} s)"
    assert after["currentTime"] >= run.seek_to + 3 and not after["paused"] and not after["ended"]
    assert run.failed == (), run.failed

    first = run.media_requests(after_seek=False)
    seek = run.media_requests(after_seek=True)
    assert first and first[0].range == "bytes=0-", first
    assert seek and all(re.fullmatch(r"bytes=[1-9]\d*-\d*", r.range) for r in seek), seek
    # Chromium may cancel the stream it was reading (a reset through TM3); only that one.
    assert set(run.aborted) <= {f"{r.url} {r.range}" for r in first}, run.aborted

    path = site.video.path

    def video_records() -> list[AccessRecord]:
        return [r for r in _new_records(bed, since) if r.path == path]

    # nginx logs a request when it ends; the first may end only when Chromium closes its connection.
    wait_for(lambda: len(video_records()) >= 1 + len(seek), "nginx's lines for every range request")
    records = video_records()
    assert all(r.status == 206 and r.remote == _rp_address(bed) for r in records), records
    assert {r.range for r in records} >= {"bytes=0-", *(r.range for r in seek)}, records
    _check_carried(bed, {site.video.origin: carried[site.video.origin]}, records)
    bed.settled()
