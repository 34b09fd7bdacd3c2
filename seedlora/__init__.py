"""seedlora: B-only low-rank adapters on seed-defined frozen factors, chained and exact.

The adapter core. It has no Flower import, so it can be used (and tested) on its own.
"""

from .aggregate import fedit_update, mean_update, relative_error, weighted_mean
from .chain import EMPTY_DIGEST, Chain, Link, apply_link, links_digest, rebuild, record_link
from .export import atomic_dir, export_merged, export_peft
from .inject import (
    adapter_layers,
    inject,
    load_trainable_state,
    merge_adapters,
    set_chain_index,
    trainable_state,
    unwrap,
)
from .layer import SeedLoRALayer, merge_delta, project
from .methods import B_ONLY, CHAINED, Method, prepare
from .spec import BLOCK_KINDS, KINDS, ASpec, derive_seed

__all__ = [
    "ASpec",
    "B_ONLY",
    "CHAINED",
    "Method",
    "BLOCK_KINDS",
    "Chain",
    "EMPTY_DIGEST",
    "KINDS",
    "Link",
    "SeedLoRALayer",
    "adapter_layers",
    "apply_link",
    "atomic_dir",
    "derive_seed",
    "export_merged",
    "export_peft",
    "fedit_update",
    "inject",
    "links_digest",
    "load_trainable_state",
    "mean_update",
    "merge_adapters",
    "merge_delta",
    "prepare",
    "project",
    "rebuild",
    "record_link",
    "relative_error",
    "set_chain_index",
    "trainable_state",
    "unwrap",
    "weighted_mean",
]
