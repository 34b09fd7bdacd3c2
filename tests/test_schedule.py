"""server/schedule.py: the clients' lr per global round, and its run-config checks."""

import math

import pytest

from contract.config import RunConfig, RunConfigError, TrainConfig
from server.schedule import round_lr


def lrs(total: int, **keys) -> list[float]:
    train = TrainConfig(**keys)
    return [round_lr(train, g, total) for g in range(1, total + 1)]


def test_constant_is_the_configured_lr_itself_every_round():
    """The default changes nothing: the very float of `lr`, bit for bit."""
    assert lrs(9, lr=2e-3) == [2e-3] * 9
    assert lrs(9) == [TrainConfig().lr] * 9


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_runs_from_lr_at_the_first_round_to_lr_min_at_the_last(schedule):
    values = lrs(200, lr=5e-5, lr_min=1e-6, lr_schedule=schedule)  # FlowerTune's numbers
    assert values[0] == 5e-5
    assert values[-1] == pytest.approx(1e-6, rel=1e-12)
    assert all(a > b for a, b in zip(values, values[1:], strict=False))  # strictly down


def test_cosine_and_linear_meet_halfway_and_differ_elsewhere():
    cosine = lrs(5, lr=1.0, lr_min=0.0, lr_schedule="cosine")
    linear = lrs(5, lr=1.0, lr_min=0.0, lr_schedule="linear")
    assert linear == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert cosine == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.1464466, 0.0])
    assert cosine[1] > linear[1] and cosine[3] < linear[3]


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_warmup_rises_linearly_to_lr_then_the_schedule_starts(schedule):
    values = lrs(10, lr=0.4, lr_min=0.1, warmup_rounds=3, lr_schedule=schedule)
    assert values[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # lr * g / (W + 1), then lr
    assert values[3] == 0.4
    assert values[-1] == pytest.approx(0.4 if schedule == "constant" else 0.1)
    assert all(b <= a for a, b in zip(values[3:], values[4:], strict=False))


def test_one_round_after_warmup_trains_at_lr():
    assert lrs(3, lr=0.3, lr_min=0.0, warmup_rounds=2, lr_schedule="cosine") == pytest.approx(
        [0.1, 0.2, 0.3]
    )


def test_rounds_outside_the_run_are_refused():
    with pytest.raises(ValueError, match="outside"):
        round_lr(TrainConfig(), 0, 5)
    with pytest.raises(ValueError, match="outside"):
        round_lr(TrainConfig(), 6, 5)


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"lr": 1e-3, "lr-min": 1e-2}, "lr-min"),
        ({"warmup-rounds": 9}, "warmup-rounds"),  # 3 links x 3 rounds: no round left
        ({"lr-schedule": "step"}, "lr-schedule"),
        ({"grad-accum-steps": 0}, "grad-accum-steps"),
        ({"comm-budget-mb": -1.0}, "comm-budget-mb"),
        ({"comm-budget-mb": 5.0, "secure-aggregation": True}, "comm-budget-mb"),
    ],
)
def test_bad_values_name_their_key(keys, named):
    with pytest.raises(RunConfigError, match=named):
        RunConfig.from_flower(keys)


def test_warmup_counts_every_global_round():
    assert RunConfig.from_flower({"warmup-rounds": 8}).train.warmup_rounds == 8
