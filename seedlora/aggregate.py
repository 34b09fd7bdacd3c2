"""Aggregation math, and the error measure that shows why B-only averaging is exact.

With every client on the same A,

    sum_i w_i (alpha/r) B_i A = (alpha/r) (sum_i w_i B_i) A,

so the weighted mean of the B factors *is* the weighted mean of the weight updates.
FedIT-style LoRA averages A and B separately: mean(B_i) mean(A_i) != mean(B_i A_i).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def normalized(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum; rejects empty, negative or all-zero weights."""
    if not weights:
        raise ValueError("no weights to aggregate")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def weighted_mean(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Key-wise weighted mean, accumulated in float64 and returned in each input's dtype."""
    if len(states) != len(weights):
        raise ValueError(f"{len(states)} states but {len(weights)} weights")
    factors = normalized(weights)
    keys = list(states[0])
    for i, s in enumerate(states[1:], start=1):
        if list(s) != keys:
            raise KeyError(f"state {i} has keys that differ from state 0")
    out = {}
    for k in keys:
        acc = sum(f * s[k].double() for f, s in zip(factors, states, strict=True))
        out[k] = acc.to(states[0][k].dtype)
    return out


def fedit_update(
    a_list: Sequence[torch.Tensor],
    b_list: Sequence[torch.Tensor],
    weights: Sequence[float],
    scaling: float,
) -> torch.Tensor:
    """FedIT's aggregated update: (alpha/r) mean(B_i) @ mean(A_i). For comparison only."""
    factors = normalized(weights)
    a = sum(f * x.double() for f, x in zip(factors, a_list, strict=True))
    b = sum(f * x.double() for f, x in zip(factors, b_list, strict=True))
    return scaling * b @ a


def mean_update(
    a_list: Sequence[torch.Tensor],
    b_list: Sequence[torch.Tensor],
    weights: Sequence[float],
    scaling: float,
) -> torch.Tensor:
    """The target every rule should hit: the weighted mean of (alpha/r) B_i A_i, in float64."""
    factors = normalized(weights)
    pairs = zip(factors, a_list, b_list, strict=True)
    return sum(f * scaling * b.double() @ a.double() for f, a, b in pairs)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact||_F / ||exact||_F, computed in float64."""
    exact = exact.double()
    return float(torch.linalg.norm(approx.double() - exact) / torch.linalg.norm(exact))
