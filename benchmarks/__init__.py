"""gforward's benchmarks: `throughput.py` (the driver the README runs), `soak.py`, and their parts.

A package so that the benchmarks' processes (`python -m benchmarks.guest`, ...) and the
tests can import the one load generator, `benchmarks.loadgen`.
"""
