"""Benchmark scripts: each writes JSON under benchmarks/results and a table under docs/results."""
