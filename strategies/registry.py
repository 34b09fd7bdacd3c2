"""Flower's message-API strategies, chosen by name; their math is Flower's, untouched.

Exact in weight space (linear in the client B's, so sum_i w_i B_i A = (sum_i w_i B_i) A):
  fedavg, fedprox (proximal term on B), fedavgm, fedadam, fedyogi, fedadagrad
  (the server optimizers act on the averaged pseudo-gradient, a linear function of B).
B-space only (robust rules; legitimate, but not the same rule applied to full weight
updates W_i = s B_i A, s = `spec.scaling(alpha)`): fedmedian, fedtrimmedavg, krum, multikrum.
`trims_nothing` and `kept_replies` say when a robust rule degenerates in a round (no
trimming; a single client kept), which the link wrapper logs.

A fresh strategy is built for every chain link, so B-space state (FedAdam/FedYogi/
FedAdagrad moments, FedAvgM momentum) resets when the A coordinates change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from contract.config import StrategyConfig

EXACT_IN_WEIGHT_SPACE = frozenset(
    {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}
)


def _common(s: StrategyConfig) -> dict[str, Any]:
    return {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_replies,
        "min_evaluate_nodes": 1 if s.fraction_evaluate > 0 else 0,
        "min_available_nodes": s.min_available_nodes,
    }


def _fedopt(s: StrategyConfig) -> dict[str, Any]:
    # Flower's eta_l ("client-side learning rate") is only logged by FedOpt: clients train
    # with the train section's lr, so there is no run-config key for it.
    return {"eta": s.eta, "tau": s.tau}


def _adam(s: StrategyConfig) -> dict[str, Any]:
    return {**_common(s), **_fedopt(s), "beta_1": s.beta_1, "beta_2": s.beta_2}


BUILDERS: dict[str, Callable[[StrategyConfig], Strategy]] = {
    "fedavg": lambda s: FedAvg(**_common(s)),
    "fedprox": lambda s: FedProx(**_common(s), proximal_mu=s.proximal_mu),
    "fedavgm": lambda s: FedAvgM(
        **_common(s), server_learning_rate=s.server_lr, server_momentum=s.server_momentum
    ),
    "fedadam": lambda s: FedAdam(**_adam(s)),
    "fedyogi": lambda s: FedYogi(**_adam(s)),
    "fedadagrad": lambda s: FedAdagrad(**_common(s), **_fedopt(s)),
    "fedmedian": lambda s: FedMedian(**_common(s)),
    "fedtrimmedavg": lambda s: FedTrimmedAvg(**_common(s), beta=s.trim_beta),
    "krum": lambda s: Krum(**_common(s), num_malicious_nodes=s.num_malicious),
    "multikrum": lambda s: MultiKrum(
        **_common(s), num_malicious_nodes=s.num_malicious, num_nodes_to_select=s.krum_select
    ),
}


def build_strategy(section: StrategyConfig) -> Strategy:
    """A new Flower strategy for one chain link, configured from the strategy section."""
    return BUILDERS[section.name](section)


def trims_nothing(section: StrategyConfig, replies: int) -> str | None:
    """Why fedtrimmedavg would trim nothing from `replies` replies (None: it trims, or
    the rule is another). Flower cuts int(trim-beta * n) at each end."""
    if section.name != "fedtrimmedavg" or section.trim_beta * replies >= 1:
        return None
    if section.trim_beta > 0:
        need = f"needs >= {math.ceil(1 / section.trim_beta)} replies or a larger trim-beta"
    else:
        need = "trim-beta is 0"
    return (
        f"fedtrimmedavg trims nothing: trim-beta {section.trim_beta} x {replies} replies < 1 "
        f"({need}), so the round is a plain mean"
    )


def kept_replies(section: StrategyConfig, replies: int) -> int | None:
    """How many of `replies` replies krum/multikrum average (None for the other rules)."""
    if section.name == "krum":
        return min(1, replies)
    if section.name == "multikrum":
        return min(section.krum_select, replies)
    return None
