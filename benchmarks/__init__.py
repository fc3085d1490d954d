"""Benchmark scripts, run from the repository root (``python benchmarks/speed.py ...``); a package so that tests
can ``from benchmarks import official_approach``."""
