"""What a client trains and uploads beyond the plain full-rank float32 B.

Heterogeneous ranks: a node trains `RunConfig.client_rank(...)` columns of B (its node
config `max-rank` caps it) and uploads n_out * r_i numbers; the server pads them back.

Compressed uploads: the update (trained minus received state) goes out in
`upload-codec` (seedlora/compress.py). With `error-feedback` the rounding residual is
kept on disk, since ClientApp objects do not live from one round to the next, under the
cache dir keyed by run and node; it is carried only within one chain link (a new link
means new A coordinates, so an old residual would be added in the wrong basis).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from contract.config import NODE_MAX_RANK, RunConfig, RunConfigError
from seedlora.compress import compress
from seedlora.nested import shrink
from seedlora.serialize import (
    CorruptFileError,
    atomic_write_bytes,
    state_from_bytes,
    state_to_bytes,
)

from .resident import private_copy

State = dict[str, torch.Tensor]


def node_rank(cfg: RunConfig, node_config: Mapping[str, Any], partition_id: int) -> int:
    """This node's training rank (the run's rank unless client-ranks says otherwise)."""
    cap = node_config.get(NODE_MAX_RANK)
    try:
        cap = None if cap is None else int(cap)
    except (TypeError, ValueError):
        raise RunConfigError(f"node config {NODE_MAX_RANK}: not an integer: {cap!r}") from None
    return cfg.client_rank(partition_id, cap)


def fit_rank(model: nn.Module, cfg: RunConfig, node_config, partition_id: int) -> nn.Module:
    """The model this node trains: `model` at the run's rank, else a private copy of it
    (client.resident.private_copy: the resident model is shared by the clients of a
    process) with its adapters shrunk to this node's rank. Load the global state first:
    shrinking folds the global B's columns beyond the node's rank into the copy's base."""
    rank = node_rank(cfg, node_config, partition_id)
    if rank >= cfg.adapter.rank:
        return model
    model = private_copy(model)
    shrink(model, rank)
    return model


class ResidualStore:
    """One client's error-feedback residual: `root/residuals/<run>-<node>.safetensors`."""

    def __init__(self, root: str | os.PathLike, run_id: int, node_id: int):
        self.path = Path(root) / "residuals" / f"{run_id}-{node_id}.safetensors"

    def load(self, chain_index: int, links_digest: str, server_round: int) -> State | None:
        """The residual left by an earlier round of the same link, else None (reset)."""
        if not self.path.exists():
            return None
        try:
            tensors, meta = state_from_bytes(self.path.read_bytes())
        except CorruptFileError:
            return None
        same_link = meta.get("chain-index") == chain_index and meta.get("links") == links_digest
        return tensors if same_link and meta.get("round", server_round) < server_round else None

    def save(self, residual: State, chain_index: int, links_digest: str, server_round: int):
        meta = {"chain-index": chain_index, "links": links_digest, "round": server_round}
        atomic_write_bytes(self.path, state_to_bytes(residual, meta))


def residuals(root: str | os.PathLike, context) -> ResidualStore:
    """This node's residual store, in its cache folder `root` (beside its link cache)."""
    return ResidualStore(root, context.run_id, context.node_id)


def pack(
    trained: State,
    received: State,
    cfg: RunConfig,
    store: ResidualStore,
    link: tuple[int, str, int],
) -> State:
    """The arrays to upload: the trained state (float32), or its compressed update.

    `link` is (chain index, links digest, server round): where the residual belongs.
    """
    if cfg.upload.upload_codec == "float32":
        return trained
    update = {k: trained[k] - received[k] for k in trained}
    residual = store.load(*link) if cfg.upload.error_feedback else None
    wire, residual = compress(update, residual, cfg.upload.upload_codec)
    if cfg.upload.error_feedback:
        store.save(residual, *link)
    return wire
