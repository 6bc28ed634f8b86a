"""TM3: a transport-layer multi-pipe multiplexing proxy.

The wire codec (:mod:`tm3.wire`) and the reorder buffer (:mod:`tm3.reorder`)
are pure; the Twisted glue lives in :mod:`tm3.pipes`, :mod:`tm3.multiplexer`,
:mod:`tm3.server` (the remote proxy) and :mod:`tm3.local` (the local proxy).
"""

__version__ = "0.1.0"
