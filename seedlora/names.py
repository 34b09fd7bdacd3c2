"""The names a run config chooses from (methods, A kinds, upload codecs), without torch.

They live here so that validating a run config (contract/config.py, the launcher's
check) imports no tensor library; `methods`, `spec` and `compress` re-export them.
"""

from __future__ import annotations

from typing import Literal

Method = Literal["seedlora", "seedcore", "ffa", "fedit", "full"]
CHAINED: frozenset[str] = frozenset({"seedlora", "seedcore"})  # A moves on with the chain index
B_ONLY: frozenset[str] = frozenset({"seedlora", "ffa"})  # one trained factor, B (or A)
# the trained factor merges exactly into the base, as a link
LINKED: frozenset[str] = frozenset({*B_ONLY, "seedcore"})

Kind = Literal["gaussian", "circulant", "random-block"]
KINDS: tuple[str, ...] = ("gaussian", "circulant", "random-block")
BLOCK_KINDS: tuple[str, ...] = ("circulant", "random-block")
KindSetting = Literal["auto", "gaussian", "circulant", "random-block"]  # auto: the method's

Codec = Literal["float32", "float16", "bfloat16", "int8"]
CODECS: tuple[str, ...] = ("float32", "float16", "bfloat16", "int8")


def method_kind(method: str, kind: str | None = None) -> str:
    """The frozen factor's kind `method` uses: `kind`, or the method's own when None or
    "auto" (seedlora: circulant; ffa and seedcore: gaussian, since a block A0 and B0 would
    train only an r x r block of W per link). ffa refuses any kind but gaussian."""
    if kind == "auto":
        kind = None
    if method == "ffa":
        if kind not in (None, "gaussian"):
            raise ValueError(
                f"a-kind: ffa (FFA-LoRA) trains B on one fixed gaussian A; got {kind!r} "
                "(pass kind=None or 'gaussian', or use method seedlora for block kinds)"
            )
        return "gaussian"
    if kind is None:
        return "gaussian" if method == "seedcore" else "circulant"
    return kind


def valid_device_name(name: str) -> bool:
    """Whether `name` is a device setting: auto | cpu | cuda | cuda:N."""
    if name in ("auto", "cpu", "cuda"):
        return True
    return name.startswith("cuda:") and name[5:].isdigit()


def rank_limit(method: str, frozen_factor: str, n_in: int, n_out: int) -> int | None:
    """The largest rank `method` can adapt a layer `n_in -> n_out` with, or None for any.

    A seeded factor is r x (its side) with r independent rows (`spec.ASpec`: r <= n_in), so
    r is bounded by the frozen side: n_in with A frozen (B trained), n_out with B frozen
    (`frozen_factor` "B"), both for seedcore (A0 and B0 seeded). fedit trains both factors
    (PEFT takes any r) and full has no adapter: no limit."""
    if method == "seedcore":
        return min(n_in, n_out)
    if method in B_ONLY:
        return n_out if frozen_factor == "B" else n_in
    return None
