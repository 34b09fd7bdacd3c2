"""Which factor an adapter trains: the three adapter classes behind one set of questions.

| adapter | frozen, seeded | trained and sent | a link's `frozen` |
|---|---|---|---|
| `SeedLoRALayer` (default) | A: (r, n_in) | B: (n_out, r) | "A" |
| `SwappedLoRALayer` | B: (n_out, r) | A: (r, n_in) | "B" |
| `CoreLoRALayer` (seedcore) | A0 and B0 | R: (r, r) | "AB" |
"""

from __future__ import annotations

import torch
from torch import nn

from .core import CORE, CoreLoRALayer
from .layer import SeedLoRALayer
from .swapped import TRAINED_A, SwappedLoRALayer

ADAPTERS = (SeedLoRALayer, SwappedLoRALayer, CoreLoRALayer)
FACTOR_NAMES = ("lora_B", "lora_A", "lora_R")  # the trained factor's parameter name, by role


def trained_factor(layer: nn.Module) -> torch.Tensor:
    """The factor an adapter trains and sends (the parameter itself, not a copy).

    Returns:
        `lora_B`: (n_out, r); `lora_A`: (r, n_in) when the roles are swapped; `lora_R`:
        (r, r) for a seeded core.
    """
    if isinstance(layer, CoreLoRALayer):
        return layer.lora_R
    return layer.lora_A if isinstance(layer, SwappedLoRALayer) else layer.lora_B


def frozen_of(layer: nn.Module) -> str:
    """Which factors an adapter keeps frozen: "A" (default), "B" (swapped) or "AB" (core)."""
    if isinstance(layer, CoreLoRALayer):
        return CORE
    return TRAINED_A if isinstance(layer, SwappedLoRALayer) else "A"


def is_factor_key(name: str) -> bool:
    """Whether a trainable-state key names an adapter's trained factor (not a head)."""
    return name.endswith(FACTOR_NAMES)
