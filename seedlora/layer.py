"""The B-only adapter layer: `y = base(x) + s B (A x)` with A frozen and seeded.

The scale is `s = spec.scaling(alpha)` (seedlora/spec.py): alpha / r for the block kinds,
(alpha / r) sqrt(r / n_in) = alpha / sqrt(r n_in) for the gaussian kind, so it depends on
the layer's n_in there. Only `lora_B` (n_out x r, zero whenever the chain index moves on)
is a parameter. For the gaussian kind A is a non-persistent buffer, so it is never in a
saved or sent state; for the block kinds no A exists at all: `A x` is a slice of x.

`forward` is `self.path(self, x)`: one of the paths of seedlora/paths.py, chosen when the
layer's state changes, never per call. The fused path (`fused.BOnlyLinear`, one autograd
node for base and adapter; the sibling group's node when there is one) is taken unless
adapter dropout is active, the base is trainable or quantized (its weight is codes: the
base layer's own forward dequantizes); `paths.Reference` is the plain composition of
torch ops that it must match.

In side-path mode (`aside`, seedlora/sidepath.py: always for a quantized base) merged
links are not added into the base weight but kept beside it, and `forward` adds them:
`y = base(x) + x A_cat^T B_cat^T + s B (A x)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .grouped import SiblingGroup
from .paths import Path, choose_path
from .sidepath import SidePath, is_quantized
from .spec import ASpec


def layer_shape(base: nn.Module) -> tuple[int, int]:
    """(n_in, n_out) of an `nn.Linear` or a GPT-2 `Conv1D` (whose weight is n_in x n_out)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"cannot adapt {type(base).__name__}: only nn.Linear and Conv1D")


def frozen_b(spec: ASpec, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dense B, rows) of a seeded frozen B whose transposed spec is `spec` (r, n_out): for
    the gaussian kind B (n_out, r) and no rows; for a block kind no dense B (it is
    `[0; I_r; 0]`) and the r output rows `B h` scatters into. Both on `device`; hold them
    as buffers, so they follow the module to another device."""
    if spec.is_block:
        return None, spec.columns().to(device)
    return spec.dense().t().contiguous().to(device), None


def expand(
    y: torch.Tensor, h: torch.Tensor, b: torch.Tensor | None, rows: torch.Tensor | None
) -> torch.Tensor:
    """`y + B h` over the last dimension, in y's dtype: a matmul with the dense B, or for a
    block B (`b` None) a scatter-add of h (..., r) into `rows` of y (..., n_out)."""
    if b is not None:
        return y + F.linear(h, b.to(h.dtype)).to(y.dtype)
    return y.index_add(-1, rows, h.to(y.dtype))


def wrap_frozen_base(
    adapter: nn.Module, base: nn.Module, alpha: float, spec: ASpec, dropout: float, swapped: bool
) -> dict:
    """Attach a frozen base, the scale `spec.scaling(alpha)` and dropout; check the spec's
    shape against the layer (`spec.n_in` is the layer's n_out for a frozen B^T when `swapped`).

    Returns the trained factor's tensor options: float32 (a master copy) under a bf16/fp16
    base, so the wire and the average do not depend on the client's precision; float64
    under a float64 base; on the base's device.
    """
    n_in, n_out = layer_shape(base)
    want = (n_out, n_in) if swapped else (n_in, n_out)
    if (spec.n_in, spec.n_out) != want:
        raise ValueError(f"spec shape {(spec.n_in, spec.n_out)} != layer {want}")
    adapter.base = base
    base.requires_grad_(False)
    adapter.alpha = float(alpha)
    adapter.scaling = spec.scaling(adapter.alpha)
    adapter.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    dtype = torch.float64 if base.weight.dtype == torch.float64 else torch.float32
    return {"dtype": dtype, "device": base.weight.device}


@torch.no_grad()
def add_low_rank(
    weight: torch.Tensor, spec: ASpec, left: torch.Tensor, scaling: float, transposed: bool
) -> None:
    """`weight += (scaling * left) @ A` in place, A from `spec` (a column scatter for blocks).

    Both merges (B-only and swapped roles) are this. The product is formed in float32 on
    the weight's device with A from `spec.dense()` (float32 CPU, then moved), and added in
    the weight's dtype, so every party that merges the same factors gets the same bits.
    A float64 weight is the exception: the product is formed in float64 (A's float32
    entries are exact there), so a float64 model merges to float64 rounding (~1e-16).

    Args:
        weight: (m, spec.n_in), or (spec.n_in, m) when `transposed`; any float dtype.
        spec: describes A: (r, spec.n_in).
        left: (m, r), any float dtype and device (B for the B-only merge).
        scaling: s, multiplied into `left` first: `spec.scaling(alpha)` for the B-only
            and swapped merges, `core.core_scaling` for a seeded core.
        transposed: `weight` is stored the other way round (n_in x n_out, as GPT-2's
            Conv1D), so the product is added transposed.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    sl = (left.detach().to(dtype) * scaling).to(weight.device)
    if spec.is_block:
        cols = spec.columns().to(weight.device)
        if transposed:
            weight.index_add_(0, cols, sl.t().to(weight.dtype))
        else:
            weight.index_add_(1, cols, sl.to(weight.dtype))
        return
    delta = sl @ spec.dense().to(weight.device, dtype)
    weight.add_((delta.t() if transposed else delta).to(weight.dtype))


def merge_delta(base: nn.Module, spec: ASpec, b: torch.Tensor, scaling: float) -> None:
    """Fold `scaling * B @ A` into the base weight in place (how a link enters the base).

    The same function serves the layer's `merge()` and `rebuild()` from a links list, so
    a server and a client that start from the same W0 get bit-identical weights.

    Args:
        base: the frozen `nn.Linear` (weight (n_out, n_in)) or `Conv1D` (weight
            (n_in, n_out)); its weight changes in place, dtype kept.
        spec: describes A: (r, n_in).
        b: B: (n_out, r), any float dtype and device.
        scaling: s = `spec.scaling(alpha)`.
    """
    add_low_rank(base.weight, spec, b, scaling, transposed=isinstance(base, Conv1D))


class SeedLoRALayer(nn.Module):
    """Wraps a frozen `nn.Linear` / `Conv1D`; trains only `lora_B`.

    forward:  y = base(x) + s B (A dropout(x))          s = spec.scaling(alpha)
    merge():  W0 <- W0 + s B A, then B <- 0

    Because A is the same on every client, averaging B alone averages the weight updates
    exactly. The forward is `self.path(self, x)`: the path (seedlora/paths.py) is chosen
    again whenever what it depends on changes through the layer (`refresh_path`).

    Args:
        base: the `nn.Linear` or GPT-2 `Conv1D` to adapt; frozen here.
        spec: the A-spec; `(spec.n_in, spec.n_out)` must be the layer's shape.
        alpha: the LoRA alpha; the scale is `spec.scaling(alpha)` (alpha / r for block
            kinds, alpha / sqrt(r n_in) for gaussian).
        dropout: adapter dropout probability on x; above 0, training takes the reference
            path.

    Attributes:
        lora_B: B: (n_out, r) parameter, zero at the start, on the base's device; float32
            (a master copy, also under a bf16/fp16 base), float64 under a float64 base.
        lora_A: A: (r, n_in) float32 non-persistent buffer on the base's device, drawn on
            the CPU from the seeded generator then moved (gaussian kind); None for block
            kinds.
        scaling: s = `spec.scaling(alpha)`.
        path: how forward computes y (`paths.choose_path`).
        fused: False forces the reference path (for comparison and debugging).
        group: the sibling group sharing one node (set by `grouped.group_siblings`), or None.
        aside: the side path of merged links in side-path mode, else None.
    """

    def __init__(self, base: nn.Module, spec: ASpec, alpha: float, dropout: float = 0.0):
        super().__init__()
        self._fused = True
        self._group: SiblingGroup | None = None
        like = wrap_frozen_base(self, base, alpha, spec, dropout, swapped=False)
        self.lora_B = nn.Parameter(torch.zeros(spec.n_out, spec.rank, **like))
        self.register_buffer("lora_A", None, persistent=False)
        self.aside: SidePath | None = None
        self.set_spec(spec)
        self.path: Path = choose_path(self)
        if is_quantized(base):
            self.keep_links_aside()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`base(x) + s B (A dropout(x))` (plus the side path's merged links
        `x A_cat^T B_cat^T` in side-path mode) through `self.path`.

        Args:
            x: (..., n_in) in the base's dtype (or any dtype under autocast), on its device.

        Returns:
            (..., n_out) in x's dtype (the autocast dtype under autocast; a quantized base's
            output dtype).
        """
        return self.path(self, x)

    def refresh_path(self) -> None:
        """Choose the path again, for this layer and its siblings (whether a group can take
        one node depends on every member). `train()`/`eval()` and `fused` call it (setting
        `group` or side-path mode re-chooses this layer's alone); call it after changing
        the base's `requires_grad` by hand."""
        for member in self._group.members if self._group is not None else (self,):
            member.path = choose_path(member)

    def train(self, mode: bool = True) -> SeedLoRALayer:
        """Set training mode and choose the path for it (adapter dropout is active only in
        training)."""
        super().train(mode)
        self.refresh_path()
        return self

    @property
    def fused(self) -> bool:
        """Whether a fused node may be used; False forces `paths.Reference`."""
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        self.refresh_path()

    @property
    def group(self) -> SiblingGroup | None:
        """The sibling group this layer shares a node with, or None."""
        return self._group

    @group.setter
    def group(self, group: SiblingGroup | None) -> None:
        self._group = group
        self.path = choose_path(self)

    def fusable(self) -> bool:
        """Whether a fused node (`BOnlyLinear` or the group's) can compute this layer:
        `fused` on, no adapter dropout in training, a frozen float base."""
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        weight = self.base.weight
        return (
            self._fused
            and not dropping
            and not weight.requires_grad
            and not is_quantized(self.base)
        )

    def keep_links_aside(self) -> SidePath:
        """Side-path mode from now on: `merge()` and `chain.apply_link` put links in
        `self.aside` instead of the base weight (any base; a quantized one always)."""
        if self.aside is None:
            s, b = self.spec, self.lora_B
            self.aside = SidePath(s.n_in, s.n_out, b.dtype, b.device)
            self.path = choose_path(self)
        return self.aside

    def add_link(self, spec: ASpec, b: torch.Tensor, scaling: float) -> None:
        """A merged link `scaling * B @ A(spec)`: into the side path, or into the base."""
        if self.aside is not None:
            self.aside.add(spec, b, scaling)
        else:
            merge_delta(self.base, spec, b, scaling)

    def fold(self) -> None:
        """Merge the side path's links densely into a float base (export), in link order.

        Each link goes through `merge_delta`, the same function as the dense master's
        merges, so a float base folds to the master's bits. Raises for a quantized base:
        its codes cannot hold the links (the server's dense master exports instead).
        """
        if self.aside is None:
            return
        if is_quantized(self.base):
            raise ValueError("cannot fold links into a quantized base; export the dense master")
        for spec, b, scaling in self.aside.links:
            merge_delta(self.base, spec, b, scaling)
        self.aside = None
        self.path = choose_path(self)

    def set_spec(self, spec: ASpec) -> None:
        """Switch to another A-spec (a new chain index: its A, cached once) and zero B."""
        self.spec = spec
        a = None if spec.is_block else spec.dense().to(self.base.weight.device)
        self.lora_A = a
        self._offset = spec.offset() if spec.is_block else 0
        self._cols = None if a is not None or spec.contiguous() else spec.columns()
        self._cast: dict[tuple, torch.Tensor] = {}  # paths.frozen_operands' cache
        if self._group is not None:
            self._group.clear()
        with torch.no_grad():
            self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """The dense update `s B A`: (n_out, n_in), float32, on B's device, detached.

        nn.Linear orientation also for Conv1D. It builds a dense A, so it is for checks,
        not for the training path.
        """
        return (
            self.scaling * self.lora_B.detach().float() @ self.spec.dense().to(self.lora_B.device)
        )

    def merge(self) -> None:
        """Fold the current `s B A` into the base weight (into the side path in side-path
        mode: a copy of B) and reset B to zero."""
        self.add_link(self.spec, self.lora_B.detach().clone(), self.scaling)
        zero_(self.lora_B)

    def extra_repr(self) -> str:
        return describe(self.spec, self.alpha)


def zero_(factor: torch.Tensor) -> None:
    """Reset a trained factor in place (after its link is merged), outside autograd."""
    with torch.no_grad():
        factor.zero_()


def describe(spec: ASpec, alpha: float) -> str:
    """An adapter's repr: its A-spec's kind and chain index, rank and alpha."""
    return f"kind={spec.kind}, link={spec.chain_index}, rank={spec.rank}, alpha={alpha}"
