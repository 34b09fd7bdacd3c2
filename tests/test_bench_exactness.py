"""bench.exactness: the exactness, bytes and A-draw tiny modes say what the math promises.

Why: a benchmark that silently measures the wrong thing is worse than none; these runs are
small enough for every test session yet check the claims themselves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import exactness

pytestmark = pytest.mark.bench


def _run(tmp_path: Path, command: str, name: str) -> dict:
    exactness.main([command, "--tiny", "--out", str(tmp_path)])
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_b_only_average_is_exact_and_fedit_is_not(tmp_path: Path) -> None:
    data = _run(tmp_path, "exactness", "exactness")
    assert (tmp_path / "exactness.png").stat().st_size > 0
    errors = {(s["method"], s["dtype"], s["clients"]): s["max_error"] for s in data["summary"]}
    kinds = {f"seedlora-{k}{f}" for k in exactness.KINDS for f in ("", "+flower")}
    assert {m for m, _, _ in errors} == {"fedit"} | kinds
    for (method, dtype, _), err in errors.items():
        if method.startswith("seedlora") and dtype == "float32":
            assert 0 < err <= 1e-6, (method, err)
        elif method.startswith("seedlora"):  # bfloat16 keeps ~3 significant digits
            assert 1e-4 < err < 2e-2, (method, err)
        else:
            assert err >= 1e-2, (method, dtype, err)
    assert data["goal"]["pass"] is True and data["goal"]["max_seedlora_float32"] <= 1e-6


def test_bytes_ratio_per_layer_and_the_measured_reply(tmp_path: Path) -> None:
    data = _run(tmp_path, "bytes", "bytes")
    (row,) = data["rows"]
    rank, layers = row["rank"], row["layers"]
    assert row["num_adapted_layers"] == len(layers) == 16 and row["prepared_agree"] is True
    up = {m: row["bytes"][m]["up"] for m in exactness.METHODS}
    assert up["seedlora"] == up["ffa"] == 4 * rank * sum(x["n_out"] for x in layers)
    assert up["fedit"] == 4 * rank * sum(x["n_in"] + x["n_out"] for x in layers)
    assert up["full"] == 4 * row["num_params"] > 10 * up["fedit"]
    assert 0.5 < row["ratio_up_ours_fedit"] == up["seedlora"] / up["fedit"] < 0.6
    for t in row["layer_types"]:
        assert (t["ratio_ours_fedit"] == 0.5) == t["exactly_half"] == (t["n_in"] == t["n_out"])
    reply = data["measured_reply"]
    assert reply["analytic_bytes"] == up["seedlora"]
    assert 0 < reply["overhead_bytes"] < 0.05 * reply["analytic_bytes"]


def test_a_draw_times_both_rules_and_digests_match_golden_and_reference(tmp_path: Path) -> None:
    data = _run(tmp_path, "a-draw", "a_draw")
    assert [r["set"] for r in data["rows"]] == ["4096x4", "llama-7b"]
    for row in data["rows"]:
        assert row["legacy_s"] > 0 and row["exact_s"] > 0 and row["ratio"] > 0
    assert data["golden_equal"] is True
    digests = data["digests"]
    assert digests["specs"] == len(exactness.DIGEST_SPECS) == 24
    assert digests["moved_equal"] is True and digests["equal_to_reference"] is True
