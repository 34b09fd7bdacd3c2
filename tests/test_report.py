"""What a run says: the adapted layers at the start, one line per round with the run's
bytes so far, and round numbers that match the schedule of methods without chains."""

import logging

import torch

from contract.config import UploadConfig
from contract.round_record import RoundRecord
from seedlora import inject, trainable_state
from server.report import adapter_summary, compact_names, round_line
from simulation.local import run_local
from testing.tiny import GPT2_TARGETS, tiny_gpt2
from tests import test_app_local as app_tests

overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)


def test_compact_names_fold_layer_numbers():
    names = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1, 2, 5) for m in ("q_proj", "v_proj")]
    assert compact_names(names) == "model.layers.[0-2,5].self_attn.{q_proj,v_proj}"
    assert compact_names(["score"]) == "score"
    assert compact_names(["h.0.mlp", "lm_head"]) == "h.0.mlp, lm_head"


def test_adapter_summary_counts_layers_parameters_and_upload():
    model = tiny_gpt2()
    names = inject(model, list(GPT2_TARGETS), kind="circulant", seed=0, rank=4, alpha=8.0)
    state = trainable_state(model)
    numbers = sum(v.numel() for v in state.values())
    line = adapter_summary(model, "seedlora", state, UploadConfig())
    assert line.startswith(f"seedlora: adapted {len(names)} layers (transformer.h.[0-1].{{")
    assert f"| {numbers:,} trainable parameters | " in line
    assert line.endswith(f"upload {4 * numbers / 1e3:.1f} kB per client-round")
    half = adapter_summary(model, "seedlora", state, UploadConfig(upload_codec="float16"))
    assert half.endswith(f"upload {2 * numbers / 1e3:.1f} kB per client-round")


def test_round_line_of_one_link_and_of_a_chain():
    entry = {
        "round": 5,
        "link": 0,
        "round_in_link": 5,
        "rounds_per_link": 6,
        "num_links": 1,
        "accepted": 2,
        "sent": 2,
        "skipped": False,
        "bytes_up": 2e6,
        "bytes_down": 1e6,
        "bytes_up_total": 9e6,
        "bytes_down_total": 4e6,
        "wall_time": 1.0,
    }
    line = round_line(RoundRecord.from_dict(entry))
    assert line.startswith("round 5/6 | clients 2/2 |"), line
    assert "up 2.000 MB down 1.000 MB (run: up 9.000 MB down 4.000 MB)" in line
    chained = round_line(
        RoundRecord.from_dict({**entry, "num_links": 3, "link": 1, "round_in_link": 2})
    )
    assert chained.startswith("link 1 round 2/6 (global 5) |"), chained


def test_a_run_says_what_it_adapted_and_counts_its_bytes(overrides, caplog):
    """ffa runs 3 links x 1 round as one link of 3 rounds: round i/3, never 2/1."""
    ov = {**overrides, "method": "ffa", "num-links": 3, "rounds-per-link": 1}
    with caplog.at_level(logging.INFO, logger="flwr"):
        result = run_local(ov, 2)
    lines = [r.getMessage() for r in caplog.records]
    assert any(x.startswith("ffa: adapted 8 layers (transformer.h.[0-1].{") for x in lines)
    rounds = result.metrics["rounds"][1:]
    assert [(r["round_in_link"], r["rounds_per_link"], r["num_links"]) for r in rounds] == [
        (i, 3, 1) for i in (1, 2, 3)
    ]
    assert any(x.startswith("round 2/3 | clients 2/2") for x in lines), lines
    up = torch.tensor([r["bytes_up"] for r in rounds]).cumsum(0).tolist()
    assert [r["bytes_up_total"] for r in rounds] == up and up[-1] > 0
    down = torch.tensor([r["bytes_down"] for r in rounds]).cumsum(0).tolist()
    assert [r["bytes_down_total"] for r in rounds] == down
