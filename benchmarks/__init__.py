"""Benchmark scripts; results (JSON + markdown) go under benchmarks/results/."""
