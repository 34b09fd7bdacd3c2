"""Flag updates whose norm is far above the others (median absolute deviation rule).

A client's update is `theta_i - theta_global` over everything it sends (B and heads).
With norms n_i, the threshold is median(n) + k * 1.4826 * MAD(n), the MAD scaled to
estimate a standard deviation under normal noise. It needs >= 3 replies to say anything.
`OutlierScreen` applies the rule to a round's valid replies: flag, drop or clip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.common.logger import log

from contract import protocol as p

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


@dataclass(frozen=True)
class OutlierScreen:
    """Round step: the MAD norm rule over the valid replies of one round.

    A reply whose update norm exceeds the bound is logged and recorded, then kept
    (`flag`), left out (`drop`) or rewritten in place to the bound (`clip`)."""

    k: float  # outlier-mad; 0 = off
    action: str  # flag | drop | clip
    reference: Mapping[str, np.ndarray]  # the global state sent this round

    def __call__(self, valid: list[Message]) -> tuple[list[Message], list[dict]]:
        """(the replies kept, one {node, norm, bound, action} record per outlier)."""
        if self.k <= 0:
            return valid, []
        states = [{k: a.numpy() for k, a in m.content[p.ARRAYS].items()} for m in valid]
        norms = [update_norm(s, self.reference) for s in states]
        bound = threshold(norms, self.k)
        if bound is None:
            return valid, []
        kept, flagged = [], []
        for msg, state, norm in zip(valid, states, norms, strict=True):
            if norm > bound:
                node, action = msg.metadata.src_node_id, self.action
                log(WARNING, "node %s update norm %.3g > bound %.3g: %s", node, norm, bound, action)
                flagged.append({"node": node, "norm": norm, "bound": bound, "action": action})
                if action == "drop":
                    continue
                if action == "clip":
                    clip = clipped(state, self.reference, bound / norm)
                    msg.content[p.ARRAYS] = ArrayRecord({k: Array(v) for k, v in clip.items()})
            kept.append(msg)
        return kept, flagged
