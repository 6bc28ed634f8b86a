"""Shared pytest setup: the fixtures tests find by name, and one bridge.

The helpers themselves live in :mod:`tests.support`; this file only hands
them to tests as fixtures.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_twisted

from tests import rp_harness
from tests.support.env import Env
from tests.support.netns import TM3Topology, Topology, build_tm3_topology, netns_unavailable_reason

# test_session.py still imports its harness by the bare name it had before
# tests/ became a package (both files are being rewritten elsewhere). Alias
# the module instead of putting tests/ on sys.path; drop this line once
# test_session.py imports tests.rp_harness.
sys.modules.setdefault("rp_harness", rp_harness)


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


@pytest_twisted.async_yield_fixture
async def env() -> AsyncIterator[Env]:
    """Everything a loopback test starts, stopped and checked for leaks at
    teardown (:class:`tests.support.env.Env`)."""
    e = Env()
    yield e
    await e.close()
