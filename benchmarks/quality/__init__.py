"""The quality benchmark's scripts (a package so that tests can import ``benchmarks.quality.record_slices``)."""
