"""Merged links kept beside a frozen base instead of inside it: a stacked low-rank side path.

A quantized base (bitsandbytes 4-bit or 8-bit) cannot take a merge `W0 += s B_bar A_c`
exactly: its weights are codes, and re-quantizing `Q(W0) + s B A` would round the link
away again. So a layer in *side-path mode* keeps its merged links as one frozen low-rank
path beside the base,

    y = base(x) + x A_cat^T B_cat^T          A_cat = [A_1; ...; A_k]        (k r x n_in)
                                             B_cat = [s_1 B_1 | ... | s_k B_k]  (n_out x k r)

which is `x (W + sum_j s_j B_j A_j)^T` for the base's own `W`, the same sum the dense
float master adds into its weights, with no rounding of the links into the base. The
stacked form is one pair of GEMMs of inner size k r, however long the chain: block kinds
(`[0 | I_r | 0]` at an offset) never make a dense A, their rows are an `index_select` of
x's columns, so `A_cat x` is a gather and B_cat is all that is multiplied.

The side path does not care what the base is: a plain `nn.Linear` (the CPU tests), or a
bitsandbytes layer. It holds the links' own factors too, so `fold` (export) merges them
densely into a float base with `merge_delta`, exactly as the dense master merges them.

Precision: the side path runs in its own dtype (float32; float64 under a float64 base),
with autocast off, and its output is cast to the base output's dtype: under bf16 it adds
the links at float32 accuracy to a bf16 base output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .spec import ASpec


def is_quantized(base: nn.Module) -> bool:
    """Whether a layer's weight is stored as codes (bitsandbytes 4-bit/8-bit), not floats.

    Duck-typed, so the core never imports bitsandbytes: `Params4bit` is uint8 and
    `Int8Params` int8, and neither can take an exact in-place merge.
    """
    weight = getattr(base, "weight", None)
    return weight is not None and not weight.is_floating_point()


class SidePath(nn.Module):
    """The merged links of one layer, applied as `x A_cat^T B_cat^T` (module docstring).

    Links are added in chain order with `add`; the stacked tensors are non-persistent
    buffers (never saved or sent: they are rebuilt from the links list like a dense base).

    Args:
        n_in, n_out: the layer's shape (nn.Linear orientation).
        dtype: the side path's compute dtype (float32, or float64 for exactness checks).
        device: where the stacked tensors live (the base's device).

    Attributes:
        a_cat: (k_g r, n_in) stacked gaussian A's, or None.
        b_dense: (n_out, k_g r) their scaled B's, s_j B_j side by side, or None.
        cols: (k_b r,) int64 input columns of the stacked block A's, or None.
        b_block: (n_out, k_b r) their scaled B's, or None.
        links: (spec, B, scale) of every link added, in order, for `fold`.
    """

    def __init__(self, n_in: int, n_out: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.dtype, self.device = dtype, torch.device(device)
        for name in ("a_cat", "b_dense", "cols", "b_block"):
            self.register_buffer(name, None, persistent=False)
        self.links: list[tuple[ASpec, torch.Tensor, float]] = []

    def __len__(self) -> int:
        return len(self.links)

    @property
    def rank(self) -> int:
        """k r: the inner size of the stacked path (the sum of the links' ranks)."""
        return sum(spec.rank for spec, _, _ in self.links)

    @torch.no_grad()
    def add(self, spec: ASpec, b: torch.Tensor, scaling: float) -> None:
        """Append one link `(A_c, B_bar_c)` with scale `scaling` (`spec.scaling(alpha)`).

        Args:
            spec: describes A_c: (r, n_in); its shape must be the layer's.
            b: B_bar_c: (n_out, r), any float dtype and device; kept as given for `fold`,
                and stacked as `scaling * B` in the side path's dtype on its device.
            scaling: s_c = `spec.scaling(alpha)`.
        """
        shape = (self.n_in, self.n_out)
        if (spec.n_in, spec.n_out) != shape:
            raise ValueError(f"spec shape {(spec.n_in, spec.n_out)} != layer {shape}")
        if tuple(b.shape) != (self.n_out, spec.rank):
            raise ValueError(f"B shape {tuple(b.shape)} != {(self.n_out, spec.rank)}")
        sb = b.detach().to(self.device, self.dtype) * scaling
        if spec.is_block:
            cols = spec.columns().to(self.device)
            self.cols = cols if self.cols is None else torch.cat([self.cols, cols])
            self.b_block = sb if self.b_block is None else torch.cat([self.b_block, sb], 1)
        else:
            a = spec.dense().to(self.device, self.dtype)
            self.a_cat = a if self.a_cat is None else torch.cat([self.a_cat, a], 0)
            self.b_dense = sb if self.b_dense is None else torch.cat([self.b_dense, sb], 1)
        self.links.append((spec, b.detach(), float(scaling)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x A_cat^T B_cat^T` in the side path's dtype, autocast off.

        Args:
            x: (..., n_in), any float dtype, on the side path's device.

        Returns:
            (..., n_out) in the side path's dtype; zeros-free: callers skip an empty path.
        """
        with torch.autocast(x.device.type, enabled=False):
            out = None
            if self.cols is not None:
                h = x.index_select(-1, self.cols).to(self.dtype)
                out = F.linear(h, self.b_block)
            if self.a_cat is not None:
                h = F.linear(x.to(self.dtype), self.a_cat)
                dense = F.linear(h, self.b_dense)
                out = dense if out is None else out + dense
        assert out is not None, "an empty side path is never applied"
        return out

    def delta_weight(self) -> torch.Tensor:
        """The dense sum `B_cat A_cat` = `sum_j s_j B_j A_j`: (n_out, n_in), for checks."""
        delta = torch.zeros(self.n_out, self.n_in, dtype=self.dtype, device=self.device)
        if self.cols is not None:
            delta.index_add_(1, self.cols, self.b_block)
        if self.a_cat is not None:
            delta += self.b_dense @ self.a_cat
        return delta

    def clear(self) -> None:
        """Forget every link (after `fold`, or to rebuild from another links list)."""
        self.a_cat = self.b_dense = self.cols = self.b_block = None
        self.links = []

    def _apply(self, fn, recurse: bool = True):  # keep `device`/`dtype` in step with .to()
        out = super()._apply(fn, recurse)
        probe = next((t for t in (self.a_cat, self.b_dense, self.b_block) if t is not None), None)
        if probe is not None:
            self.device, self.dtype = probe.device, probe.dtype
        else:
            self.device = fn(torch.empty(0, dtype=self.dtype, device=self.device)).device
        return out

    def extra_repr(self) -> str:
        return f"links={len(self.links)}, rank={self.rank}, dtype={self.dtype}"
