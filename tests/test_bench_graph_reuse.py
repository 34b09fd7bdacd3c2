"""The graph-reuse benchmark runs end to end on the tiny shape and records what it claims:
one capture in `kept`, one per round in `fresh`, and `kept`'s rounds equal to `fresh`'s.

CUDA only (it captures graphs); imports torch, transformers and seedlora only, so it runs
on a GPU box without Flower (`pytest --noconftest tests/test_bench_graph_reuse.py`)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.graph_reuse import main

pytestmark = pytest.mark.bench


def test_needs_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA device"):
        main(["--preset", "tiny"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")
def test_tiny_run_keeps_one_graph_and_matches_fresh_captures(tmp_path):
    main(["--preset", "tiny", "--rounds", "3", "--steps", "4", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "graph_reuse-tiny.json").read_text())
    fresh, kept = result["rounds"]["fresh"], result["rounds"]["kept"]
    assert [r["captures"] for r in fresh] == [1, 2, 3]
    assert [r["captures"] for r in kept] == [1, 1, 1]
    for f, k in zip(fresh, kept, strict=True):
        assert k["loss"] == pytest.approx(f["loss"], rel=1e-5)
        assert k["max_abs_b_diff"] < 1e-4
    assert result["summary"]["kept_captures"] == 1
