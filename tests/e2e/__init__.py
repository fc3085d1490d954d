"""End to end: the command line, eval, the demo, safety, the float64 references, the benchmark's baseline and the
shipped adapters."""
