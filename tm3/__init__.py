"""TM3: a transport-layer multi-pipe multiplexing proxy.

- :mod:`tm3.core`: pure, no I/O: the wire codec, reordering, connection ids,
  the connection life cycle, IPv4 addresses.
- :mod:`tm3.mux`: the Twisted glue both proxies share: pipes, a session and
  its two directions, the socket protocol, flow control.
- :mod:`tm3.rp`, :mod:`tm3.lp`: the remote and local proxy: each a role
  plugged into the session, a service and a ``twistd`` tap.
- :mod:`tm3.tools`: the experiment tools (test server, test client, demo);
  product code never imports them.
"""

__version__ = "0.1.0"
