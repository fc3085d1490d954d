"""Several processes, one merge (gloo on the CPU)."""
