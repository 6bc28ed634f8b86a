"""Level 4 for real: TM3 across an emulated wide-area link (40 ms RTT, 0.5%
loss, 50 Mbit/s unless a test says otherwise), nginx on three origins, the
client reaching them only through TM3 (tests/support/level4.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.level4 import Level4, wait_for

pytestmark = pytest.mark.netns


def test_curl_through_tm3_transparent_and_socks(make_level4: Callable[..., Level4], tmp_path: Path) -> None:
    bed = make_level4()
    root = tmp_path / "www"
    root.mkdir()
    blob = bytes(range(256)) * 4096 * 3  # 3 MiB
    (root / "blob.bin").write_bytes(blob)
    bed.start_nginx(root)
    bed.start_rp(4)
    bed.start_lp(4)
    digest = hashlib.sha256(blob).hexdigest()
    bed.redirect(True)
    for ip in bed.origins:
        for scheme in ("http", "https"):
            before = bed.carried(ip)
            assert bed.fetch(f"{scheme}://{ip}/blob.bin") == (digest, "")
            wait_for(lambda ip=ip, n=before + 1: bed.carried(ip) == n, "the RP's line for it")  # it crossed the pipes
    assert bed.fetch(f"https://{bed.origins[2]}/blob.bin", via="socks") == (digest, "")
    bed.settled()
