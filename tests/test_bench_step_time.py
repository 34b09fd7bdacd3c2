"""The step-time benchmark runs end to end on a tiny config and measures what it claims.

Why: its numbers back a claim (B-only costs no more than PEFT LoRA), so a silent mistake in
how it builds the variants (a wrong target list, A left trainable, adapters started at a
non-zero B, a floor that trains nothing) would make those numbers meaningless. The checks
below are computed independently of the script from the tiny config's layer shapes.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from bench.step_time import PRESETS, VARIANTS, main

pytestmark = pytest.mark.bench

TINY = PRESETS["tiny"]


def _dims() -> list[tuple[int, int]]:
    """(n_in, n_out) of the seven projections of one tiny Qwen2 block, written out by hand."""
    h, i = TINY.hidden, TINY.intermediate
    kv = TINY.kv_heads * (TINY.hidden // TINY.heads)
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("step_time")
    main(
        [
            "--device",
            "cpu",
            "--preset",
            "tiny",
            "--warmup",
            "1",
            "--steps",
            "2",
            "--threads",
            "1",
            "--top-ops",
            "5",
            "--out",
            str(out),
            "--name",
            "tiny",
        ]
    )
    return json.loads((out / "tiny.json").read_text()), out


def test_every_variant_timed_with_memory(result: tuple[dict, Path]) -> None:
    data, out = result
    rows = {r["variant"]: r for r in data["variants"]}
    assert list(rows) == list(VARIANTS)
    for name, r in rows.items():
        assert len(r["times_ms"]) == 2, name
        assert all(t > 0 for t in r["times_ms"]), name
        assert r["median_ms"] > 0, name
        assert r["peak_bytes"] >= r["resident_bytes"] > 0, name
        assert r["saved_for_backward_bytes"] > 0, name
        assert r["top_ops"], name
    assert rows["floor"]["time_x_floor"] == pytest.approx(1.0)
    assert rows["peft-lora"]["memory_x_peft"] == pytest.approx(1.0)
    ours = {v for v in VARIANTS if v.startswith("seedlora-")}
    assert set(data["goals"]) == ours and len(ours) == 9
    assert "time_le_0.35_peft" in data["goals"]["seedlora-circulant-grouped"]
    assert "time_le_1.25_floor" in data["goals"]["seedlora-circulant"]
    assert "time_le_1.25_floor" not in data["goals"]["seedlora-circulant-reference"]
    assert "environment" in data and data["config"]["preset"] == "tiny"
    assert (out / "tiny.png").stat().st_size > 1000


def test_trainable_counts_are_b_only(result: tuple[dict, Path]) -> None:
    rows = {r["variant"]: r for r in result[0]["variants"]}
    r, layers = TINY.rank, TINY.layers
    b_only = layers * sum(n_out * r for _, n_out in _dims())
    full = layers * sum((n_in + n_out) * r for n_in, n_out in _dims())
    assert rows["floor"]["trainable_params"] == 0
    assert rows["peft-lora"]["trainable_params"] == full
    assert rows["peft-lora-frozen-a"]["trainable_params"] == b_only
    for kind in ("gaussian", "circulant", "random-block", "circulant-reference"):
        ours = rows[f"seedlora-{kind}"]["trainable_params"]
        assert ours == b_only, kind
        assert ours / rows["peft-lora"]["trainable_params"] == pytest.approx(b_only / full)
    assert 0 < b_only < full


def test_same_start_and_training_moves(result: tuple[dict, Path]) -> None:
    """All variants start from one model and a zero B, so their first losses agree exactly-ish;
    every adapter actually trains (loss falls on the repeated batch), the floor does not."""
    rows = {r["variant"]: r for r in result[0]["variants"]}
    first = rows["floor"]["loss_first"]
    assert math.isfinite(first)
    for name, row in rows.items():
        assert row["loss_first"] == pytest.approx(first, rel=1e-5), name
    assert rows["floor"]["loss_last"] == pytest.approx(first, rel=1e-6)
    for name in VARIANTS[1:]:
        assert rows[name]["loss_last"] < rows[name]["loss_first"], name


def test_b_only_layer_saves_less_than_peft(result: tuple[dict, Path]) -> None:
    """PEFT keeps x for lora_A's weight grad; a frozen A needs no x, so B-only saves less."""
    rows = {r["variant"]: r for r in result[0]["variants"]}
    peft = rows["peft-lora"]["saved_for_backward_bytes"]
    for name in ("peft-lora-frozen-a", "seedlora-circulant", "seedlora-random-block"):
        assert rows[name]["saved_for_backward_bytes"] < peft, name


def test_llama_preset_builds_untied_llama_in_its_dtype() -> None:
    """The 7B preset is Llama-2-7B's shape: a Llama model (no GQA, untied head), built in
    bf16 directly; checked here on a tiny copy of the preset."""
    import torch

    from bench.step_time import build_model

    shape = replace(
        PRESETS["llama2-7b"], hidden=64, intermediate=128, layers=1, heads=4, kv_heads=4
    )
    model = build_model(shape, torch.device("cpu"), 0)
    assert model.config.model_type == "llama"
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_liger_variants_refused_on_cpu(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="CUDA only"):
        main(["--preset", "tiny", "--variants", "floor-liger", "--out", str(tmp_path)])


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="Liger's Triton kernels need a CUDA GPU"
)
def test_liger_variants_match_and_leave_transformers_unpatched(tmp_path: Path) -> None:
    """The Liger rows start from the plain rows' loss (the same model, kernels that compute
    the same function), and the patching of transformers' module is undone after each."""
    pytest.importorskip("liger_kernel")
    import transformers.models.qwen2.modeling_qwen2 as qwen2

    rope, mlp = qwen2.apply_rotary_pos_emb, qwen2.Qwen2MLP
    graphed = "seedlora-circulant-graphed"
    variants = ["floor", "floor-liger", graphed, f"{graphed}-liger"]
    main(
        ["--device", "cuda", "--preset", "tiny", "--warmup", "1", "--steps", "2",
         "--top-ops", "0", "--variants", *variants, "--out", str(tmp_path), "--name", "t",
         "--no-plot"]
    )  # fmt: skip
    rows = {r["variant"]: r for r in json.loads((tmp_path / "t.json").read_text())["variants"]}
    assert list(rows) == variants
    first = rows["floor"]["loss_first"]
    for name in variants[1:]:
        assert rows[name]["loss_first"] == pytest.approx(first, rel=1e-4), name
    assert rows["seedlora-circulant-graphed-liger"]["capture_ms"] > 0
    assert qwen2.apply_rotary_pos_emb is rope and qwen2.Qwen2MLP is mlp
