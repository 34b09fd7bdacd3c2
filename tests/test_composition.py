"""The composition roots (server/compose.py, client/compose.py): every entry point builds
the same objects, and each of the server's four objects does its job on its own."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from flwr.app import Context, RecordDict

from client.compose import build_client_app, build_trainer, worker_app
from client.relay import KEPT, Recipe, Relay
from client.trainer import Trainer
from contract.config import RunConfig, RunConfigError
from seedlora import trainable_state
from seedlora.names import Method
from server import compose, rundir
from server.app import build_server_app
from server.chain_server import ChainServer, run_chain
from server.evaluator import Evaluator
from server.exporter import EXPORTS, Exporter
from server.state import ChainState, RoundResult
from server.store import RESUMABLE_CHANGES, RunStore
from simulation.local import RUN_ID, LocalGrid, make_grid, run_local
from tasks import build_task
from tests import test_app_local as app_tests

overrides = app_tests.overrides  # the in-process app fixture (tiny GPT-2, tiny dataset)


class Stop(Exception):
    """Raised where the chain loop would start: the root got that far."""


@pytest.fixture
def built(monkeypatch):
    """Every ChainServer the server's root builds and the runner it hands `run_chain`."""
    seen: list = []

    def stop(server, runner):
        seen.append((server, runner))
        raise Stop

    monkeypatch.setattr(compose, "run_chain", stop)
    return seen


def test_the_serverapp_and_the_harness_run_the_same_root(overrides, tmp_path, built):
    ov = {**overrides, "output-dir": str(tmp_path), "run-name": "app"}
    grid = make_grid(ov, 2)
    with pytest.raises(Stop):
        build_server_app(ov)(grid, Context(RUN_ID, 0, {}, RecordDict(), {}))
    with pytest.raises(Stop):
        run_local({**ov, "run-name": "local"}, 2)
    (app, app_runner), (local, local_runner) = built
    assert type(app) is type(local) is ChainServer
    assert type(app_runner) is type(local_runner)
    assert app.store.out_dir == tmp_path / "app" and local.store.out_dir == tmp_path / "local"
    assert app.state.config == {**local.state.config, "run-name": "app"}


def test_the_harness_makes_the_serverapps_checks(overrides, tmp_path):
    """Checks the in-process harness once skipped: the preflight and the run folder's lock."""
    with pytest.raises(RunConfigError, match="model"):
        run_local({**overrides, "model-name": str(tmp_path / "missing")}, 2)
    ov = {**overrides, "output-dir": str(tmp_path), "run-name": "held"}
    with rundir.claim(RunConfig.from_flower(ov)), pytest.raises(RunConfigError, match="in use"):
        run_local(ov, 2)


def test_a_fresh_cache_is_node_config_and_leaves_the_environment_alone(overrides, built):
    before = dict(os.environ)
    grid = make_grid(overrides, 2)
    with pytest.raises(Stop):
        run_local(overrides, 2, grid=grid, fresh_cache=True)
    caches = {c.node_config["cache-dir"] for c in grid.contexts.values()}
    assert len(caches) == 1 and "seedlora-cache-" in caches.pop()
    assert dict(os.environ) == before


# --- the four server objects, each alone ---------------------------------------------------


def _master(overrides, **extra):
    cfg = RunConfig.from_flower({**overrides, **extra})
    task = build_task(cfg.task_config())
    return cfg, task, compose.build_master(cfg, task)


def _state(cfg: RunConfig, model: torch.nn.Module) -> ChainState:
    return ChainState(cfg.to_flower(), links=[], arrays=trainable_state(model))


def test_the_evaluator_evaluates_a_state_on_its_central_set(overrides):
    cfg, task, model = _master(overrides, **{"server-device": "cpu"})
    evaluator = Evaluator(task, model, cfg)
    state = _state(cfg, model)
    metrics = evaluator.evaluate(state)
    assert metrics["loss"] > 0 and evaluator.device == torch.device("cpu")
    assert evaluator.evaluate(state) == metrics  # the same state, the same numbers
    cfg_off, _, _ = _master(overrides, **{"central-eval": False})
    assert Evaluator(task, model, cfg_off).evaluate(state) == {}


def test_the_store_writes_a_run_and_resumes_only_its_own(overrides, tmp_path):
    cfg = RunConfig.from_flower(overrides)
    state = ChainState(cfg.to_flower(), links=[], arrays={"l.lora_B": torch.zeros(4, 2)})
    store = RunStore(tmp_path, cfg, RUN_ID)
    store.open(state, fresh=True)
    state.history.append({"round": 0, "link": 0, "central": {}})
    store.base_round(state)
    state.global_round = state.round_in_link = 1
    state.history.append({"round": 1, "link": 0, "central": {"loss": 1.0}})
    store.commit(state)
    store.write_metrics(state)
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "rounds.jsonl").exists()
    back = RunStore(tmp_path, cfg, RUN_ID).resume({**state.config, "round-timeout": 5.0})
    assert back.global_round == 1 and [h["round"] for h in back.history] == [0, 1]
    assert "round-timeout" in RESUMABLE_CHANGES
    with pytest.raises(RunConfigError, match="differs from the checkpoint in \\['rank'\\]"):
        RunStore(tmp_path, cfg, RUN_ID).resume({**state.config, "rank": 8})


def test_the_exporter_has_one_function_per_method_and_writes_alone(overrides, tmp_path):
    assert set(EXPORTS) == set(Method.__args__)
    cfg, task, model = _master(overrides, method="full")
    Exporter(task, cfg, tmp_path).export(model, _state(cfg, model))
    assert (tmp_path / "merged-model" / "config.json").exists()
    assert not (tmp_path / "peft-adapter").exists()


class _Runner:
    """Rounds that return the global arrays plus one, without any client."""

    def open_link(self, server):
        return self

    def run_round(self, link_round, arrays):
        return RoundResult({k: v + 1 for k, v in arrays.items()})


class _Store:
    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append(name)


class _Evaluator:
    def evaluate(self, state):
        return {"loss": float(state.global_round)}

    def samples(self, state):
        return []


def test_the_loop_runs_a_chain_with_stand_ins_for_the_rest(overrides):
    cfg, task, model = _master(overrides, **{"num-links": 2, "rounds-per-link": 2})
    store = _Store()
    server = ChainServer(cfg, RUN_ID, task, model, _Evaluator(), store, exporter=None)
    run_chain(server, _Runner())
    s = server.state
    assert (s.global_round, s.chain_index, len(s.links)) == (4, 2, 2)
    assert [h["central"]["loss"] for h in s.history] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert store.calls.count("commit") == 4 and store.calls.count("checkpoint") == 2
    assert store.calls[0] == "open" and "close" in store.calls


# --- the client side ------------------------------------------------------------------------


def test_a_pickled_relay_comes_back_as_the_process_kept_one():
    """Ray hands an actor a fresh copy of the ClientApp per message: the copies of one
    recipe are one relay (one trainer, one resident model); another recipe replaces it."""
    recipe = Recipe({"rank": 4}, "/tmp/cache-a")
    first = pickle.loads(pickle.dumps(Relay(recipe)))
    again = pickle.loads(pickle.dumps(Relay(recipe)))
    assert first is again is KEPT.relay
    other = pickle.loads(pickle.dumps(Relay(Recipe({"rank": 8}, "/tmp/cache-a"))))
    assert other is not first and KEPT.relay is other


def test_the_worker_and_the_harness_serve_the_same_trainer(overrides, tmp_path):
    served = worker_app(cache_dir=tmp_path)[1].__self__  # the worker's trainer
    trainer = build_trainer(overrides, tmp_path)
    assert type(served) is type(trainer) is Trainer
    assert served.cache_dir == trainer.cache_dir == tmp_path and served.resident.builds == 0
    grid = LocalGrid(trainer.app(), 2)
    grid.use_cache(tmp_path / "nodes")
    result = run_local(overrides, 2, grid=grid)
    assert result.metrics["rounds"][-1]["accepted"] == 2
    assert trainer.resident.builds == 1  # one link, both nodes on one resident model
    assert (tmp_path / "nodes").is_dir()
    assert build_client_app(overrides, tmp_path) is not None
