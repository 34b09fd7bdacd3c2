"""Real Flower processes for tests: simulation/federation.py (bench.federation deploy too)."""

from simulation.federation import REPO, Federation, read_json, wait_for

__all__ = ["REPO", "Federation", "read_json", "wait_for"]
