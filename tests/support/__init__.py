"""Helpers shared by the tests and the benchmarks, each defined once.

- :mod:`tests.support.servers`: real Twisted TCP servers on 127.0.0.1 whose
  connections are tracked (echo, source, sink, reset, never-read, ...).
- :mod:`tests.support.lpclient`: the protocol-level test LP that drives an RP
  over real pipes.
- :mod:`tests.support.netns`: throwaway network-namespace topologies.
"""
