"""What a client trains and uploads beyond the plain full-rank float32 B.

Heterogeneous ranks: a node trains `RunConfig.client_rank(...)` columns of B (its node
config `max-rank` caps it) and uploads n_out * r_i numbers; the server pads them back.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from seedlora.nested import shrink
from server.config import NODE_MAX_RANK, RunConfig, RunConfigError


def node_rank(cfg: RunConfig, node_config: Mapping[str, Any], partition_id: int) -> int:
    """This node's training rank (the run's rank unless client-ranks says otherwise)."""
    cap = node_config.get(NODE_MAX_RANK)
    try:
        cap = None if cap is None else int(cap)
    except (TypeError, ValueError):
        raise RunConfigError(f"node config {NODE_MAX_RANK}: not an integer: {cap!r}") from None
    return cfg.client_rank(partition_id, cap)


def fit_rank(model: nn.Module, cfg: RunConfig, node_config, partition_id: int) -> int:
    """Shrink the model's adapters to this node's rank; returns that rank."""
    rank = node_rank(cfg, node_config, partition_id)
    if rank < cfg.rank:
        shrink(model, rank)
    return rank
