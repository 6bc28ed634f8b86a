"""Shared pytest setup: the network-namespace fixtures (see tests/netns.py)."""

from netns import tm3_topology, topology  # noqa: F401  (pytest fixtures, found by name)
