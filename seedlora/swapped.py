"""Swapped roles: B (n_out x r) frozen and seeded, A (r x n_in) trained from zero.

    y = base(x) + s B (A dropout(x))          s = spec.scaling(alpha)

The frozen factor is described by the same A-spec machinery, read transposed: the spec's
`n_in` is the layer's n_out and `spec.dense()` (r x n_out) is B^T. So s = alpha / r for
the block kinds and (alpha / r) sqrt(r / n_out) = alpha / sqrt(r n_out) for a gaussian B
(its gain makes B's columns unit norm in expectation). For the block kinds B is
`[0; I_r; 0]`, so `B h` scatters h into r output rows and no dense B exists. Exactness is
the mirror image of the default: sum_i w_i s B A_i = s B (sum_i w_i A_i), the variant
analysed in arXiv 2506.14530.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layer import add_low_rank, describe, expand, frozen_b, layer_shape, wrap_frozen_base, zero_
from .spec import ASpec, Kind

TRAINED_A = "B"  # value of `frozen` (run-config frozen-factor) that selects this layer


def frozen_spec(
    kind: Kind, seed: int, chain_index: int, rank: int, layer: str, base: nn.Module
) -> ASpec:
    """The spec of a layer's frozen B^T: (r, n_out) (its `n_in` is the layer's n_out)."""
    n_in, n_out = layer_shape(base)
    return ASpec(kind, seed, chain_index, rank, layer, n_out, n_in)


def merge_swapped(base: nn.Module, spec: ASpec, a: torch.Tensor, scaling: float) -> None:
    """Fold `scaling * B @ A` (B from `spec`, read transposed) into the base weight.

    `W += s B A` is `W^T += (s A^T) B^T` with `B^T = spec.dense()`: the B-only merge of
    A^T into the weight seen the other way round.

    Args:
        base: the frozen `nn.Linear` or `Conv1D`; its weight changes in place, dtype kept.
        spec: describes B^T: (r, n_out) (`frozen_spec`).
        a: the trained A: (r, n_in), any float dtype and device.
        scaling: s = `spec.scaling(alpha)`.
    """
    add_low_rank(base.weight, spec, a.t(), scaling, transposed=not isinstance(base, Conv1D))


class SwappedLoRALayer(nn.Module):
    """Wraps a frozen `nn.Linear` / `Conv1D`; trains only `lora_A` against a seeded B.

    forward:  y = base(x) + s B (A dropout(x))          s = spec.scaling(alpha)
    merge():  W0 <- W0 + s B A, then A <- 0

    Args:
        base: the `nn.Linear` or GPT-2 `Conv1D` to adapt; frozen here.
        spec: the frozen B^T's spec (`frozen_spec`): `spec.n_in` is the layer's n_out.
        alpha: the LoRA alpha; the scale is `spec.scaling(alpha)` (alpha / r for block
            kinds, alpha / sqrt(r n_out) for gaussian).
        dropout: adapter dropout probability on x.

    Attributes:
        lora_A: A: (r, n_in) parameter, zero at the start, on the base's device; float32
            (float64 under a float64 base).
        frozen_B: B: (n_out, r) float32 non-persistent buffer on the base's device
            (gaussian kind); None for block kinds, whose `B h` scatters h into r rows.
        scaling: s = `spec.scaling(alpha)`.
    """

    def __init__(self, base: nn.Module, spec: ASpec, alpha: float, dropout: float = 0.0):
        super().__init__()
        like = wrap_frozen_base(self, base, alpha, spec, dropout, swapped=True)
        self.lora_A = nn.Parameter(torch.zeros(spec.rank, spec.n_out, **like))
        self.register_buffer("frozen_B", None, persistent=False)
        # block kinds: the rows B scatters into; a buffer, so `.to(device)` moves it too
        self.register_buffer("rows", None, persistent=False)
        self.set_spec(spec)

    def set_spec(self, spec: ASpec) -> None:
        """Switch to another B-spec (a new chain index: its B) and zero A."""
        self.spec = spec
        self.frozen_B, self.rows = frozen_b(spec, self.base.weight.device)
        with torch.no_grad():
            self.lora_A.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`base(x) + B h`, h = s A dropout(x) in A's dtype (float32 under a bf16 base),
        `B h` added to y in y's dtype: x (..., n_in) -> (..., n_out), both in the base's
        dtype and on its device, as in `SeedLoRALayer.forward`."""
        y = self.base(x)
        a = self.lora_A
        h = F.linear(self.dropout(x).to(a.dtype), a) * self.scaling
        return expand(y, h, self.frozen_B, self.rows)

    def delta_weight(self) -> torch.Tensor:
        """The dense update `s B A`: (n_out, n_in), float32, on A's device, detached.

        nn.Linear orientation also for Conv1D; builds a dense B, so it is for checks.
        """
        b = self.spec.dense().t().to(self.lora_A.device)
        return self.scaling * b @ self.lora_A.detach().float()

    def merge(self) -> None:
        """Fold the current `s B A` into the base weight and reset A to zero."""
        merge_swapped(self.base, self.spec, self.lora_A, self.scaling)
        zero_(self.lora_A)

    def extra_repr(self) -> str:
        return "frozen B, " + describe(self.spec, self.alpha)
