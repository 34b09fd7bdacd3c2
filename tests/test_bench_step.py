"""bench.step: the overhead tiny mode measures what it claims (computed here independently
from the tiny shape), and the CUDA-only subcommands refuse clearly without a GPU.

Why: the step-time numbers back a claim (B-only costs no more than PEFT LoRA); a wrong target
list, a trainable A or a floor that trains nothing would make them meaningless."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from bench import step

pytestmark = pytest.mark.bench
TINY = step.PRESETS["tiny"]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("step")
    step.main(["overhead", "--tiny", "--out", str(out), "--name", "tiny"])
    assert (out / "tiny.png").stat().st_size > 0
    return json.loads((out / "tiny.json").read_text())


def test_every_variant_timed_with_ratios_and_goals(result: dict) -> None:
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == list(step.VARIANTS) and not result["failed"]
    for name, r in rows.items():
        assert len(r["times_ms"]) == 2 and min(r["times_ms"]) > 0, name
        assert r["peak_bytes"] >= r["resident_bytes"] > 0, name
        assert r["time_x_floor"] > 0 and r["time_x_peft"] > 0 and r["memory_x_peft"] > 0, name
        assert r["busy_ms"] > 0 and r["aten_op_calls"] > 0, name
    assert rows["floor"]["time_x_floor"] == pytest.approx(1.0)
    assert set(result["goals"]) == {v for v in step.VARIANTS if v.startswith("seedlora-")}
    assert "time_le_0.35_peft" in result["goals"]["seedlora-circulant-grouped"]
    assert "time_le_1.25_floor" not in result["goals"]["seedlora-circulant-reference"]
    assert result["config"]["preset"] == "tiny" and result["environment"]["commit"]


def test_trainable_counts_are_b_only(result: dict) -> None:
    rows = {r["variant"]: r for r in result["variants"]}
    h, i, r = TINY.hidden, TINY.intermediate, TINY.rank
    kv = TINY.kv_heads * (h // TINY.heads)
    dims = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # written out by hand
    b_only = TINY.layers * sum(n_out * r for _, n_out in dims)
    full = TINY.layers * sum((n_in + n_out) * r for n_in, n_out in dims)
    assert rows["floor"]["trainable_params"] == 0
    assert rows["peft-lora"]["trainable_params"] == full
    for name in ("peft-lora-frozen-a", "seedlora-gaussian", "seedlora-random-block-grouped"):
        assert rows[name]["trainable_params"] == b_only, name


def test_same_start_and_every_adapter_trains(result: dict) -> None:
    rows = {r["variant"]: r for r in result["variants"]}
    first = rows["floor"]["loss_first"]
    assert math.isfinite(first)
    for name, row in rows.items():
        assert row["loss_first"] == pytest.approx(first, rel=1e-5), name
    assert rows["floor"]["loss_last"] == pytest.approx(first, rel=1e-6)
    for name in step.VARIANTS[1:]:
        assert rows[name]["loss_last"] < rows[name]["loss_first"], name
    peft = rows["peft-lora"]["saved_for_backward_bytes"]  # PEFT keeps x for A's gradient
    assert rows["seedlora-circulant"]["saved_for_backward_bytes"] < peft


def test_llama_preset_builds_untied_llama_in_its_dtype() -> None:
    shape = replace(step.PRESETS["llama2-7b"], hidden=64, intermediate=128, layers=1, heads=4)
    model = step.build_model(replace(shape, kv_heads=4), torch.device("cpu"), 0)
    assert model.config.model_type == "llama"
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_cuda_only_paths_refuse_on_cpu(monkeypatch, tmp_path) -> None:
    with pytest.raises(SystemExit, match="CUDA only"):
        step.main(["overhead", "--variants", "floor-liger", "--out", str(tmp_path)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in ("graph-reuse", "quant-memory"):
        with pytest.raises(SystemExit, match="no CUDA device"):
            step.main([command, "--tiny", "--out", str(tmp_path)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")
def test_graph_reuse_keeps_one_graph_and_matches_fresh_captures(tmp_path) -> None:
    step.main(["graph-reuse", "--tiny", "--rounds", "3", "--steps", "4", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "graph_reuse-tiny.json").read_text())
    fresh, kept = result["rounds"]["fresh"], result["rounds"]["kept"]
    assert [r["captures"] for r in fresh] == [1, 2, 3]
    assert [r["captures"] for r in kept] == [1, 1, 1]
    for f, k in zip(fresh, kept, strict=True):
        assert k["loss"] == pytest.approx(f["loss"], rel=1e-5) and k["max_abs_b_diff"] < 1e-4
