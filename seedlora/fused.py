"""The fast path: base layer and B-only adapter in one autograd node.

    y = x W^T + bias + (s B) (A x)          s = alpha / r,  A frozen,  W frozen

Because A and W are frozen, backward needs no copy of x at all (autograd keeps none for a
frozen linear either): only W and the r-dimensional `h = A x`, which is r/n_in of x:

    dB = s * dy^T h          dx = dy W  +  (dy (s B)) A

The straightforward path (`SeedLoRALayer.forward_reference`) lets autograd record each
op: a cast of B's output to float32 and back, a separate add, and for block kinds a
`slice_backward` that allocates a zero tensor the size of x per layer just to place r
columns. Here the adapter's output is accumulated into the base output by one GEMM
(`addmm_` with beta = 1) with the scale folded into B, and dx gets its r block columns
added in place (`index_add_`) or one `addmm_` with A (gaussian). Results equal the
reference path's up to float rounding (a test compares outputs and gradients).
"""

from __future__ import annotations

import torch


def _project(x2: torch.Tensor, a: torch.Tensor | None, cols: torch.Tensor | None, off: int, r: int):
    """`A x` for 2-D x: a matmul (gaussian), a strided view (block), a gather (wrapped block)."""
    if a is not None:
        return x2 @ a.t()
    if cols is None:
        return x2[:, off : off + r]
    return x2.index_select(1, cols)


class BOnlyLinear(torch.autograd.Function):
    """`x W^T + bias + s B A x` with gradients for x and B only (W, bias, A frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias, b, a, cols, offset, rank, scaling):  # noqa: D102
        n_out, n_in = weight.shape
        x2 = x.reshape(-1, n_in)
        h = _project(x2, a, cols, offset, rank)
        sb = (b * scaling).to(x.dtype)  # n_out x r: the scale costs nothing here
        y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
        y.addmm_(h, sb.t())
        # A block `h` is a view of x: keep a compact copy, never x's whole storage.
        ctx.save_for_backward(weight, sb, a, cols, h if a is not None else h.contiguous())
        ctx.meta = (offset, rank, scaling, b.dtype)
        return y.view(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        weight, sb, a, cols, h = ctx.saved_tensors
        offset, rank, scaling, b_dtype = ctx.meta
        gy = grad.reshape(-1, weight.shape[0])
        gx = gb = None
        if ctx.needs_input_grad[3]:
            gb = (gy.t() @ h).to(b_dtype).mul_(scaling)
        if ctx.needs_input_grad[0]:
            gh = gy @ sb  # T x r
            gx = gy @ weight
            if a is not None:
                gx.addmm_(gh, a)
            elif cols is None:
                gx[:, offset : offset + rank] += gh
            else:
                gx.index_add_(1, cols, gh)
            gx = gx.view(*grad.shape[:-1], weight.shape[1])
        return gx, None, None, gb, None, None, None, None, None
