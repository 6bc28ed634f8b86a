"""Shared pytest setup: the fixtures tests find by name.

The helpers themselves live in :mod:`tests.support`; this file only hands
them to tests as fixtures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_twisted

from tests.support.env import Env
from tests.support.level4 import Level4
from tests.support.logs import LogCapture
from tests.support.netns import TM3Topology, Topology, build_tm3_topology, netns_unavailable_reason
from tests.support.wan import WanSpec, WanTopology, build_wan_topology


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    """Every log event while the test runs."""
    capture = LogCapture().start()
    yield capture
    capture.stop()


@pytest.fixture
def topology() -> Iterator[Topology]:
    """An empty :class:`Topology`, deleted after the test (skips if impossible)."""
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    topo = Topology()
    try:
        yield topo
    finally:
        topo.close()


@pytest.fixture
def tm3_topology(topology: Topology) -> TM3Topology:
    """client / rp / server hosts wired for transparent mode (skips if impossible)."""
    return build_tm3_topology(topology)


@pytest.fixture
def make_wan_topology(topology: Topology) -> Callable[[WanSpec], WanTopology]:
    """Builds client --WAN-- rp -- web with the given link, once per test:
    ``t = make_wan_topology(WanSpec(rtt_ms=40, loss=0.01, rate_mbit=50))``
    (skips if namespaces are impossible; fails if the delay daemon cannot run)."""

    def make(spec: WanSpec) -> WanTopology:
        return build_wan_topology(topology, spec)

    return make


@pytest.fixture
def wan_topology(make_wan_topology: Callable[[WanSpec], WanTopology]) -> WanTopology:
    """client --WAN-- rp -- web, the WAN a 40 ms round trip with no loss and no rate limit."""
    return make_wan_topology(WanSpec(rtt_ms=40))


@pytest.fixture
def make_level4(topology: Topology, tmp_path: Path) -> Callable[..., Level4]:
    """The Level 4 bed (tests/support/level4.py) over a WAN link with the
    given spec (default: 40 ms RTT, 0.5% loss, 50 Mbit/s); nothing started yet."""

    def make(spec: WanSpec | None = None) -> Level4:
        bed = Level4(topology, tmp_path, spec)
        topology.add_cleanup(bed.close)
        return bed

    return make


@pytest_twisted.async_yield_fixture
async def env() -> AsyncIterator[Env]:
    """Everything a loopback test starts, stopped and checked for leaks at
    teardown (:class:`tests.support.env.Env`)."""
    e = Env()
    yield e
    await e.close()
