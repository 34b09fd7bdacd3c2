"""The A-spec: the small public description from which every party derives a frozen A.

A is never sent. Server and clients rebuild it from `(kind, seed, chain_index, rank,
layer, shape)`, so it must be bit-identical everywhere: the gaussian entries and the
random block's offset come from an integer stream seeded by a sha256 of the spec (never
the global RNG, never Python's salted `hash`), turned into normals with integer and
exactly rounded float64 operations only (seedlora/draws.py), and only then cast to float32
and moved. The rule that derivation follows is `A_RULE`; links, checkpoints and A digests
record it, and a record made under another rule is refused (`check_a_rule`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from .draws import below, normals
from .names import A_RULE, BLOCK_KINDS, KINDS, SCALE_RULE, Kind  # noqa: F401 - re-exported


def derive_seed(*parts: object) -> int:
    """A 63-bit generator seed from a canonical string: stable across processes and OSes."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


# How A is derived from its spec (`A_RULE`, seedlora/names.py), recorded in every link,
# checkpoint and A digest that depends on it. A record without one was made under
# `LEGACY_A_RULE`: torch.Generator's `randn` (whose float32 math follows the CPU's SIMD
# path) and `randint` for the random block.
LEGACY_A_RULE = "torch-v1"
RULED_KINDS: tuple[str, ...] = ("gaussian", "random-block")  # circulant draws nothing


class ARuleError(ValueError):
    """A link, checkpoint or reply made under another A rule: its A's are not ours."""


def check_a_rule(
    rule: str | None,
    kinds: Iterable[str],
    what: str,
    remedy: str = "run one seedlora version on the server and every client",
) -> None:
    """Refuse `what` (a link, a checkpoint) made under `rule` (None or "": no record, so the
    legacy rule) when it has a kind whose A depends on the rule (`RULED_KINDS`).

    Raises:
        ARuleError: naming both rules and `remedy`, what the reader should do.
    """
    rule = rule or LEGACY_A_RULE
    ruled = sorted(set(kinds) & set(RULED_KINDS))
    if rule != A_RULE and ruled:
        raise ARuleError(
            f"{what} was made under A rule {rule!r}, but this seedlora derives "
            f"{' and '.join(ruled)} A's under A rule {A_RULE!r}: its A's differ, so its links "
            f"would rebuild to another base; {remedy}"
        )


# `SCALE_RULE` (seedlora/names.py) is the rule `ASpec.scaling` follows, recorded in every
# checkpoint: links merged under another rule rebuild to another base, so a run resumes
# only under the rule it was started with. Before it (no record) the scale was alpha / r
# for every kind; for block kinds gain = 1, so only a gaussian factor's links differ.


@dataclass(frozen=True)
class ASpec:
    """Everything needed to derive the frozen A (r x n_in) of one layer at one chain index.

    gaussian:     A_ij ~ N(0, 1/r) from the seeded draws (std 1/sqrt(r), the choice of
                  asymmetric LoRA and RAC-LoRA); used at the scale `scaling(alpha)`, which
                  brings its rows to unit norm like the block kinds' (see `gain`).
    circulant:    A = [0 | I_r | 0] starting at column (chain_index * r) mod n_in (c3LA).
    random-block: A = [0 | I_r | 0] at a seeded column offset, a multiple of r (r-c3LA):
                  block floor(w n_b / 2^64) of the n_b = ceil(n_in / r), w the spec's
                  first stream word (`draws.below`).
    Block columns wrap around modulo n_in, so every column is reachable.

    Attributes:
        kind: one of `KINDS`.
        seed: the run's seed.
        chain_index: c, the position in the chain.
        rank: r.
        layer: the adapted module's full name (part of the seeded draws).
        n_in: A's columns (the layer's input size; its output size for a frozen B^T);
            `rank` must not exceed it (the identity block and the gaussian rows need r
            independent columns). The trained factor has no such limit: a Linear(100, 1)
            takes r = 10 with B trained (B is 1 x 10).
        n_out: the other side of the layer, for shape checks.
    """

    kind: Kind
    seed: int
    chain_index: int
    rank: int
    layer: str
    n_in: int
    n_out: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"a-kind: unknown kind {self.kind!r}; expected one of {KINDS}")
        if self.rank <= 0:
            raise ValueError(f"rank: must be > 0, got {self.rank}")
        if self.rank > self.n_in:  # the frozen factor is r x n_in; the trained one any size
            raise ValueError(
                f"rank: {self.rank} exceeds the frozen factor's side {self.n_in} in layer "
                f"{self.layer!r} (r <= n_in with B trained, r <= n_out with A trained)"
            )
        if self.chain_index < 0:
            raise ValueError(f"chain_index: must be >= 0, got {self.chain_index}")

    @property
    def is_block(self) -> bool:
        """True for the block kinds, whose A is never materialised in training."""
        return self.kind in BLOCK_KINDS

    @property
    def std(self) -> float:
        """Gaussian entry std: 1/sqrt(r) (the asymmetric-LoRA / RAC-LoRA choice)."""
        return 1.0 / math.sqrt(self.rank)

    @property
    def gain(self) -> float:
        """The factor that makes a gaussian A act like a block A: sqrt(r / n_in) (1 for blocks).

        A block A's rows are unit vectors e_j, so a step dB moves W by dB A with
        ||dB A|| = ||dB||. A gaussian row has E||a||^2 = n_in * (1/r), so the same step
        moved W sqrt(n_in/r) times further (x4.9 to x9.8 on the embedded model at r = 8),
        and a learning rate tuned on blocks diverged. Applying gain at use (A itself, and so
        its digest, is unchanged) gives the rows of gain * A unit norm in expectation, so
        one default learning rate fits every kind. With swapped roles `n_in` is the layer's
        n_out and the same argument holds for B's columns.
        """
        return 1.0 if self.is_block else math.sqrt(self.rank / self.n_in)

    def scaling(self, alpha: float) -> float:
        """The adapter's scale s in `W = W0 + s B A`: (alpha / r) * gain.

        Every use of A goes through it: the layer's forward, merges, links and the PEFT
        export, so a link rebuilds to the same W everywhere.
        """
        return alpha / self.rank * self.gain

    def next(self) -> ASpec:
        """The spec of the same layer at the next chain index."""
        return replace(self, chain_index=self.chain_index + 1)

    def offset(self) -> int:
        """First column of the identity block (block kinds only)."""
        if self.kind == "circulant":
            return (self.chain_index * self.rank) % self.n_in
        if self.kind == "random-block":
            num_blocks = math.ceil(self.n_in / self.rank)
            key = derive_seed("random-block", self.seed, self.chain_index, self.layer)
            return below(key, num_blocks) * self.rank
        raise ValueError(f"a-kind: {self.kind!r} has no block offset")

    def columns(self) -> torch.Tensor:
        """Input columns picked by a block A: int64 (r,) on the CPU, wrapping modulo n_in."""
        return (self.offset() + torch.arange(self.rank)) % self.n_in

    def contiguous(self) -> bool:
        """True when the block needs no wrap, so `A x` is a plain slice."""
        return self.offset() + self.rank <= self.n_in

    def dense(self) -> torch.Tensor:
        """A: (r, n_in), float32 on the CPU; callers cast and move it.

        Gaussian: z = `draws.normals` of the spec's key, r * n_in of them in row-major
        order, and A = float32(z * std) (float64 product, one rounding each), so it is
        bit-identical everywhere. Block kinds only build it for export and checks.
        """
        if self.kind == "gaussian":
            key = derive_seed("gaussian", self.seed, self.chain_index, self.layer)
            z = normals(key, self.rank * self.n_in).reshape(self.rank, self.n_in)
            return torch.from_numpy((z * self.std).astype("float32"))
        a = torch.zeros((self.rank, self.n_in), dtype=torch.float32)
        a[torch.arange(self.rank), self.columns()] = 1.0
        return a

    def digest(self) -> str:
        """sha256 of the spec and of A itself: equal digests mean equal A, bit for bit."""
        h = hashlib.sha256(repr(self).encode())
        h.update(self.dense().numpy().tobytes())
        return h.hexdigest()
