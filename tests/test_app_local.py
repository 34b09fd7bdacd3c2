"""The ServerApp and ClientApp together over an in-process grid (no Ray): exactness end
to end, every strategy, bad replies, and resume after a crash."""

import json

import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from client.compose import build_client_app
from contract import protocol as p
from contract.config import STRATEGIES, RunConfig
from contract.link_spec import LinkSpec
from seedlora import ASpec, adapter_layers, relative_error
from server.chain_server import ChainServer
from server.compose import run_server
from simulation.local import RUN_ID, LocalGrid
from testing.attackers import scaled_update


@pytest.fixture
def overrides(tiny_lm_dir, tiny_text_dir):
    return {
        "model-name": tiny_lm_dir,
        "dataset": tiny_text_dir,
        "partitioner": "iid",
        "num-links": 1,
        "rounds-per-link": 1,
        "local-steps": 2,
        "seq-len": 32,
        "max-train-blocks": 16,
        "max-eval-blocks": 8,
        "rank": 4,
        "alpha": 8.0,
        "fraction-evaluate": 0.0,
        "export": False,
    }


def weighted_replies(grid: LocalGrid) -> tuple[list, list[int], int]:
    """The train replies' contents, their example counts and the counts' sum."""
    replies = [r.content for r in grid.replies]
    weights = [r[p.METRICS][p.NUM_EXAMPLES] for r in replies]
    return replies, weights, sum(weights)


def run(overrides, tmp_path, num_nodes=3, prepare=None, **extra) -> tuple[ChainServer, LocalGrid]:
    ov = {**overrides, **extra}
    grid = LocalGrid(build_client_app(ov), num_nodes)
    if prepare:
        prepare(grid)
    context = Context(RUN_ID, 0, {}, RecordDict(), {})
    server = run_server(RunConfig.from_flower(ov), grid, context, folder=tmp_path)
    return server, grid


def metrics(tmp_path) -> dict:
    return json.loads((tmp_path / "metrics.json").read_text())


@pytest.mark.parametrize(
    "kind", ["gaussian", pytest.param("circulant", marks=pytest.mark.integration)]
)
def test_merged_base_is_the_weighted_mean_of_client_updates(overrides, tmp_path, kind):
    server, grid = run(overrides, tmp_path, **{"a-kind": kind})
    pristine = server.task.load_model()
    replies, weights, total = weighted_replies(grid)
    errors = []
    for name, layer in adapter_layers(server.model):
        spec = ASpec(kind, 0, 0, 4, name, layer.spec.n_in, layer.spec.n_out)
        a = spec.dense().double()
        mean = sum(
            w / total * spec.scaling(8.0) * r[p.ARRAYS][f"{name}.lora_B"].numpy()
            for w, r in zip(weights, replies, strict=True)
        )
        expected = torch.from_numpy(mean).double() @ a
        got = layer.base.weight.double() - pristine.get_submodule(name).weight.double()
        errors.append(relative_error(got.T, expected))  # GPT-2 Conv1D stores W transposed
    print(f"{kind}: end-to-end max relative error {max(errors):.2e}")
    assert max(errors) <= 1e-6
    assert len(errors) == 8  # 2 blocks x (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)


@pytest.mark.integration
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_completes_a_chain(overrides, tmp_path, strategy):
    extra = {"strategy": strategy, "num-links": 2, "rounds-per-link": 2, "proximal-mu": 0.01}
    server, _ = run(overrides, tmp_path, **extra)
    doc = metrics(tmp_path)
    assert doc["links_merged"] == 2 and len(server.state.links) == 2
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2, 3, 4]
    assert all(r["accepted"] == 3 and not r["skipped"] for r in doc["rounds"][1:])
    b = torch.cat([f.flatten() for f in server.state.links[0].factors.values()])
    assert torch.isfinite(b).all() and b.abs().sum() > 0


def faulty(kind: str, honest):
    """A ClientApp that replies with a bad update of the given kind (its echo otherwise
    the `honest` app's, A digest included)."""

    def app(msg: Message, context) -> Message:
        config = msg.content[p.CONFIG]
        arrays = msg.content[p.ARRAYS].to_torch_state_dict()
        arrays = {k: torch.full_like(v, 0.5) for k, v in arrays.items()}
        digest = honest(msg, context).content[p.ECHO][p.A_DIGEST]
        spec = LinkSpec.from_wire(config[p.LINK_SPEC])
        echo = p.echo_record(spec.chain_index, config[p.LINKS_DIGEST], RUN_ID, 2, digest)
        if kind == "a-digest":  # a client whose torch drew another A from the same spec
            echo[p.A_DIGEST] = "f" * 64
        elif kind == "nan":
            first = next(iter(arrays))
            arrays[first][0, 0] = float("nan")
        elif kind == "stale":
            echo[p.CHAIN_INDEX] = spec.chain_index - 1
        elif kind == "digest":
            echo[p.LINKS_DIGEST] = "0" * 64
        content = RecordDict(
            {
                p.ARRAYS: ArrayRecord(arrays),
                p.METRICS: MetricRecord({p.NUM_EXAMPLES: 1000, p.TRAIN_LOSS: 1.0}),
                p.ECHO: echo,
            }
        )
        return Message(content, reply_to=msg)

    return app


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["nan", "stale", "digest", "a-digest"])
def test_bad_reply_is_rejected_and_changes_nothing(overrides, tmp_path, kind):
    extra = {"num-links": 2}
    clean, _ = run(overrides, tmp_path / "clean", prepare=lambda g: g.apps.pop(103), **extra)

    def poison(grid):
        grid.apps[103] = faulty(kind, grid.apps[103])

    dirty, _ = run(overrides, tmp_path / "dirty", prepare=poison, **extra)
    doc = metrics(tmp_path / "dirty")
    rejected = [r for rnd in doc["rounds"][1:] for r in rnd["rejected"]]
    assert len(rejected) == 2 and all(r["node"] == 103 for r in rejected), rejected
    from seedlora import links_digest

    assert links_digest(dirty.state.links) == links_digest(clean.state.links)
    assert dirty.state.links[0].factors  # a real chain was built


@pytest.mark.integration  # a federated round in process
def test_a_reply_on_another_a_is_rejected_with_its_reason(overrides, tmp_path, caplog):
    """A client whose A digest differs from the server's (same A-spec, another A: e.g.
    another torch version) is rejected and named; the others are averaged. Every reply
    of its link rejected, it is named with the reason in the round line and the run's
    summary (metrics.json `refused_nodes`, the last lines of the log)."""
    import logging

    def poison(grid):
        grid.apps[103] = faulty("a-digest", grid.apps[103])

    with caplog.at_level(logging.INFO, logger="flwr"):
        run(overrides, tmp_path, prepare=poison)
    doc = metrics(tmp_path)
    entry = doc["rounds"][1]
    assert entry["accepted"] == 2 and [r["node"] for r in entry["rejected"]] == [103]
    reason = entry["rejected"][0]["reason"]
    assert reason.startswith("A digest ffffffffffff differs from the server's"), reason
    assert entry["refused"] == [{"node": 103, "replies": 1, "reason": reason}]
    assert doc["refused_nodes"] == [{"link": 0, "node": 103, "replies": 1, "reason": reason}]
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        f"every reply of the link rejected: node 103 (1 reply: {reason})" in x for x in lines
    )
    assert f"node 103: every reply of link 0 rejected (1): {reason}" in lines


@pytest.mark.integration
def test_client_error_reply_is_rejected_and_named(overrides, tmp_path):
    """An error reply (a crashed ClientApp, or Flower's reply for a node gone offline)."""

    def crash(msg, context):
        raise RuntimeError("client fell over")

    run(overrides, tmp_path, prepare=lambda g: g.apps.update({103: crash}))
    entry = metrics(tmp_path)["rounds"][1]
    assert entry["accepted"] == 2 and entry["lost"] == []
    assert [r["node"] for r in entry["rejected"]] == [103]
    assert "client fell over" in entry["rejected"][0]["reason"]


@pytest.mark.integration  # federated rounds in process
def test_too_few_replies_skips_the_round(overrides, tmp_path):
    """Round 2 has one valid reply of the two needed: skipped, global B unchanged. (A run
    whose first round is skipped fails instead: tests/test_outcome.py.)"""

    def from_round_2(kind):
        honest = build_client_app(overrides)
        bad = faulty(kind, honest)

        def client(msg, context):
            late = int(msg.content[p.CONFIG][p.GLOBAL_ROUND]) >= 2
            return (bad if late else honest)(msg, context)

        return client

    def poison(grid):
        grid.apps[102] = from_round_2("nan")
        grid.apps[103] = from_round_2("nan")

    extra = {"min-replies": 2, "rounds-per-link": 2}
    server, _ = run(overrides, tmp_path, prepare=poison, **extra)
    doc = metrics(tmp_path)
    assert [r["accepted"] for r in doc["rounds"][1:]] == [3, 1]
    assert not doc["rounds"][1]["skipped"] and doc["rounds"][2]["skipped"]
    assert doc["rounds"][2]["central"] == doc["rounds"][1]["central"]  # B unchanged
    b = torch.cat([f.flatten() for f in server.state.links[0].factors.values()])
    assert b.abs().sum() > 0  # round 1's average was merged, round 2 changed nothing


@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam", "fedavgm"])
def test_resume_after_crash_gives_the_same_chain(overrides, tmp_path, strategy):
    from seedlora import links_digest

    extra = {
        "strategy": strategy,
        "num-links": 2,
        "rounds-per-link": 2,
        "server-momentum": 0.5,
        "run-name": "r",
    }
    full, _ = run(overrides, tmp_path / "full", **extra)

    def crash(grid):
        grid.fail_after = 3  # dies in round 4, mid-way through link 1

    with pytest.raises(KeyboardInterrupt):
        run(overrides, tmp_path / "cut", prepare=crash, **extra)
    resumed, grid = run(overrides, tmp_path / "cut", **extra, resume=True)
    assert grid.rounds_sent == 1  # only the lost round was redone
    assert links_digest(resumed.state.links) == links_digest(full.state.links)
    assert [r["round"] for r in metrics(tmp_path / "cut")["rounds"]] == [0, 1, 2, 3, 4]


@pytest.mark.integration
@pytest.mark.parametrize("method", ["ffa", "fedit", "full"])
def test_baseline_methods_run_through_the_same_pipeline(overrides, tmp_path, method):
    extra = {"method": method, "num-links": 2, "rounds-per-link": 1, "export": True}
    server, grid = run(overrides, tmp_path, **extra)
    doc = metrics(tmp_path)
    assert [r["round"] for r in doc["rounds"]] == [0, 1, 2]
    assert all(r["accepted"] == 3 for r in doc["rounds"][1:])
    keys = set(server.state.arrays)
    up = doc["rounds"][1]["bytes_up_per_client"]
    if method == "ffa":  # one fixed gaussian A: one link, merged at the end
        assert len(server.state.links) == 1 and all(k.endswith("lora_B") for k in keys)
        assert server.state.links[0].specs[0].kind == "gaussian"
    elif method == "fedit":  # A and B both travel
        assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
        assert not server.state.links
    else:  # every parameter travels
        n = sum(v.numel() for v in server.state.arrays.values())
        assert n == sum(p.numel() for p in server.model.parameters()) and up > 4 * n
    assert (tmp_path / "merged-model" / "config.json").exists()


@pytest.mark.integration
@pytest.mark.parametrize("action", ["flag", "drop", "clip"])
def test_outlier_norms_are_flagged_and_handled(overrides, tmp_path, action):
    def attack(grid):
        grid.apps[103] = scaled_update(build_client_app(overrides), 50.0)
        honest = build_client_app(overrides)
        grid.apps = {**grid.apps, 101: honest, 102: honest, 104: honest}
        grid.contexts[104] = grid.contexts[101].__class__(
            run_id=RUN_ID,
            node_id=104,
            node_config={"partition-id": 0, "num-partitions": 3},
            state=RecordDict(),
            run_config={},
        )

    extra = {"outlier-mad": 3.0, "outlier-action": action}
    server, _ = run(overrides, tmp_path, prepare=attack, **extra)
    entry = metrics(tmp_path)["rounds"][1]
    assert [o["node"] for o in entry["outliers"]] == [103]
    assert entry["outliers"][0]["norm"] > entry["outliers"][0]["bound"]
    assert entry["accepted"] == (3 if action == "drop" else 4)


@pytest.mark.integration
def test_corrupt_export_is_a_clear_error_and_resume_rewrites_it(overrides, tmp_path):
    """A damaged adapter file fails loudly; the checkpoint re-exports it with no training."""
    from peft import PeftModel
    from safetensors import SafetensorError

    extra = {"num-links": 2, "export": True, "run-name": "x"}
    server, _ = run(overrides, tmp_path, **extra)
    adapter = tmp_path / "peft-adapter" / "adapter_model.safetensors"
    good = adapter.read_bytes()
    adapter.write_bytes(good[: len(good) // 2])
    with pytest.raises(SafetensorError, match="deserializing header"):
        PeftModel.from_pretrained(server.task.load_model(), adapter.parent)
    _, grid = run(overrides, tmp_path, **extra, resume=True)
    assert grid.rounds_sent == 0 and adapter.read_bytes() == good
    PeftModel.from_pretrained(server.task.load_model(), adapter.parent)
