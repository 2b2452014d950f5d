"""Benchmarks printed as side-by-side tables (`python -m lab bench`)."""
