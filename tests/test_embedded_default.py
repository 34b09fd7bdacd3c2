"""The embedded default end to end: federated fine-tuning of the shipped base lowers its
held-out perplexity (code-lm), and code-cls learns its new head (in-process grid)."""

import pytest

from client.compose import build_client_app
from contract.config import RunConfig, RunConfigError
from server.chain_server import ChainServer, run_chain
from server.compose import build_server
from server.rounds import FlowerRounds
from simulation.local import RUN_ID, LocalGrid


def run_default(tmp_path, num_nodes: int, **overrides) -> ChainServer:
    grid = LocalGrid(build_client_app(overrides), num_nodes)
    server = build_server(RunConfig.from_flower(overrides), RUN_ID, tmp_path)
    run_chain(server, FlowerRounds(grid))
    return server


@pytest.mark.integration
def test_code_lm_lowers_held_out_perplexity(tmp_path):
    ov = {
        "num-links": 2,
        "rounds-per-link": 1,
        "local-steps": 5,
        "lr": 0.005,
        "max-train-blocks": 64,
        "max-eval-blocks": 64,
        "fraction-evaluate": 0.0,
        "export": False,
    }
    server = run_default(tmp_path, 4, **ov)
    rounds = [h["central"]["ppl"] for h in server.state.history]
    print(f"code-lm central perplexity per round: {[round(p, 2) for p in rounds]}")
    assert rounds[-1] < 0.95 * rounds[0]


@pytest.mark.integration
def test_code_cls_learns_its_head(tmp_path):
    ov = {
        "task": "code-cls",
        "num-links": 1,
        "rounds-per-link": 2,
        "local-steps": 15,
        "lr": 0.005,
        "max-train-blocks": 96,
        "max-eval-blocks": 64,
        "num-classes": 4,
        "fraction-evaluate": 1.0,
        "export": False,
    }
    server = run_default(tmp_path, 3, **ov)
    acc = [h["central"]["accuracy"] for h in server.state.history]
    print(f"code-cls central accuracy per round: {acc}")
    assert acc[-1] > acc[0] and acc[-1] > 1 / 4 + 0.1
    assert "score.weight" in server.state.arrays  # the head travels with B
    assert server.state.history[-1]["client_eval"]["accuracy"] > 0


def test_rank_larger_than_a_layer_fails_naming_rank(tmp_path):
    with pytest.raises(RunConfigError, match="rank"):
        build_server(RunConfig(rank=100_000), RUN_ID, tmp_path)
