"""Benchmarks: each script writes JSON (and a plot) to bench/results/ and prints ratios."""
