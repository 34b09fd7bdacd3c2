"""The adapter core stays usable without Flower."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # fresh interpreters (a cold torch import each)


def test_core_imports_no_flower():
    code = (
        "import sys, seedlora, seedlora.export;"
        "bad = sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_works_with_flower_blocked():
    """Even with `flwr` made unimportable, the core imports and runs."""
    code = (
        "import sys; sys.modules['flwr'] = None;"
        "import torch, seedlora;"
        "s = seedlora.ASpec('circulant', 0, 1, 2, 'l', 8, 8); print(s.offset())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr
