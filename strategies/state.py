"""The state a Flower strategy keeps between rounds, saved and restored by family.

The server checkpoints it after every round and loads it into the fresh strategy of a
resumed link (a new link starts from none: the B coordinates changed). What each family
keeps, in Flower 1.42 (tests/test_strategy_state.py fails if Flower renames it):

| family | strategies | state |
|---|---|---|
| FedOpt | FedAdam, FedYogi, FedAdagrad | `current_arrays` (dict of ndarrays), `m_t`, `v_t` |
| FedAvgM | FedAvgM | `current_arrays` (ArrayRecord, float64 after a step), `momentum_vector` |
| DP wrappers | Flower's DifferentialPrivacy*Clipping | the wrapped strategy's |
| others | FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum, MultiKrum | nothing |

FedOpt resets `current_arrays` in every configure_train; FedAvgM sets it only in its first
configure_train and then steps it itself, so a resumed FedAvgM gets it back.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvgM, Strategy
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase
from flwr.serverapp.strategy.fedopt import FedOpt

FEDOPT_STATE = ("current_arrays", "m_t", "v_t")
FEDAVGM_STATE = ("current_arrays", "momentum_vector")
DP_WRAPPERS = (DifferentialPrivacyFixedClippingBase, DifferentialPrivacyAdaptiveBase)


def _owner_and_fields(strategy: Strategy) -> tuple[Strategy, tuple[str, ...]]:
    """The strategy that holds the state (a DP wrapper's inner one) and its attributes."""
    while isinstance(strategy, DP_WRAPPERS):
        strategy = strategy.strategy
    if isinstance(strategy, FedOpt):
        return strategy, FEDOPT_STATE
    if isinstance(strategy, FedAvgM):
        return strategy, FEDAVGM_STATE
    return strategy, ()


def save_state(strategy: Strategy) -> dict[str, Any]:
    """The strategy's state that is set (attribute -> value; {} for a stateless family).

    The values are the strategy's own objects (Flower replaces them every round rather
    than changing them in place): copy them if the strategy goes on."""
    owner, fields = _owner_and_fields(strategy)
    state = {name: getattr(owner, name) for name in fields}  # AttributeError if renamed
    return {name: value for name, value in state.items() if value is not None}


def load_state(strategy: Strategy, state: dict[str, Any]) -> None:
    """Put `state` (from `save_state`) into a fresh strategy of the same family.

    Keys that are not this family's state are ignored (a checkpoint written before this
    module kept a DP wrapper's `current_arrays`, which configure_train resets anyway)."""
    owner, fields = _owner_and_fields(strategy)
    for name in fields:
        if not hasattr(owner, name):
            raise AttributeError(f"{type(owner).__name__} has no state attribute {name!r}")
        if name in state:
            setattr(owner, name, state[name])
