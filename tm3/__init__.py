"""TM3: a transport-layer multi-pipe multiplexing proxy.

The wire codec (:mod:`tm3.core.wire`) and the reorder buffer (:mod:`tm3.core.reorder`)
are pure; the Twisted glue lives in :mod:`tm3.mux.pipes`, :mod:`tm3.mux.session`,
:mod:`tm3.rp.service` (the remote proxy) and :mod:`tm3.lp.service` (the local proxy).
"""

__version__ = "0.1.0"
