"""Seeded core: both factors seeded and frozen, only an r x r core R trained (`seedcore`).

    y = base(x) + s * B0 (R (A0 dropout(x)))
    s = (alpha / r) * gain(A0) * gain(B0) * sqrt(n_out / r)

A0 (r x n_in) is the layer's A-spec; B0 (n_out x r) is derived from a second spec,
`b_spec(spec)`: the same kind, seed, chain index and rank, the layer's name with "/B0"
appended (so its seeded draws are independent of A0's), read transposed as in
seedlora/swapped.py (a block B0 is `[0; I_r; 0]`: `B0 h` scatters h into r output rows).
Only R is trained and sent: r^2 numbers per layer instead of n_out * r (the LoRA-SB /
Fed-SB idea with seeded instead of SVD-initialised factors). Averaging is exact because
the update is linear in R:

    sum_i w_i s B0 R_i A0 = s B0 (sum_i w_i R_i) A0.

R starts at zero; its gradient `s B0^T G^T (A0 x)` (G = dL/dy) is not, since both frozen
factors are. Each gain is the spec's (`ASpec.gain`: sqrt(r / n) for a gaussian factor, 1
for a block), so rows of A0 and columns of B0 have unit norm in expectation and a step of R
moves W by about s' |dR| (s' = s without the last factor) whatever the kind. The last factor
matches the B-only method's step at one learning rate: an Adam step moves each entry by
about lr, so |dB A| ~ lr sqrt(n_out r) for the n_out x r entries of B but only lr r for the
r x r of R; sqrt(n_out / r) closes the gap (measured on the shipped model: 5 steps at the
default lr took the loss 4.75 -> 4.72 without it, 4.60 with it; B-only 4.27-4.38).

At a link close `s B0 R A0` is merged into the base and the next chain index draws new A0
and B0 with R = 0, as for the B-only method.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .layer import add_low_rank, describe, expand, frozen_b, wrap_frozen_base, zero_
from .paths import project
from .spec import ASpec

CORE = "AB"  # a link's `frozen` when both factors are seeded (seedcore)
B0_SUFFIX = "/B0"


def b_spec(spec: ASpec) -> ASpec:
    """The spec of B0^T: (r, n_out), from A0's spec (its `n_in` is the layer's n_out)."""
    return replace(spec, layer=spec.layer + B0_SUFFIX, n_in=spec.n_out, n_out=spec.n_in)


def core_scaling(spec: ASpec, alpha: float) -> float:
    """s = (alpha / r) * gain(A0) * gain(B0) * sqrt(n_out / r), for A0's spec `spec`
    (module docstring: the last factor gives a step of R the B-only step's size)."""
    return spec.scaling(alpha) * b_spec(spec).gain * math.sqrt(spec.n_out / spec.rank)


@torch.no_grad()
def lift(spec: ASpec, core: torch.Tensor) -> torch.Tensor:
    """B0 R: (n_out, r), float64 on the CPU, for A0's spec `spec` and R: (r, r).

    Formed in float64 (B0's float32 entries are exact there), so every party that merges the
    same R rounds the same product to its weight's dtype.
    """
    core = core.detach().to("cpu", torch.float64)
    bs = b_spec(spec)
    if bs.is_block:
        out = torch.zeros(spec.n_out, spec.rank, dtype=torch.float64)
        return out.index_copy_(0, bs.columns(), core)
    return bs.dense().t().double() @ core


def merge_core(base: nn.Module, spec: ASpec, core: torch.Tensor, alpha: float) -> None:
    """Fold `s B0 R A0` into the base weight in place: the B-only merge of `B0 R`.

    Args:
        base: the frozen `nn.Linear` or `Conv1D`; its weight changes in place, dtype kept.
        spec: A0's spec: (r, n_in).
        core: R: (r, r), any float dtype and device.
        alpha: the LoRA alpha (the scale is `core_scaling`).
    """
    scaling = core_scaling(spec, alpha)
    add_low_rank(base.weight, spec, lift(spec, core), scaling, isinstance(base, Conv1D))


class CoreLoRALayer(nn.Module):
    """Wraps a frozen `nn.Linear` / `Conv1D`; trains only the core `lora_R`.

    forward:  y = base(x) + s B0 (R (A0 dropout(x)))
    merge():  W0 <- W0 + s B0 R A0, then R <- 0

    Args:
        base: the `nn.Linear` or GPT-2 `Conv1D` to adapt; frozen here.
        spec: A0's spec; `(spec.n_in, spec.n_out)` must be the layer's shape, and r must
            not exceed either side.
        alpha: the LoRA alpha; the scale is `core_scaling(spec, alpha)`.
        dropout: adapter dropout probability on x.

    Attributes:
        lora_R: R: (r, r) parameter, zero at the start; float32 (float64 under a float64
            base), on the base's device.
        frozen_A: A0: (r, n_in) float32 non-persistent buffer (gaussian kind), else None.
        frozen_B: B0: (n_out, r) float32 non-persistent buffer (gaussian kind), else None.
        scaling: s.
    """

    def __init__(self, base: nn.Module, spec: ASpec, alpha: float, dropout: float = 0.0):
        super().__init__()
        like = wrap_frozen_base(self, base, alpha, spec, dropout, swapped=False)
        self.lora_R = nn.Parameter(torch.zeros(spec.rank, spec.rank, **like))
        self.register_buffer("frozen_A", None, persistent=False)
        self.register_buffer("frozen_B", None, persistent=False)
        # block kinds: the rows B scatters into; a buffer, so `.to(device)` moves it too
        self.register_buffer("rows", None, persistent=False)
        self.set_spec(spec)

    def set_spec(self, spec: ASpec) -> None:
        """Switch to another chain index (its A0 and B0) and zero R."""
        bs = b_spec(spec)  # checks r <= n_out
        device = self.base.weight.device
        self.spec = spec
        self.scaling = core_scaling(spec, self.alpha)
        self.frozen_A = None if spec.is_block else spec.dense().to(device)
        self.frozen_B, self.rows = frozen_b(bs, device)
        zero_(self.lora_R)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`base(x) + s B0 (R (A0 x))`: x (..., n_in) -> (..., n_out), in the base's dtype
        and on its device (the output in the base output's dtype)."""
        y = self.base(x)
        r = self.lora_R
        h = project(self.dropout(x), self.spec, self.frozen_A).to(r.dtype)
        h = F.linear(h, r) * self.scaling  # (..., r)
        return expand(y, h, self.frozen_B, self.rows)

    def delta_weight(self) -> torch.Tensor:
        """The dense update `s B0 R A0`: (n_out, n_in), float32 on R's device, detached.

        nn.Linear orientation also for Conv1D; builds dense factors, so it is for checks.
        """
        left = lift(self.spec, self.lora_R).float().to(self.lora_R.device)
        return self.scaling * left @ self.spec.dense().to(self.lora_R.device)

    def merge(self) -> None:
        """Fold the current `s B0 R A0` into the base weight and reset R to zero."""
        merge_core(self.base, self.spec, self.lora_R, self.alpha)
        zero_(self.lora_R)

    def extra_repr(self) -> str:
        return "core R, " + describe(self.spec, self.alpha)
