"""Sibling layers that read the same input, as one autograd node with one `A x`.

In a decoder block q_proj, k_proj and v_proj are called on the same hidden state, and
gate_proj and up_proj on the same normed state. Each member i of such a group computes

    y_i = x W_i^T + bias_i + B_i h_i,        h_i = s A_i x

so the group stacks the frozen A's, `A_cat = [A_1; ...; A_k]` (R = sum r_i rows), and forms
`H = s A_cat x` once: one GEMM of rank R for the gaussian kind, one gather (or a slice,
when every member picks the same columns, as the circulant kind does at one chain index)
for block kinds. Backward is the sum over members of `fused.BOnlyLinear`'s:

    dB_i = dy_i^T H_i        dx = sum_i dy_i W_i  +  s [dy_1 B_1 | ... | dy_k B_k] A_cat

(the last term one GEMM of rank R, or one index_add_). One node replaces k, and 2(k-1)
small GEMMs (or gathers) go: on a GPU where the step waits on the host, every op not
issued is time saved.

How the group sees its input: the first member called on x computes every member's
output and keeps the others' until they are called on the same tensor (same object, same
version, B and W unchanged since); any other call recomputes. So a model that calls
siblings on different tensors, or one member alone, still gets exact outputs (at the cost
of the unused members' work). `group_siblings(model)` finds groups by name (siblings in
one parent module named in one of `SIBLINGS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .fused import _rows

# Names of Linear layers that one parent module calls on the same tensor (HF Llama, Qwen2,
# Mistral, Gemma attention and MLP; BERT-style self-attention).
SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
)


@dataclass
class Plan:
    """What the grouped node needs besides x and the B's, in x's dtype and on x's device.

    Attributes:
        weights: W_i: (n_out_i, n_in) per member, frozen, in the base's dtype (the node
            casts to x's per call, as autocast would, so no second copy stays resident).
        biases: bias_i: (n_out_i,) or None per member, likewise.
        sa_t: `(s A_cat)^T`: (n_in, R) for the gaussian kind, else None.
        cols: block columns of every member, int64 (R,), or (r,) when `shared`; None when
            a shared block is a contiguous slice.
        offset: first column of that slice.
        spans: member i reads `H[:, a_i:b_i]`.
        shared: every member has the same block columns (H has r columns, not R).
        scaling: s = `spec.scaling(alpha)` (the same for every member: `groupable`).
    """

    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    sa_t: torch.Tensor | None
    cols: torch.Tensor | None
    offset: int
    spans: list[tuple[int, int]]
    shared: bool
    scaling: float


def _project(x2: torch.Tensor, plan: Plan) -> torch.Tensor:
    """H = s A_cat x: (tokens, R) (or (tokens, r) when `plan.shared`)."""
    if plan.sa_t is not None:
        return torch.mm(x2, plan.sa_t)
    if plan.cols is None:
        a, b = plan.spans[0]
        return torch.mul(x2[:, plan.offset : plan.offset + b - a], plan.scaling)
    return torch.mul(x2.index_select(1, plan.cols), plan.scaling)


class GroupedBOnlyLinear(torch.autograd.Function):
    """Every member's `x W_i^T + bias_i + B_i h_i` from one `H = s A_cat x` (module docstring).

    Called as `GroupedBOnlyLinear.apply(x, plan, b_1, ..., b_k)`: x (..., n_in) in the
    compute dtype, B_i (n_out_i, r_i) in any float dtype (their gradients come back in it).
    Returns the k outputs (..., n_out_i) in x's dtype.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, plan: Plan, *bs: torch.Tensor) -> tuple:  # noqa: D102
        n_in = plan.weights[0].shape[1]
        x2 = _rows(x, n_in)
        h = _project(x2, plan)
        bcs = [b if b.dtype == x.dtype else b.to(x.dtype) for b in bs]
        ws = [w if w.dtype == x.dtype else w.to(x.dtype) for w in plan.weights]
        biases = [c if c is None or c.dtype == x.dtype else c.to(x.dtype) for c in plan.biases]
        ys = []
        for w, bias, bc, (a, e) in zip(ws, biases, bcs, plan.spans, strict=True):
            y = torch.addmm(bias, x2, w.t()) if bias is not None else torch.mm(x2, w.t())
            y.addmm_(h[:, a:e], bc.t())
            ys.append(y.view(*x.shape[:-1], w.shape[0]))
        ctx.save_for_backward(h, *ws, *bcs)
        ctx.plan = plan
        ctx.b_dtypes = [b.dtype for b in bs]
        return tuple(ys)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:  # noqa: D102
        h, *saved = ctx.saved_tensors
        plan: Plan = ctx.plan
        ws, bcs = saved[: len(saved) // 2], saved[len(saved) // 2 :]
        used = [i for i, g in enumerate(grads) if g is not None]
        gys = {i: _rows(grads[i], ws[i].shape[0]) for i in used}
        gbs: list[torch.Tensor | None] = [None] * len(bcs)
        for i in used:
            if ctx.needs_input_grad[2 + i]:
                a, e = plan.spans[i]
                gb = torch.mm(gys[i].t(), h[:, a:e])
                gbs[i] = gb if gb.dtype == ctx.b_dtypes[i] else gb.to(ctx.b_dtypes[i])
        gx = None
        if ctx.needs_input_grad[0] and used:
            gx = torch.mm(gys[used[0]], ws[used[0]])
            for i in used[1:]:
                gx.addmm_(gys[i], ws[i])
            if plan.shared:
                gh = torch.mm(gys[used[0]], bcs[used[0]])
                for i in used[1:]:
                    gh.addmm_(gys[i], bcs[i])
            else:
                parts = [
                    torch.mm(gys[i], bcs[i])
                    if i in gys
                    else h.new_zeros(h.shape[0], bcs[i].shape[1])
                    for i in range(len(bcs))
                ]
                gh = torch.cat(parts, dim=1)
            if plan.sa_t is not None:
                gx.addmm_(gh, plan.sa_t.t())
            elif plan.cols is None:
                gx[:, plan.offset : plan.offset + gh.shape[1]].add_(gh, alpha=plan.scaling)
            else:
                gx.index_add_(1, plan.cols, gh, alpha=plan.scaling)
            gx = gx.view(*grads[used[0]].shape[:-1], gx.shape[1])
        return (gx, None, *gbs)


class SiblingGroup:
    """Layers called on one tensor, run as one `GroupedBOnlyLinear` node.

    Each member (a `SeedLoRALayer`) holds this object as `group`; its forward asks
    `output(layer, x)`. Outputs computed for members not yet called wait in `pending`,
    keyed by member, with the versions of x, the B's and the W's they were made from.
    """

    def __init__(self, members: Sequence[nn.Module]):
        self.members = list(members)  # looked up by identity: a deepcopy stays consistent
        self._plans: dict[tuple, tuple[tuple, Plan]] = {}
        self._x: torch.Tensor | None = None
        self._stamp: tuple = ()
        self._pending: dict[int, torch.Tensor] = {}

    def _versions(self, x: torch.Tensor) -> tuple:
        return (
            x._version,
            *(m.lora_B._version for m in self.members),
            *(m.base.weight._version for m in self.members),
        )

    def plan(self, x: torch.Tensor) -> Plan:
        """The members' (s A)^T or block columns in x's dtype on x's device, built once per
        A-specs (a new chain index makes new specs) and kept."""
        specs = tuple(m.spec for m in self.members)
        key = (x.device, x.dtype)
        hit = self._plans.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], specs, strict=True)):
            return hit[1]
        self._plans[key] = (specs, plan := self._build(x.device, x.dtype))
        return plan

    def _build(self, device: torch.device, dtype: torch.dtype) -> Plan:
        ms = self.members
        spans, start = [], 0
        for m in ms:
            spans.append((start, start + m.spec.rank))
            start += m.spec.rank
        weights = [m.base.weight for m in ms]
        biases = [m.base.bias for m in ms]
        scaling = ms[0].scaling
        if ms[0].lora_A is not None:
            a_cat = torch.cat([m.lora_A for m in ms], dim=0)
            sa_t = (a_cat * scaling).t().contiguous().to(device, dtype)
            return Plan(weights, biases, sa_t, None, 0, spans, False, scaling)
        columns = [m.spec.columns() for m in ms]
        if all(torch.equal(c, columns[0]) for c in columns):
            r = ms[0].spec.rank
            spec = ms[0].spec
            cols = None if spec.contiguous() else columns[0].to(device)
            return Plan(
                weights, biases, None, cols, spec.offset(), [(0, r)] * len(ms), True, scaling
            )
        cols = torch.cat(columns).to(device)
        return Plan(weights, biases, None, cols, 0, spans, False, scaling)

    def output(self, member: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`member`'s output on x: (..., n_in), computed in `dtype`, from the group's node.

        Sharing is decided on x as the model passed it (before any cast), so a float32 x
        under bf16 autocast is cast once for the whole group.
        """
        i = next(j for j, m in enumerate(self.members) if m is member)
        if self._x is x and i in self._pending and self._stamp == self._versions(x):
            y = self._pending.pop(i)
            if not self._pending:
                self._x = None
            return y
        xc = x if x.dtype == dtype else x.to(dtype)
        ys = GroupedBOnlyLinear.apply(xc, self.plan(xc), *(m.lora_B for m in self.members))
        self._x, self._stamp = x, self._versions(x)
        self._pending = {j: y for j, y in enumerate(ys) if j != i}
        return ys[i]

    def clear(self) -> None:
        """Drop waiting outputs and cached tensors (after a merge or a dtype change)."""
        self._x, self._pending, self._plans = None, {}, {}


def groupable(layers: Sequence[nn.Module]) -> bool:
    """Whether layers can share a node: nn.Linear bases of one input size, one scale, one
    device, all gaussian or all block kinds."""
    first = layers[0]
    return len(layers) > 1 and all(
        isinstance(m.base, nn.Linear)
        and m.base.in_features == first.base.in_features
        and m.scaling == first.scaling
        and m.spec.is_block == first.spec.is_block
        and m.base.weight.device == first.base.weight.device
        for m in layers
    )


def _b_only(module: nn.Module | None) -> bool:
    """A `SeedLoRALayer` (known by its `fusable` check: layer.py imports this module)."""
    return callable(getattr(module, "fusable", None))


def group_siblings(
    model: nn.Module, siblings: Sequence[Sequence[str]] = SIBLINGS
) -> list[list[str]]:
    """Give the B-only adapters that one parent calls on one tensor a shared `SiblingGroup`.

    Layers already grouped together keep their group (and its plans): calling this every
    round changes nothing, so a CUDA graph captured over the group's tensors stays valid.

    Args:
        model: a model with `SeedLoRALayer`s (from `inject`).
        siblings: name sets; children of one parent named in one set form a group.

    Returns:
        The groups made, as lists of full module names.
    """
    made = []
    for parent_name, parent in model.named_modules():
        children = dict(parent.named_children())
        for names in siblings:
            found = [(n, children[n]) for n in names if _b_only(children.get(n))]
            layers = [m for _, m in found]
            if len(found) < 2 or not groupable(layers):
                continue
            if not _grouped_as(layers):
                group = SiblingGroup(layers)
                for layer in layers:
                    layer.group = group
            made.append([f"{parent_name}.{n}" if parent_name else n for n, _ in found])
    return made


def _grouped_as(layers: Sequence[nn.Module]) -> bool:
    """Whether `layers` already share one group of exactly these members."""
    group = layers[0].group
    return (
        group is not None
        and len(group.members) == len(layers)
        and all(m is x and x.group is group for m, x in zip(group.members, layers, strict=True))
    )


def ungroup(model: nn.Module) -> None:
    """Every adapter back to its own node."""
    for module in model.modules():
        if getattr(module, "group", None) is not None:
            module.group = None
