"""Tools for developing and showing the project: child servers, the demo, sample material, benchmarks."""
