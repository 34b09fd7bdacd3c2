"""The exactness and bytes benchmarks run end to end on tiny options and say what they should.

Why: a benchmark that silently breaks (or silently measures the wrong thing) is worse than
none; these runs are small enough for every test session yet check the claims themselves.
"""

import json
from pathlib import Path

import pytest

from bench import bytes as bytes_bench
from bench import exactness

pytestmark = pytest.mark.bench


def _load(directory: Path, name: str) -> dict:
    assert (directory / f"{name}.png").stat().st_size > 0
    return json.loads((directory / f"{name}.json").read_text())


def test_exactness_smoke(tmp_path: Path) -> None:
    exactness.main(
        [
            "--clients",
            "2",
            "8",
            "--seeds",
            "1",
            "--rank",
            "8",
            "--alpha",
            "16",
            "--shapes",
            "64x96",
            "96x64",
            "--no-shipped",
            "--out-dir",
            str(tmp_path),
        ]
    )
    data = _load(tmp_path, "exactness")
    assert {"environment", "config", "goal", "summary", "per_layer"} <= set(data)
    errors = {(s["method"], s["dtype"], s["clients"]): s["max_error"] for s in data["summary"]}
    methods = {m for m, _, _ in errors}
    assert methods == {"fedit"} | {
        f"seedlora-{k}{f}" for k in exactness.KINDS for f in ("", "+flower")
    }
    for (method, dtype, _), err in errors.items():
        if method.startswith("seedlora") and dtype == "float32":
            assert 0 < err <= 1e-6, (method, err)
        elif method.startswith("seedlora"):  # bfloat16 keeps ~3 significant digits
            assert 1e-4 < err < 2e-2, (method, err)
        else:
            assert err >= 1e-2, (method, dtype, err)
    assert data["goal"]["pass"] is True
    assert data["goal"]["max_seedlora_float32"] <= 1e-6


def test_bytes_smoke(tmp_path: Path) -> None:
    bytes_bench.main(
        ["--models", "shipped", "--ranks", "4", "--reply-rank", "4", "--out-dir", str(tmp_path)]
    )
    data = _load(tmp_path, "bytes")
    assert {"environment", "config", "rows", "measured_reply", "notes"} <= set(data)
    (row,) = data["rows"]
    rank, layers = row["rank"], row["layers"]
    assert row["num_adapted_layers"] == len(layers) == 16  # 4 blocks x c_attn, c_proj x2, c_fc
    assert row["prepared_agree"] is True
    up = {m: row["bytes"][m]["up"] for m in bytes_bench.METHODS}
    assert up["seedlora"] == up["ffa"] == 4 * rank * sum(x["n_out"] for x in layers)
    assert up["fedit"] == 4 * rank * sum(x["n_in"] + x["n_out"] for x in layers)
    assert up["full"] == 4 * row["num_params"] > 10 * up["fedit"]
    assert row["ratio_up_ours_fedit"] == up["seedlora"] / up["fedit"]
    for t in row["layer_types"]:
        if t["n_in"] == t["n_out"]:
            assert t["ratio_ours_fedit"] == 0.5 and t["exactly_half"]
        elif t["n_in"] > t["n_out"]:
            assert t["ratio_ours_fedit"] < 0.5 and not t["exactly_half"]
        else:
            assert t["ratio_ours_fedit"] > 0.5
    reply = data["measured_reply"]
    assert reply["analytic_bytes"] == up["seedlora"]
    assert 0 < reply["overhead_bytes"] < 0.05 * reply["analytic_bytes"]
