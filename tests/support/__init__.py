"""Helpers shared by the tests and the benchmarks, each defined once.

Tests and benchmarks import them as ``tests.support.<module>`` (the editable
install puts the checkout on ``sys.path``); ``tests/conftest.py`` hands the
fixtures to tests by name.

- :mod:`~tests.support.waiting`: ``Event``, ``until``, ``steady``, ``sleep``,
  ``within``, ``with_timeout``: every wait bounded and named.
- :mod:`~tests.support.pattern`: ``Pattern``, the deterministic test bytes.
- :mod:`~tests.support.producers`: ``Pausable`` (pause/resume bookkeeping),
  ``PatternProducer`` (pattern bytes into a transport as fast as it takes them).
- :mod:`~tests.support.servers`: real Twisted TCP servers on 127.0.0.1 whose
  connections are tracked (echo, source, sink, reset, never-read, ...).
- :mod:`~tests.support.threadserver`: a blocking TCP server in a thread.
- :mod:`~tests.support.clients`: ``Client``, a socket client for our LP that
  can speak SOCKS5 first.
- :mod:`~tests.support.lpclient`: the protocol-level test LP that drives an RP
  over real pipes.
- :mod:`~tests.support.proxies`: handles on an in-process RP and LP.
- :mod:`~tests.support.env`: ``Env``, what the ``env`` fixture gives a
  loopback test: builds the proxies, clients and servers, and checks for
  leaks at teardown.
- :mod:`~tests.support.ports`: loopback ports nothing listens on.
- :mod:`~tests.support.processes`: ``twistd`` and ``curl`` children, their
  environment, their output.
- :mod:`~tests.support.netns`: throwaway network-namespace topologies.
"""
