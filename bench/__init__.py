"""Benchmarks behind `make bench`: serving against a hand-written baseline, training throughput."""
