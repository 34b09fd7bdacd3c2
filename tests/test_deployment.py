"""A real deployment on 127.0.0.1: one `flower-superlink`, two `flower-supernode`
processes with their own node config, a run submitted with `flwr run`. Every process
started here is stopped by pid at the end, also on failure."""

import json

import pytest
import torch

from seedlora import relative_error
from seedlora.serialize import state_from_bytes
from server import checkpoint
from tests.processes import Federation

pytestmark = pytest.mark.integration


@pytest.fixture
def deployment(tmp_path):
    """A SuperLink and two SuperNodes; all stopped by pid afterwards."""
    with Federation(tmp_path) as fed:
        fed.start_superlink()
        for i in range(2):
            fed.start_supernode(f"supernode-{i}", i, 2)
        yield fed


def test_two_supernodes_run_and_average_exactly(deployment, tmp_path, tiny_lm_dir, tiny_text_dir):
    out = tmp_path / "outputs"
    overrides = (
        f"model-name='{tiny_lm_dir}' dataset='{tiny_text_dir}' partitioner='iid' "
        f"output-dir='{out}' run-name='dep' num-links=1 "
        "rounds-per-link=2 local-steps=2 seq-len=32 max-train-blocks=16 max-eval-blocks=8 "
        "rank=4 alpha=8.0 save-client-updates=true fraction-evaluate=1.0 export=false "
        "a-kind='gaussian'"
    )
    fed = deployment
    run_id = fed.submit(overrides)
    status = fed.wait_finished(run_id, 420, alive=tuple(fed.procs))
    assert status == "finished:completed", f"{status}: {fed.log('superlink')[-3000:]}"

    run_dir = out / "dep"
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert all(r["accepted"] == 2 for r in doc["rounds"][1:])
    assert doc["rounds"][2]["client_eval"]  # both nodes evaluated their own held-out files

    tensors, meta = state_from_bytes(
        (run_dir / "client-updates" / "round-0002.safetensors").read_bytes()
    )
    weights = {int(k): v for k, v in meta["weights"].items()}
    assert sorted(weights) == [0, 1]  # each node trained its own partition
    link = checkpoint.load(run_dir).links[0]
    total = sum(weights.values())
    errors = []
    for spec in link.specs:
        mean_b = sum(
            w / total * tensors[f"{i}/{spec.layer}.lora_B"].double() for i, w in weights.items()
        )
        a = spec.dense().double()
        scale = spec.scaling(link.alpha)
        errors.append(
            relative_error(scale * link.factors[spec.layer].double() @ a, scale * mean_b @ a)
        )
    print(f"deployment: max relative error of the merged update {max(errors):.2e}")
    assert max(errors) <= 1e-6
    assert any(torch.count_nonzero(f) for f in link.factors.values())
