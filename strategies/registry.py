"""Flower's message-API strategies, chosen by name; their math is Flower's, untouched.

Exact in weight space (linear in the client B's, so sum_i w_i B_i A = (sum_i w_i B_i) A):
  fedavg, fedprox (proximal term on B), fedavgm, fedadam, fedyogi, fedadagrad
  (the server optimizers act on the averaged pseudo-gradient, a linear function of B).
B-space only (robust rules; legitimate, but not the same rule applied to full weight
updates W_i = (alpha/r) B_i A): fedmedian, fedtrimmedavg, krum, multikrum.

A fresh strategy is built for every chain link, so B-space state (FedAdam/FedYogi/
FedAdagrad moments, FedAvgM momentum) resets when the A coordinates change.
"""

from __future__ import annotations

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

from contract.config import RunConfig

EXACT_IN_WEIGHT_SPACE = frozenset(
    {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"}
)

# Attributes in which Flower strategies keep state between rounds (checkpointed).
STATE_ATTRIBUTES = ("current_arrays", "m_t", "v_t", "momentum_vector")


def _common(cfg: RunConfig) -> dict[str, Any]:
    return {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": cfg.fraction_evaluate,
        "min_train_nodes": cfg.min_replies,
        "min_evaluate_nodes": 1 if cfg.fraction_evaluate > 0 else 0,
        "min_available_nodes": cfg.min_available_nodes,
    }


def _fedopt(cfg: RunConfig) -> dict[str, Any]:
    return {"eta": cfg.eta, "eta_l": cfg.eta_l, "tau": cfg.tau}


BUILDERS: dict[str, Callable[[RunConfig], Strategy]] = {
    "fedavg": lambda c: FedAvg(**_common(c)),
    "fedprox": lambda c: FedProx(**_common(c), proximal_mu=c.proximal_mu),
    "fedavgm": lambda c: FedAvgM(
        **_common(c), server_learning_rate=c.server_lr, server_momentum=c.server_momentum
    ),
    "fedadam": lambda c: FedAdam(**_common(c), **_fedopt(c), beta_1=c.beta_1, beta_2=c.beta_2),
    "fedyogi": lambda c: FedYogi(**_common(c), **_fedopt(c), beta_1=c.beta_1, beta_2=c.beta_2),
    "fedadagrad": lambda c: FedAdagrad(**_common(c), **_fedopt(c)),
    "fedmedian": lambda c: FedMedian(**_common(c)),
    "fedtrimmedavg": lambda c: FedTrimmedAvg(**_common(c), beta=c.trim_beta),
    "krum": lambda c: Krum(**_common(c), num_malicious_nodes=c.num_malicious),
    "multikrum": lambda c: MultiKrum(
        **_common(c), num_malicious_nodes=c.num_malicious, num_nodes_to_select=c.krum_select
    ),
}


def build_strategy(cfg: RunConfig) -> Strategy:
    """A new Flower strategy for one chain link, configured from the run config."""
    return BUILDERS[cfg.strategy](cfg)
