"""GPU correctness (``-m gpu``): skipped where no CUDA GPU is visible; multi-GPU tests need two or more."""
