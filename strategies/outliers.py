"""Flag updates whose norm is far above the others (median absolute deviation rule).

A client's update is `theta_i - theta_global` over everything it sends (B and heads).
With norms n_i, the threshold is median(n) + k * 1.4826 * MAD(n), the MAD scaled to
estimate a standard deviation under normal noise. It needs >= 3 replies to say anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

MAD_TO_STD = 1.4826


def update_norm(state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """||state - reference|| over all arrays, in float64."""
    total = sum(
        float(np.sum((state[k].astype(np.float64) - reference[k].astype(np.float64)) ** 2))
        for k in reference
    )
    return total**0.5


def threshold(norms: Sequence[float], k: float) -> float | None:
    """median + k * 1.4826 * MAD, or None when there are too few norms to judge."""
    if len(norms) < 3 or k <= 0:
        return None
    values = np.asarray(norms, dtype=np.float64)
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    return median + k * MAD_TO_STD * mad


def clipped(
    state: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], factor: float
) -> dict[str, np.ndarray]:
    """reference + factor * (state - reference), in the state's dtype."""
    return {
        k: (reference[k] + factor * (state[k] - reference[k])).astype(state[k].dtype)
        for k in reference
    }
