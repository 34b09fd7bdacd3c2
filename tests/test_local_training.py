"""client.local's optimizer loop: gradient accumulation, the lr it trains at, and the
graphed step kept across rounds (stepped eagerly here: no CUDA graph on the CPU)."""

import pytest
import torch

from client import local
from contract.config import RunConfig
from seedlora import capture, load_trainable_state, prepare, trainable_state
from testing.tiny import LLAMA_TARGETS, tiny_llama

SEQ = 16


class CausalLM:
    """The task interface `client.local.train` uses: a loss that is a mean over tokens,
    so over equal-length sequences the mean of two half batches is the full batch's."""

    @staticmethod
    def loss(model, batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def examples(n: int = 16) -> list[dict]:
    ids = torch.randint(0, 97, (n, SEQ), generator=torch.Generator().manual_seed(7))
    return [{"input_ids": row} for row in ids]


def adapted_llama():
    """A tiny Llama (no dropout) with gaussian-A adapters: B starts at zero."""
    return prepare(
        tiny_llama(), "seedlora", LLAMA_TARGETS, kind="gaussian", seed=0, rank=4, alpha=8
    )


def train_b(batch: int, accum: int, **keys) -> tuple[dict, local.TrainResult]:
    model = adapted_llama()
    cfg = RunConfig.from_flower({"batch-size": batch, "grad-accum-steps": accum, **keys})
    result = local.train(model, CausalLM(), examples(), cfg, torch.device("cpu"), data_seed=3)
    return local.cpu_state(model), result


@pytest.mark.parametrize(
    "keys",
    [
        {"local-steps": 3, "optimizer": "adamw"},
        {"local-steps": 2, "optimizer": "sgd", "lr": 0.5, "max-grad-norm": 0.0},
        {"local-steps": 0, "local-epochs": 1.0},  # an epoch: the same steps either way
    ],
)
def test_accumulating_two_half_batches_equals_one_full_batch(keys):
    """accum 2 at batch 4 sees the same 8 examples per step as accum 1 at batch 8 (the
    seeded permutation does not depend on the batch size), so B matches to rounding."""
    full, big = train_b(8, 1, **keys)
    halves, small = train_b(4, 2, **keys)
    assert big.steps == small.steps == (keys["local-steps"] or 2)
    assert small.loss == pytest.approx(big.loss, rel=1e-5)
    moved = max(float(v.abs().max()) for k, v in full.items() if "lora_B" in k)
    assert moved > 1e-3  # B trained: the comparison below is not of two zero matrices
    for name, value in full.items():
        torch.testing.assert_close(halves[name], value, rtol=1e-4, atol=1e-6)


def test_accumulation_differs_from_stepping_on_every_micro_batch():
    """The control: two steps at batch 4 are not one accumulated step (else the test above
    would pass with accumulation ignored)."""
    accumulated, _ = train_b(4, 2, **{"local-steps": 1})
    stepped, result = train_b(4, 1, **{"local-steps": 2})
    assert result.steps == 2
    gap = max(float((accumulated[k] - stepped[k]).abs().max()) for k in stepped)
    assert gap > 1e-4


def test_train_uses_the_lr_it_is_given_not_the_run_configs():
    """SGD without clipping, one step from B = 0: the update is -lr * grad, so it scales
    with the lr passed in, whatever the run config's `lr`."""
    cfg = RunConfig.from_flower({"optimizer": "sgd", "lr": 0.1, "max-grad-norm": 0.0})
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"local_steps": 1})})
    states = []
    for lr in (None, 0.3):
        model = adapted_llama()
        local.train(model, CausalLM(), examples(), cfg, torch.device("cpu"), data_seed=3, lr=lr)
        states.append(local.cpu_state(model))
    for name in states[0]:
        torch.testing.assert_close(states[1][name], 3.0 * states[0][name], rtol=1e-4, atol=1e-7)


def test_grouped_step_mode_trains_the_eager_b():
    """step-mode grouped (q/k/v and gate/up as one node each) gives eager's B and loss."""
    eager, eager_result = train_b(8, 1, **{"local-steps": 3, "step-mode": "eager"})
    grouped, grouped_result = train_b(8, 1, **{"local-steps": 3, "step-mode": "grouped"})
    assert grouped_result.loss == pytest.approx(eager_result.loss, rel=1e-6)
    assert max(float(v.abs().max()) for k, v in eager.items() if "lora_B" in k) > 1e-3
    for name, value in eager.items():
        torch.testing.assert_close(grouped[name], value, rtol=1e-4, atol=1e-6)


def test_graphed_step_mode_needs_a_gpu_named():
    with pytest.raises(ValueError, match="step-mode"):
        RunConfig.from_flower({"step-mode": "graphed", "device": "cpu"})


def test_graphed_where_no_graph_can_run_trains_grouped_and_says_why(caplog):
    """device auto on a CPU machine: the same B as step-mode grouped, and one warning
    naming the reason, however many rounds run."""
    grouped, _ = train_b(4, 1, **{"local-steps": 2, "step-mode": "grouped"})
    local._say_grouped.cache_clear()
    with caplog.at_level("WARNING", logger="seedlora.train"):
        graphed, _ = train_b(4, 1, **{"local-steps": 2, "step-mode": "graphed"})
        train_b(4, 1, **{"local-steps": 2, "step-mode": "graphed"})
    assert [r.getMessage() for r in caplog.records] == [
        "step-mode graphed runs grouped steps here: the device is cpu, not cuda"
    ]
    for name, value in grouped.items():
        assert torch.equal(graphed[name], value)


@pytest.mark.parametrize(
    "keys, mu, why",
    [
        ({}, 0.0, None),
        ({"grad-accum-steps": 2}, 0.0, "grad-accum-steps is 2"),
        ({}, 0.01, "FedProx proximal term (mu=0.01)"),
        ({"precision": "fp16"}, 0.0, "precision fp16"),
        ({"optimizer": "sgd"}, 0.0, "optimizer sgd"),
    ],
)
def test_each_rule_that_keeps_a_cuda_step_from_a_graph_is_named(keys, mu, why):
    cfg = RunConfig.from_flower({"step-mode": "graphed", "device": "cuda", **keys})
    got = local._not_graphed(cfg, torch.device("cuda"), mu)
    assert got is None if why is None else why in got


class EagerStep:
    """`CapturedStep`'s interface stepping eagerly, so client.local's kept-step rounds run
    on the CPU (a CUDA graph replays the same step)."""

    def __init__(self, loss_fn, params, optimizer, example, warmup=3, before_step=None):
        self.loss_fn, self.optimizer, self.before_step = loss_fn, optimizer, before_step
        self.shapes = {k: v.shape for k, v in example.items()}

    def fits(self, batch):
        return {k: v.shape for k, v in batch.items()} == self.shapes

    def __call__(self, batch):
        return capture._eager_step(self.loss_fn, batch, self.optimizer, self.before_step)


def test_graphed_rounds_keep_one_step_and_train_as_a_fresh_one(monkeypatch):
    """Round 2 on the same model reuses round 1's kept step (no capture) with its AdamW reset
    in place and the new lr in its tensor: the same loss and B as a fresh model's round."""
    monkeypatch.setattr(local, "_graphable", lambda cfg, device, mu: True)
    monkeypatch.setattr(capture, "CapturedStep", EagerStep)
    cfg = RunConfig.from_flower({"local-steps": 3, "batch-size": 4, "weight-decay": 0.1})
    cpu = torch.device("cpu")
    model = adapted_llama()
    local.train(model, CausalLM(), examples(), cfg, cpu, data_seed=1, lr=1e-2)
    kept = capture.kept_for(model)
    assert kept is not None and kept.captures == 1
    torch.manual_seed(1)
    received = {k: 0.01 * torch.randn_like(v) for k, v in trainable_state(model).items()}
    load_trainable_state(model, received)
    got = local.train(model, CausalLM(), examples(), cfg, cpu, data_seed=2, lr=3e-3)
    assert capture.kept_for(model) is kept and kept.captures == 1
    assert float(kept.optimizer.param_groups[0]["lr"]) == pytest.approx(3e-3)

    fresh = adapted_llama()
    load_trainable_state(fresh, received)
    want = local.train(fresh, CausalLM(), examples(), cfg, cpu, data_seed=2, lr=3e-3)
    assert got.loss == want.loss
    for name, value in local.cpu_state(fresh).items():
        assert not torch.equal(value, received[name])
        assert torch.equal(local.cpu_state(model)[name], value)
    capture.forget(model)  # EagerStep holds the model (a real capture does not)
    capture.forget(fresh)
