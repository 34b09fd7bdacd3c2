"""Tiny models, probes and faulty clients for tests and benchmarks (never imported by
production code: tests/test_import_graph.py)."""
