"""Central evaluation (server/evaluator.py): on `server-device` in the run's precision,
through a device replica rebuilt once per link, on a fixed seeded subset if asked.

Why: evaluating a 0.36B model in float32 on the CPU took ~40 s of every GPU round. The
replica is the float32 master cast as the clients cast their base, and the master stays
float32 on the CPU for merges and exports.
"""

from __future__ import annotations

import pytest
import torch

from contract.config import RunConfig, RunConfigError
from seedlora import trainable_state
from server.chain_server import run_chain
from server.compose import build_server
from server.evaluator import central_set
from server.rounds import FlowerRounds
from simulation.local import RUN_ID, make_grid, run_local
from tasks import build_task
from tests import test_app_local as app_tests

overrides = app_tests.overrides  # the in-process app fixture (tiny GPT-2, tiny dataset)
CUDA = torch.cuda.is_available()


def test_server_device_is_validated(overrides, tmp_path):
    with pytest.raises(RunConfigError, match="server-device"):
        RunConfig.from_flower({"server-device": "gpu"})
    if CUDA:
        return
    cfg = RunConfig.from_flower({**overrides, "server-device": "cuda"})
    with pytest.raises(RunConfigError, match="server-device.*no CUDA device"):
        build_server(cfg, RUN_ID, tmp_path)


def test_central_eval_max_takes_a_fixed_subset(overrides, tmp_path):
    cfg = RunConfig.from_flower(overrides)
    server = build_server(cfg, RUN_ID, tmp_path)
    full = server.evaluator.eval_set
    small = RunConfig.from_flower({**overrides, "central-eval-max": 3})
    a, b = central_set(server.task, small), central_set(server.task, small)
    assert len(full) > 3 and len(a) == 3
    assert torch.equal(a[:]["input_ids"], b[:]["input_ids"])
    rows = {tuple(r.tolist()) for r in full[:]["input_ids"]}
    assert all(tuple(r.tolist()) in rows for r in a[:]["input_ids"])
    big = RunConfig.from_flower({**overrides, "central-eval-max": 10_000})
    assert len(central_set(server.task, big)) == len(full)


def test_central_eval_max_keeps_classes():
    cfg = RunConfig.from_flower({"task": "code-cls", "central-eval-max": 8})  # 8 classes
    task = build_task(cfg.task_config(8))  # the split test_tasks' code-cls test uses
    every = [int(v) for v in task.eval_dataset(None)[:]["labels"]]
    labels = [int(v) for v in central_set(task, cfg)[:]["labels"]]
    assert len(every) > 8, len(every)
    assert len(labels) == 8 and set(labels) == set(every), (labels, sorted(set(every)))


@pytest.mark.integration  # federated rounds in process
def test_central_eval_in_half_precision_uses_a_replica_per_link(overrides, tmp_path):
    ov = {**overrides, "num-links": 2, "rounds-per-link": 2}
    ref = run_local(ov, 2, fresh_cache=True).metrics
    ov = {**ov, "precision": "bf16", "server-device": "cpu"}
    cfg = RunConfig.from_flower(ov)
    server = build_server(cfg, RUN_ID, tmp_path)
    run_chain(server, FlowerRounds(make_grid(ov, 2)))
    assert server.evaluator.replica_builds == 2  # links 0 and 1 (round 0 shares link 0's)
    assert server.model.transformer.h[0].attn.c_attn.base.weight.dtype == torch.float32
    replica = server.evaluator._replica
    frozen = {q.dtype for q in replica.parameters() if not q.requires_grad}
    assert frozen == {torch.bfloat16}
    master_b = trainable_state(server.model)
    for k, v in trainable_state(replica).items():
        assert v.dtype == torch.float32 and k in master_b
    for ours, theirs in zip(server.state.history, ref["rounds"], strict=True):
        a, b = ours.central["loss"], theirs["central"]["loss"]
        assert abs(a - b) < 0.02 * b, (a, b)


def test_cpu_fp32_evaluates_the_master_itself(overrides, tmp_path):
    ov = {**overrides, "server-device": "cpu"}
    server = build_server(RunConfig.from_flower(ov), RUN_ID, tmp_path)
    evaluator = server.evaluator
    assert evaluator.model(server.state) is server.model and evaluator.replica_builds == 0


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_evaluates_on_the_gpu_in_the_run_precision(overrides, tmp_path):
    ov = {**overrides, "precision": "bf16", "server-device": "auto"}
    server = build_server(RunConfig.from_flower(ov), RUN_ID, tmp_path / "gpu")
    evaluator = server.evaluator
    assert evaluator.device == torch.device("cuda:0")
    metrics = evaluator.evaluate(server.state)
    replica = evaluator.model(server.state)
    assert replica is not server.model and evaluator.replica_builds == 1
    assert {q.device.type for q in replica.parameters()} == {"cuda"}
    assert {q.dtype for q in replica.parameters() if not q.requires_grad} == {torch.bfloat16}
    assert {q.device.type for q in server.model.parameters()} == {"cpu"}  # the master stays
    cpu = build_server(
        RunConfig.from_flower({**overrides, "server-device": "cpu"}), RUN_ID, tmp_path / "cpu"
    )
    reference = cpu.evaluator.evaluate(cpu.state)
    assert abs(metrics["loss"] - reference["loss"]) < 0.02 * reference["loss"]


def _rows(data) -> list[tuple[int, ...]]:
    return [tuple(r.tolist()) for r in data[:]["input_ids"]]


def test_central_eval_split_halves_are_disjoint_and_cover_the_held_out_set(overrides, tmp_path):
    full = build_server(RunConfig.from_flower(overrides), RUN_ID, tmp_path).evaluator.eval_set
    task = build_task(RunConfig.from_flower(overrides).task_config())
    halves = {
        which: central_set(task, RunConfig.from_flower({**overrides, "central-eval-split": which}))
        for which in ("validation", "test")
    }
    val, test = _rows(halves["validation"]), _rows(halves["test"])
    assert len(val) + len(test) == len(full) and 0 <= len(val) - len(test) <= 1
    assert sorted(val + test) == sorted(_rows(full))
    again = RunConfig.from_flower({**overrides, "central-eval-split": "validation", "seed": 7})
    assert _rows(central_set(task, again)) == val  # fixed: not the experiment seed's
    with pytest.raises(RunConfigError, match="central-eval-split"):
        RunConfig.from_flower({"central-eval-split": "train"})


def test_central_eval_split_keeps_classes_in_both_halves():
    base = {"task": "code-cls", "num-classes": 4}
    task = build_task(RunConfig.from_flower(base).task_config())
    every = [int(v) for v in task.eval_dataset(None)[:]["labels"]]
    for which in ("validation", "test"):
        cfg = RunConfig.from_flower({**base, "central-eval-split": which})
        labels = [int(v) for v in central_set(task, cfg)[:]["labels"]]
        assert set(labels) == set(every) and abs(len(labels) - len(every) / 2) <= 2
