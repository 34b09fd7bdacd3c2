"""bench.quality (grid and tuned) and bench.beyond: their tiny modes end to end, and the
method suffixes.

Why: quality per byte is the project's claim against FedIT; the tuned protocol must choose
on the validation half and report on the test half, or the comparison is not fair."""

from __future__ import annotations

import json
import math

import pytest

from bench import beyond, quality


def test_method_suffixes_parse_and_unknown_ones_are_refused():
    assert quality.split_variant("c3la@r4@lr0.001") == ("c3la", {"rank": 4, "lr": 0.001})
    swapped = {"frozen-factor": "B", "rank": 9}
    assert quality.split_variant("rac-lora@fB@r9") == ("rac-lora", swapped)
    assert quality.split_variant("c3la@L6x1") == ("c3la", {"num-links": 6, "rounds-per-link": 1})
    with pytest.raises(ValueError, match="unknown method"):
        quality.split_variant("lora")
    with pytest.raises(ValueError, match="suffix"):
        quality.split_variant("c3la@x2")
    methods = quality.default_methods(quality.BASE)
    assert "c3la@r7" in methods and "c3la@fB@r9" in methods and "c3la@L6x1" in methods


@pytest.mark.bench
def test_grid_tiny_ranks_methods_by_quality_and_bytes(tmp_path):
    payload = quality.main(["grid", "--tiny", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "quality.json").read_text())
    assert doc["completed_runs"] == doc["planned_runs"] == 4 and not doc["failed_runs"]
    runs = {r["method"]: r for r in doc["runs"]}
    for r in runs.values():
        assert r["metric"] == "ppl" and r["rounds"] == 1 and r["skipped_rounds"] == 0
        assert math.isfinite(r["final"]) and r["final"] > 1 and r["base"] > 1
    # FedIT sends A and B, chains only B; half the rank halves the chain's bytes.
    assert runs["fedit"]["total_bytes_up"] > runs["c3la"]["total_bytes_up"]
    assert 1.5 < runs["c3la"]["total_bytes_up"] / runs["c3la@r2"]["total_bytes_up"] <= 2.0
    central = runs["central"]  # one node, pooled data, the same optimizer-step budget
    assert central["nodes"] == 1 and central["partitioning"] == "pooled"
    assert central["total_optimizer_steps"] == runs["c3la"]["total_optimizer_steps"]
    checks = {c["method"]: c for c in payload["goal"]["checks"]}
    assert set(checks) == {"c3la", "c3la@r2"}
    assert (
        0.25
        < checks["c3la@r2"]["bytes_ratio_vs_fedit"]
        < checks["c3la"]["bytes_ratio_vs_fedit"]
        < 1
    )
    assert (tmp_path / "quality-code-lm.png").stat().st_size > 0


@pytest.mark.bench
def test_tuned_tiny_picks_on_validation_and_reports_on_test(tmp_path):
    quality.main(["tuned", "--tiny", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "quality_tuned.json").read_text())
    assert doc["lr_grid"] == {"c3la": [1e-3, 3e-2], "fedit": [1e-3, 3e-2]}
    assert doc["completed_runs"] == doc["planned_runs"] == 6 and not doc["failed_runs"]
    for method in ("c3la", "fedit"):
        sweep = [r for r in doc["runs"] if r["phase"] == "sweep" and r["method"] == method]
        finals = {r["lr"]: r["final"] for r in sweep}
        assert len(finals) == 2 and all(math.isfinite(v) for v in finals.values())
        best = min(finals, key=finals.get)  # perplexity: the validation argmin
        assert doc["chosen"]["code-lm:iid"][method]["lr"] == best
        (row,) = [s for s in doc["summary"] if s["method"] == method]
        assert row["lr"] == best and row["seeds"] == [0]
        (final,) = [r for r in doc["runs"] if r["phase"] == "final" and r["method"] == method]
        assert final["lr"] == best and row["final_mean"] == final["final"]
    assert {c["task"] for c in doc["goal"]["cells"]} == {"code-lm"}
    assert doc["goal"]["complete"] is False  # one cell, one seed: never judged met
    assert (tmp_path / "quality_tuned-code-lm-iid.png").stat().st_size > 0


@pytest.mark.bench
def test_beyond_tiny_mixed_ranks_upload_between_the_extremes(tmp_path):
    payloads = beyond.main(["--tiny", "--items", "ranks", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "beyond-ranks.json").read_text())
    assert doc["summary"] == payloads["ranks"]["summary"]
    assert set(doc["by_variant"]) == set(beyond.RANKS)
    up = {k: v["total_bytes_up_mean"] for k, v in doc["by_variant"].items()}
    assert up["all r_min=2"] < up["mixed 8,4,2,2"] < up["all r_max=8"]
    assert 0 < doc["summary"]["bytes_ratio_mixed_vs_r_max"] < 1
    assert all(
        math.isfinite(v) for v in (doc["summary"]["ppl_mixed"], doc["summary"]["ppl_all_r_min"])
    )
