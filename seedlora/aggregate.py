"""Aggregation math, and the error measure that shows why B-only averaging is exact.

With every client on the same A (and so the same scale s = `spec.scaling(alpha)`),

    sum_i w_i s B_i A = s (sum_i w_i B_i) A,

so the weighted mean of the B factors *is* the weighted mean of the weight updates.
FedIT-style LoRA averages A and B separately: mean(B_i) mean(A_i) != mean(B_i A_i).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

Factors = Sequence[torch.Tensor]  # one factor per client
Weights = Sequence[float]  # one weight per client
Tensor = torch.Tensor


def normalized(weights: Sequence[float]) -> list[float]:
    """Weights divided by their sum, so that a weighted mean is a convex combination.

    Args:
        weights: one weight per client (e.g. its example count), each >= 0, positive sum.

    Returns:
        The weights as floats summing to 1. Raises ValueError on empty, negative or
        all-zero weights.
    """
    if not weights:
        raise ValueError("no weights to aggregate")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def weighted_mean(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Key-wise weighted mean: FedAvg of B factors (and heads), exact in weight space.

    Because every client shares the same A, the mean of the B's is the mean of the weight
    updates (module docstring). Accumulating in float64 keeps the rounding at the level
    of one final cast.

    Args:
        states: one dict per client, name -> tensor, all with the same keys in the same
            order; a key's tensors share one shape, e.g. B: (n_out, r), any float dtype,
            all on one device.
        weights: one weight per state (>= 0, positive sum; normalised here).

    Returns:
        name -> weighted mean, same shape as the inputs, in state 0's dtype and on its
        device. Raises ValueError if the counts differ, KeyError if the keys do.
    """
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


def fedit_update(a_list: Factors, b_list: Factors, weights: Weights, scaling: float) -> Tensor:
    """FedIT's aggregated update `s mean(B_i) @ mean(A_i)`. For comparison only.

    This is what ordinary federated LoRA applies; it differs from `mean_update` by an
    error of the order of the update itself, which the tests show numerically.

    Args:
        a_list: the clients' A_i, each (r, n_in).
        b_list: the clients' B_i, each (n_out, r), same order as `a_list`.
        weights: one weight per client (>= 0, positive sum; normalised here).
        scaling: s (PEFT's LoRA: alpha / r).

    Returns:
        The update, (n_out, n_in), float64, on the factors' device.
    """
    factors = normalized(weights)
    a = sum(f * x.double() for f, x in zip(factors, a_list, strict=True))
    b = sum(f * x.double() for f, x in zip(factors, b_list, strict=True))
    return scaling * b @ a


def mean_update(a_list: Factors, b_list: Factors, weights: Weights, scaling: float) -> Tensor:
    """The target every rule should hit: the weighted mean of `s B_i @ A_i`.

    Args:
        a_list: the clients' A_i, each (r, n_in) (the same A for every client in B-only
            training; per-client A's for FedIT).
        b_list: the clients' B_i, each (n_out, r), same order as `a_list`.
        weights: one weight per client (>= 0, positive sum; normalised here).
        scaling: s (`spec.scaling(alpha)` for B-only; alpha / r for FedIT).

    Returns:
        The mean weight update, (n_out, n_in), float64, on the factors' device.
    """
    factors = normalized(weights)
    pairs = zip(factors, a_list, b_list, strict=True)
    return sum(f * scaling * b.double() @ a.double() for f, a, b in pairs)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """`||approx - exact||_F / ||exact||_F` in float64: the exactness measure of the tests.

    Args:
        approx: an aggregated update, any shape and float dtype.
        exact: the reference (e.g. `mean_update`), same shape and device as `approx`.

    Returns:
        The relative error as a Python float (~1e-7 for float32 rounding).
    """
    exact = exact.double()
    return float(torch.linalg.norm(approx.double() - exact) / torch.linalg.norm(exact))
