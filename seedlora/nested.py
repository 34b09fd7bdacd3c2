"""Exact heterogeneous ranks: a client of rank r_i trains the first r_i rows of the SAME A.

A is drawn once at the run's rank r_max and sliced (never regenerated at r_i): the
gaussian A_i = A[:r_i], and for the block kinds the first r_i columns of the r_max-wide
block (its offset is the r_max one). Every client uses the r_max spec's scale s (alpha/r_max
for the block kinds, alpha / sqrt(r_max n_in) for gaussian: `ASpec.scaling` at r_max), so

    s B_i A[:r_i] = s pad(B_i) A,

where pad fills the missing columns with the global B's (zero at a fresh chain index). The
server pads each reply to r_max and averages as usual; the mean of the padded B's times A
is the mean of the clients' weight updates, to float rounding. Upload is n_out * r_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layer import SeedLoRALayer, merge_delta
from .spec import ASpec


@dataclass(frozen=True)
class NestedSpec(ASpec):
    """Rows `first .. first + rank` of the A of `full_rank` (same seed, same block offset).

    Slicing, never redrawing at the smaller rank, is what keeps heterogeneous ranks exact:
    every client's A is part of the one r_max A.

    Attributes (besides `ASpec`'s, whose `rank` is the slice's r_i):
        full_rank: r_max, the rank A is drawn at.
        first: the first row of the slice.
    """

    full_rank: int = 0
    first: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.first >= 0 and self.first + self.rank <= self.full_rank):
            raise ValueError(
                f"rank: rows {self.first}..{self.first + self.rank} outside 0..{self.full_rank}"
            )

    def full(self) -> ASpec:
        """The r_max spec this one is a slice of."""
        s = self
        return ASpec(s.kind, s.seed, s.chain_index, s.full_rank, s.layer, s.n_in, s.n_out)

    @property
    def std(self) -> float:
        """The r_max spec's std, 1/sqrt(r_max): the slice keeps the full A's entries."""
        return self.full().std

    def scaling(self, alpha: float) -> float:
        """The r_max spec's scale, (alpha / r_max) * gain(r_max): every slice shares it."""
        return self.full().scaling(alpha)

    def offset(self) -> int:
        """First column of this slice of the r_max block (block kinds only)."""
        return (self.full().offset() + self.first) % self.n_in

    def dense(self) -> torch.Tensor:
        """A[first : first + rank] of the r_max A: (rank, n_in), float32 on the CPU."""
        if self.kind == "gaussian":
            return self.full().dense()[self.first : self.first + self.rank].contiguous()
        return super().dense()


def nested(spec: ASpec, rank: int, first: int = 0) -> NestedSpec:
    """The slice of rows `first .. first + rank` of `spec`'s A."""
    s = spec
    return NestedSpec(s.kind, s.seed, s.chain_index, rank, s.layer, s.n_in, s.n_out, s.rank, first)


@torch.no_grad()
def shrink(model: nn.Module, rank: int) -> None:
    """Turn every r_max adapter (with the global B loaded) into a rank-`rank` one.

    The global B's columns beyond `rank` are frozen for this client: their part
    `s B[:, rank:] A[rank:]` is folded into the base weight, and only the first `rank`
    columns stay trainable, against A[:rank] at the same scale s (the r_max spec's).
    Each `lora_B` becomes a new parameter B[:, :rank]: (n_out, rank), same dtype and
    device. Adapters already at rank <= `rank` (and swapped-role ones) are left as they are.
    """
    for module in model.modules():
        if not isinstance(module, SeedLoRALayer) or rank >= module.spec.rank:
            continue
        spec, scaling = module.spec, module.scaling
        if rank <= 0:
            raise ValueError(f"rank: a client rank must be >= 1, got {rank}")
        b = module.lora_B.detach().clone()
        tail = nested(spec, spec.rank - rank, first=rank)
        merge_delta(module.base, tail, b[:, rank:], scaling)
        module.set_spec(nested(spec, rank))
        module.lora_B = nn.Parameter(b[:, :rank].contiguous())
        module.scaling = scaling


def rank_axis(name: str) -> int | None:
    """The rank axis of a trained factor named like a state key (None: not a factor).

    A trained B (n_out x r) has it last; a trained A (r x n_in, swapped roles) first.
    """
    if name.endswith("lora_B"):
        return 1
    if name.endswith("lora_A"):
        return 0
    return None


def pad_rank(small: torch.Tensor, reference: torch.Tensor, axis: int) -> torch.Tensor:
    """`reference` with its first `small.shape[axis]` slices along `axis` replaced by `small`.

    With `reference` the global factor the client started from, this is the global factor
    plus the client's update zero-padded to full rank.

    Args:
        small: a client's factor at rank r_i, e.g. B_i: (n_out, r_i).
        reference: the global factor at r_max, e.g. B: (n_out, r_max); the other axes
            match `small`.
        axis: the rank axis (`rank_axis`: 1 for B, 0 for a trained A).

    Returns:
        A new tensor of `reference`'s shape, dtype and device.
    """
    out = reference.clone()
    out.narrow(axis, 0, small.shape[axis]).copy_(small)
    return out
