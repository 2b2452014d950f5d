"""Benchmarks printed as side-by-side tables (`soppu-hub bench`)."""
