"""client-eval: each train message also evaluates the global model it brings (with-train,
one message a round), or an evaluate message follows the round's aggregate (separate).

Both evaluate the same models on the same held-out files; with-train reports, in round r,
the model of round r - 1, and the run's last round still evaluates the final model apart.
"""

from __future__ import annotations

import pytest

from simulation.local import run_local
from tests import test_app_local as app_tests

overrides = app_tests.overrides  # the in-process app fixture (tiny GPT-2, tiny dataset)


def _rounds(ov: dict, mode: str) -> list[dict]:
    return run_local({**ov, "client-eval": mode}, 2, fresh_cache=True).metrics["rounds"][1:]


@pytest.fixture
def both(overrides):
    ov = {**overrides, "num-links": 2, "rounds-per-link": 2, "fraction-evaluate": 1.0}
    return _rounds(ov, "with-train"), _rounds(ov, "separate")


@pytest.mark.integration  # federated rounds in process
def test_each_mode_says_which_model_its_metrics_describe(both):
    with_train, separate = both
    assert [r["client_eval_model"] for r in separate] == [1, 2, 3, 4]
    assert [r["client_eval_model"] for r in with_train] == [0, 1, 2, 4]  # last: final model


@pytest.mark.integration  # federated rounds in process
def test_with_train_evaluates_the_same_models_as_separate(both):
    with_train, separate = both
    by_model = {r["client_eval_model"]: r["client_eval"] for r in separate}
    compared = 0
    for entry in with_train:
        model = entry["client_eval_model"]
        if model in by_model:  # round r's train messages carry round r-1's model
            assert entry["client_eval"].keys() == by_model[model].keys()
            for key, value in entry["client_eval"].items():
                assert value == pytest.approx(by_model[model][key], rel=1e-6), (model, key)
            compared += 1
    assert compared == 3  # models of rounds 1, 2 and 4 (the final one)
    assert with_train[0]["client_eval"]["ppl"] > with_train[1]["client_eval"]["ppl"] * 0.5


@pytest.mark.integration  # federated rounds in process
def test_with_train_sends_one_message_a_round_but_the_last(overrides, monkeypatch):
    from simulation.local import LocalGrid

    kinds: list[str] = []
    push = LocalGrid.push_messages

    def counting(self, messages):
        messages = list(messages)
        kinds.extend(m.metadata.message_type for m in messages)
        return push(self, messages)

    monkeypatch.setattr(LocalGrid, "push_messages", counting)
    ov = {**overrides, "num-links": 1, "rounds-per-link": 3, "fraction-evaluate": 1.0}
    run_local({**ov, "client-eval": "with-train"}, 2, fresh_cache=True)
    assert kinds.count("train") == 6 and kinds.count("evaluate") == 2  # the last round only
    kinds.clear()
    run_local({**ov, "client-eval": "separate"}, 2, fresh_cache=True)
    assert kinds.count("train") == 6 and kinds.count("evaluate") == 6


def test_no_evaluation_when_fraction_evaluate_is_zero(overrides):
    rounds = _rounds({**overrides, "rounds-per-link": 2}, "with-train")
    assert all(not r["client_eval"] and r["client_eval_model"] is None for r in rounds)


@pytest.mark.integration  # federated rounds in process
def test_with_train_evaluates_a_fraction_evaluate_sample(overrides, monkeypatch):
    import client.trainer as trainer

    calls: list[int] = []
    evaluate = trainer._evaluate

    def counting(task, model, partition_id, device, cfg):
        calls.append(partition_id)
        return evaluate(task, model, partition_id, device, cfg)

    monkeypatch.setattr(trainer, "_evaluate", counting)
    ov = {**overrides, "rounds-per-link": 2, "fraction-evaluate": 0.5, "client-eval": "with-train"}
    rounds = run_local(ov, 4, fresh_cache=True).metrics["rounds"][1:]
    # round 1: 2 of 4 train nodes evaluate what they received; round 2 (the last): 2 train
    # nodes evaluate what they received, then 2 evaluate messages for the final model
    assert len(calls) == 6
    assert [r["client_eval_model"] for r in rounds] == [0, 2]
