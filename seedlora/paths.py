"""How a `SeedLoRALayer` computes its output: one small path object, chosen once.

Every path computes the same function,

    y = base(x) + s B (A dropout(x))          s = spec.scaling(alpha)

(`ASpec.scaling`: s = alpha / r for the block kinds; s = (alpha / r) sqrt(r / n_in)
= alpha / sqrt(r n_in) for the gaussian kind, a per-layer scale through n_in; a nested
spec uses its r_max), plus the merged links `x A_cat^T B_cat^T` in side-path mode
(seedlora/sidepath.py). The paths differ only in how autograd sees that function:

    Reference          one autograd node per torch op; any layer can take it
    Fused              base and adapter in one `fused.BOnlyLinear` node
    Grouped            the sibling group's `grouped.GroupedBOnlyLinear`, one `A x` for all
    WithSidePath(p)    path p, plus the side path's merged links

`choose_path` picks one (its docstring says when); the layer keeps it as `layer.path` and
its forward is `layer.path(layer, x)`. The layer chooses again when what the choice
depends on changes through it (`SeedLoRALayer.refresh_path`): train()/eval() (adapter
dropout), the `fused` switch, the sibling group (any member's change re-chooses every
member), side-path mode on or off. A base made trainable from outside (`requires_grad_`)
counts from the next train()/eval() or `refresh_path()`. What a path cannot know in advance
it reads per call: autocast (a context, not a state of the layer) and whether the side path
holds any link yet.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .fused import BOnlyLinear
from .spec import ASpec

# The paths take a `SeedLoRALayer` (typed `Layer`: layer.py imports this module, so this
# module does not import it back).
Layer = nn.Module


def project(x: torch.Tensor, spec: ASpec, a: torch.Tensor | None) -> torch.Tensor:
    """`A x` over the last dimension: a slice/gather for block kinds, a matmul for gaussian.

    Block kinds never materialise A: a block A picks r input columns, so `A x` is a slice
    (a view of x) or, when the block wraps around n_in, an index_select.

    Args:
        x: (..., n_in), any float dtype and device.
        spec: the A-spec (block offset and columns for block kinds).
        a: dense A: (r, n_in) for the gaussian kind (cast to x's dtype here), None for
            block kinds.

    Returns:
        (..., r) in x's dtype, on x's device.
    """
    if a is not None:
        return F.linear(x, a.to(x.dtype))
    offset = spec.offset()
    if spec.contiguous():
        return x[..., offset : offset + spec.rank]
    return x.index_select(-1, spec.columns().to(x.device))


def outside_autocast(x: torch.Tensor) -> tuple[contextlib.AbstractContextManager, torch.dtype]:
    """(context, dtype) to run a fused node in: under autocast, autocast off and its dtype
    (the node casts x and W to it, as autocast would for a linear layer); else no change
    and x's dtype."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False), torch.get_autocast_dtype(device)
    return contextlib.nullcontext(), x.dtype


def frozen_operands(
    layer: Layer, x: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(s A)^T`: (n_in, r) in x's dtype for the gaussian kind, or a wrapping block's columns
    (r,) on x's device, else None: made once per dtype and device, kept until `set_spec`."""
    cache = layer._cast
    if layer.lora_A is not None:
        key = ("sa_t", x.device, x.dtype)
        if key not in cache:
            cache[key] = (layer.lora_A * layer.scaling).t().contiguous().to(x.dtype)
        return cache[key], None
    if layer._cols is not None:
        key = ("cols", x.device)
        if key not in cache:
            cache[key] = layer._cols.to(x.device)
        return None, cache[key]
    return None, None


class Path(Protocol):
    """`y = path(layer, x)`: x (..., n_in) -> (..., n_out), the layer's output."""

    def __call__(self, layer: Layer, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Reference:
    """`base(x) + s B (A dropout(x))` as plain torch ops, each recorded by autograd: the
    path every other one must match, and the only one for adapter dropout in training, a
    trainable base (it gets its gradient) or a quantized one (its own forward dequantizes).

    x: (..., n_in) in the base's dtype; y in the base output's dtype (h = s A x is formed
    in x's dtype, then B h in B's, float32 under a bf16 base).
    """

    def __call__(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        y = layer.base(x)
        h = project(layer.dropout(x), layer.spec, layer.lora_A) * layer.scaling
        return y + F.linear(h.to(layer.lora_B.dtype), layer.lora_B).to(y.dtype)


@dataclass(frozen=True)
class Fused:
    """`x W^T + bias + B (s A x)` in one `BOnlyLinear` node (seedlora/fused.py), W frozen.

    Computed in x's dtype, or under autocast in the autocast dtype with autocast off (x,
    W and bias cast once, as autocast would for a linear layer); y in that dtype.
    """

    def __call__(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        weight, bias = layer.base.weight, layer.base.bias
        if isinstance(layer.base, Conv1D):  # stored (n_in, n_out)
            weight = weight.t()
        context, dtype = outside_autocast(x)
        with context:
            x, weight = x.to(dtype), weight.to(dtype)
            if bias is not None:
                bias = bias.to(dtype)
            sa_t, cols = frozen_operands(layer, x)
            s = layer.spec
            return BOnlyLinear.apply(
                x, weight, bias, layer.lora_B, sa_t, cols, layer._offset, s.rank, layer.scaling
            )


@dataclass(frozen=True)
class Grouped:
    """This member's `x W_i^T + bias_i + B_i (s A_i x)` from its sibling group's one node
    (`SiblingGroup.output`, seedlora/grouped.py), in x's or the autocast dtype as `Fused`."""

    def __call__(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        context, dtype = outside_autocast(x)
        with context:
            return layer.group.output(layer, x, dtype)


@dataclass(frozen=True)
class WithSidePath:
    """`inner(x) + x A_cat^T B_cat^T`: the merged links kept beside the base (side-path
    mode), added in the side path's dtype (float32; float64 under a float64 base) and cast
    to the inner output's. An empty side path (no link merged yet) adds nothing."""

    inner: Path

    def __call__(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(layer, x)
        if len(layer.aside):
            y = y + layer.aside(x).to(y.dtype)
        return y


def choose_path(layer: Layer) -> Path:
    """The path for the layer's present state.

    - `Reference` unless the layer can fuse (`layer.fusable()`: `fused` on, no adapter
      dropout in training, a frozen float base);
    - else `Grouped` when it is in a sibling group whose every member can fuse;
    - else `Fused`;
    - wrapped in `WithSidePath` in side-path mode (`layer.aside` set).
    """
    group = layer.group
    if not layer.fusable():
        inner: Path = Reference()
    elif group is not None and all(m.fusable() for m in group.members):
        inner = Grouped()
    else:
        inner = Fused()
    return inner if layer.aside is None else WithSidePath(inner)
