"""run-config `precision`: the frozen base in bf16/fp16 under autocast, B kept float32.

Why: a GPU client packs more clients per GPU with a half-precision base, but the averaged
B must stay a float32 master copy (the wire contract) and fp16 needs loss scaling; these
run on the CPU (autocast and GradScaler support it) through the real app code.
"""

import json

import pytest
import torch

from client.compose import build_client_app
from contract import protocol as p
from contract.config import RunConfig, RunConfigError
from runtime.devices import place
from seedlora import adapter_layers, prepare
from server.chain_server import run_chain
from server.compose import build_server
from server.rounds import FlowerRounds
from simulation.local import RUN_ID, LocalGrid
from testing.tiny import LLAMA_TARGETS, tiny_llama

CPU = torch.device("cpu")


def test_place_casts_only_the_frozen_weights():
    model = prepare(
        tiny_llama(), "seedlora", list(LLAMA_TARGETS), kind="gaussian", seed=0, rank=4, alpha=8.0
    )
    model = place(model, CPU, "bf16")
    trainable = {n: q.dtype for n, q in model.named_parameters() if q.requires_grad}
    frozen = {n: q.dtype for n, q in model.named_parameters() if not q.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert frozen and set(frozen.values()) == {torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=torch.arange(12).view(2, 6), labels=torch.arange(12).view(2, 6)).loss
    loss.backward()
    grads = [layer.lora_B.grad for _, layer in adapter_layers(model)]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_precision_is_validated():
    with pytest.raises(RunConfigError, match="'precision'"):
        RunConfig.from_flower({"precision": "fp8"})


def _train_loss(overrides: dict, tmp_path, precision: str) -> tuple[float, dict]:
    ov = {**overrides, "precision": precision, "device": "cpu"}
    grid = LocalGrid(build_client_app(ov), 2)
    run_chain(
        build_server(RunConfig.from_flower(ov), RUN_ID, tmp_path / precision), FlowerRounds(grid)
    )
    doc = json.loads((tmp_path / precision / "metrics.json").read_text())
    (entry,) = [r for r in doc["rounds"] if r["round"] == 1]
    assert entry["accepted"] == 2 and not entry["rejected"]
    reply = grid.replies[0].content[p.ARRAYS].to_torch_state_dict()
    return entry["train_loss"], reply


@pytest.mark.integration
def test_half_precision_trains_like_fp32(tiny_lm_dir, tiny_text_dir, tmp_path):
    overrides = {
        "model-name": tiny_lm_dir,
        "dataset": tiny_text_dir,
        "partitioner": "iid",
        "num-links": 1,
        "rounds-per-link": 1,
        "local-steps": 3,
        "seq-len": 32,
        "max-train-blocks": 8,
        "rank": 4,
        "fraction-evaluate": 0.0,
        "central-eval": False,
        "export": False,
    }
    ref, ref_b = _train_loss(overrides, tmp_path, "fp32")
    for precision in ("bf16", "fp16"):
        loss, b = _train_loss(overrides, tmp_path, precision)
        assert set(b) == set(ref_b)
        assert all(v.dtype == torch.float32 for v in b.values())  # the wire stays float32
        assert all(torch.isfinite(v).all() for v in b.values())
        moved = sum(float(v.abs().sum()) for v in b.values())
        assert moved > 0, f"{precision}: B did not train"
        assert abs(loss - ref) < 0.05 * ref, (precision, loss, ref)
        diff = max(float((b[k] - ref_b[k]).abs().max()) for k in b)
        assert diff > 0, f"{precision}: identical to fp32, autocast did nothing"
