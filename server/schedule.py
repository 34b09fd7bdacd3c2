"""The clients' learning rate of each global round: the server computes it and sends it in
the round's train config (`contract.protocol.LR`); clients train the round at that lr.

With `T` global rounds (num-links x rounds-per-link), `W` warmup rounds, peak `lr` and
floor `lr_min`, round g (1..T) trains at

    g <= W (warmup):  lr * g / (W + 1)                 rises linearly, never 0
    g >  W:           t = (g - W - 1) / (T - W - 1)      0 at round W+1, 1 at round T
                      constant  lr
                      linear    lr_min + (lr - lr_min) * (1 - t)
                      cosine    lr_min + (lr - lr_min) * (1 + cos(pi t)) / 2

so round W+1 trains at `lr` and round T at `lr_min` (with one round after warmup, at
`lr`). FlowerTune decays 5e-5 -> 1e-6 by a cosine over its 200 rounds in the same
spirit (its round 1 already sits a little below the peak; here round W+1 is the peak).

The schedule runs over the run's global rounds, not over links: a chain link merges B and
restarts it from zero, but the model keeps training, so the lr should keep decaying
rather than restart per link.

Warmup is counted in rounds, not optimizer steps, because the lr is one number per round
that the server decides: a client needs no knowledge of the run's other rounds or of how
many steps the others take (with `local-epochs` that differs by partition), the wire
carries one value, and metrics.json records exactly the lr each round used. A client's
steps within a round share that lr, as FlowerTune's do.

The default (constant, no warmup) returns `lr` itself, not a product, so existing runs
train bit-identically.
"""

from __future__ import annotations

import math

from contract.config import TrainConfig


def round_lr(train: TrainConfig, global_round: int, total_rounds: int) -> float:
    """The lr of global round `global_round` (1..`total_rounds`) under `train`'s schedule."""
    if not 1 <= global_round <= total_rounds:
        raise ValueError(f"round {global_round} is outside the run's 1..{total_rounds}")
    lr, warmup = train.lr, train.warmup_rounds
    if global_round <= warmup:
        return lr * global_round / (warmup + 1)
    if train.lr_schedule == "constant" or total_rounds - warmup <= 1:
        return lr
    t = (global_round - warmup - 1) / (total_rounds - warmup - 1)
    if train.lr_schedule == "linear":
        return train.lr_min + (lr - train.lr_min) * (1.0 - t)
    return train.lr_min + (lr - train.lr_min) * 0.5 * (1.0 + math.cos(math.pi * t))
