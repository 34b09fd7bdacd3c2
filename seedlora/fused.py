"""The fast path: base layer and B-only adapter in one autograd node.

    y = x W^T + bias + B (s A x)          s = spec.scaling(alpha),  A frozen,  W frozen

(s = alpha / r for the block kinds, alpha / sqrt(r n_in) for the gaussian kind: spec.py.)

Because A and W are frozen, backward needs no copy of x (autograd keeps none for a frozen
linear either): only W, B and the r-dimensional `h = s A x`, which is r/n_in of x:

    dB = dy^T h          dx = dy W  +  s (dy B) A

The straightforward path (`paths.Reference`) lets autograd record each op:
casts of the adapter output to float32 and back, a separate add, and for block kinds a
`slice_backward` that allocates a zero tensor the size of x per layer to place r columns.
Here the adapter output is accumulated into the base output by one GEMM (`addmm_`, beta 1),
the scale is folded into the frozen A (gaussian) or into the one copy of h that backward
keeps (block), and dx gets its r block columns added in place, or one `addmm_` with A.
The step is short of host work too: on a GPU a small model's step is bound by how fast
Python issues kernels, so every op this node does not issue is time saved.
"""

from __future__ import annotations

from typing import Any

import torch


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t`: (..., n) as a 2-D (tokens, n) matrix, a view when it can be."""
    return t.view(-1, n) if t.is_contiguous() else t.reshape(-1, n)


class BOnlyLinear(torch.autograd.Function):
    """`x W^T + bias + B h`, `h = s A x`, with gradients for x and B only.

    Called by `paths.Fused` as `BOnlyLinear.apply(x, weight, bias, b, sa_t, cols, offset,
    rank, scaling)`; the caller casts the frozen tensors to x's dtype once.

    Args:
        x: (..., n_in), the compute dtype (bf16/fp16/fp32).
        weight: W: (n_out, n_in), nn.Linear orientation (a Conv1D weight transposed), in
            x's dtype, on x's device, frozen.
        bias: (n_out,) in x's dtype, or None.
        b: B: (n_out, r), the trained parameter, any float dtype (float32 master copy);
            cast to x's dtype for the GEMMs, its gradient returned in its own dtype.
        sa_t: `(s A)^T`: (n_in, r) in x's dtype for the gaussian kind, else None.
        cols: the block's input columns, int64 (r,) on x's device, for a block that wraps
            around n_in; else None.
        offset: the first column of a contiguous block (used when `sa_t` and `cols` are
            None).
        rank: r.
        scaling: s = `spec.scaling(alpha)`.

    Returns:
        y: (..., n_out) in x's dtype. Backward gives dx: (..., n_in) and dB: (n_out, r).
    """

    @staticmethod
    def forward(  # noqa: D102
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        b: torch.Tensor,
        sa_t: torch.Tensor | None,
        cols: torch.Tensor | None,
        offset: int,
        rank: int,
        scaling: float,
    ) -> torch.Tensor:
        n_out, n_in = weight.shape
        x2 = _rows(x, n_in)
        if sa_t is not None:
            h = torch.mm(x2, sa_t)
        elif cols is None:
            h = torch.mul(x2[:, offset : offset + rank], scaling)
        else:
            h = torch.mul(x2.index_select(1, cols), scaling)
        bc = b if b.dtype == x.dtype else b.to(x.dtype)
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else torch.mm(x2, weight.t())
        y.addmm_(h, bc.t())
        ctx.save_for_backward(weight, bc, sa_t, cols, h)
        ctx.meta = (offset, rank, scaling, b.dtype)
        return y.view(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        weight, bc, sa_t, cols, h = ctx.saved_tensors
        offset, rank, scaling, b_dtype = ctx.meta
        gy = _rows(grad, weight.shape[0])
        gx = gb = None
        if ctx.needs_input_grad[3]:
            gb = torch.mm(gy.t(), h)
            if gb.dtype != b_dtype:
                gb = gb.to(b_dtype)
        if ctx.needs_input_grad[0]:
            gh = torch.mm(gy, bc)  # tokens x r
            gx = torch.mm(gy, weight)
            if sa_t is not None:
                gx.addmm_(gh, sa_t.t())
            elif cols is None:
                gx[:, offset : offset + rank].add_(gh, alpha=scaling)
            else:
                gx.index_add_(1, cols, gh, alpha=scaling)
            gx = gx.view(*grad.shape[:-1], weight.shape[1])
        return gx, None, None, gb, None, None, None, None, None
