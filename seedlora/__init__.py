"""seedlora: B-only low-rank adapters on seed-defined frozen factors, chained and exact.

The adapter core. It has no Flower import, so it can be used (and tested) on its own.
Names load on first use (PEP 562), so `import seedlora.names` (what a run-config check
needs) costs no torch import; `from seedlora import prepare` works as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

# name -> the submodule that defines it
_EXPORTS = {
    "fedit_update": "aggregate",
    "mean_update": "aggregate",
    "relative_error": "aggregate",
    "weighted_mean": "aggregate",
    "EMPTY_DIGEST": "chain",
    "Chain": "chain",
    "Link": "chain",
    "a_digest": "chain",
    "apply_link": "chain",
    "links_digest": "chain",
    "rebuild": "chain",
    "record_link": "chain",
    "close_link": "federate",
    "round_average": "federate",
    "atomic_dir": "export",
    "export_merged": "export",
    "export_peft": "export",
    "adapter_layers": "injection",
    "inject": "injection",
    "load_trainable_state": "injection",
    "merge_adapters": "injection",
    "set_chain_index": "injection",
    "trainable_state": "injection",
    "unwrap": "injection",
    "SeedLoRALayer": "layer",
    "merge_delta": "layer",
    "project": "paths",
    "B_ONLY": "names",
    "CHAINED": "names",
    "LINKED": "names",
    "CoreLoRALayer": "core",
    "Method": "names",
    "prepare": "methods",
    "BLOCK_KINDS": "names",
    "KINDS": "names",
    "ASpec": "spec",
    "derive_seed": "spec",
}

__all__ = [
    "ASpec",
    "BLOCK_KINDS",
    "B_ONLY",
    "CHAINED",
    "Chain",
    "CoreLoRALayer",
    "EMPTY_DIGEST",
    "KINDS",
    "LINKED",
    "Link",
    "Method",
    "SeedLoRALayer",
    "a_digest",
    "adapter_layers",
    "apply_link",
    "atomic_dir",
    "close_link",
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
    "round_average",
    "set_chain_index",
    "trainable_state",
    "unwrap",
    "weighted_mean",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


if TYPE_CHECKING:
    from .aggregate import fedit_update, mean_update, relative_error, weighted_mean
    from .chain import (
        EMPTY_DIGEST,
        Chain,
        Link,
        a_digest,
        apply_link,
        links_digest,
        rebuild,
        record_link,
    )
    from .core import CoreLoRALayer
    from .export import atomic_dir, export_merged, export_peft
    from .federate import close_link, round_average
    from .injection import (
        adapter_layers,
        inject,
        load_trainable_state,
        merge_adapters,
        set_chain_index,
        trainable_state,
        unwrap,
    )
    from .layer import SeedLoRALayer, merge_delta
    from .methods import prepare
    from .names import B_ONLY, BLOCK_KINDS, CHAINED, KINDS, LINKED, Method
    from .paths import project
    from .spec import ASpec, derive_seed
