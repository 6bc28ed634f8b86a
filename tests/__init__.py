"""TM3's tests. A package, so that the helpers in :mod:`tests.support` import
by one name from test modules and benchmarks alike (the editable install puts
the checkout on ``sys.path``)."""
