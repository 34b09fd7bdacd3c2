"""Chains of links: merged rank-r pieces that add up to a high-rank update.

After K rounds at chain index c the averaged B is folded into the base (`merge`), recorded
as the link `Link(specs_c, B_bar_c)`, and training moves to chain index c + 1: the next A,
with B = 0. The links list is all a client needs, besides the public pretrained W0, to
rebuild the current global base: `W = W0 + sum_j s_j B_j A_j`, s_j = `spec.scaling(alpha)`
of link j's layer spec (alpha / r for block kinds, alpha / sqrt(r n_in) for gaussian). Its
digest (a sha256 hash chain over a canonical serialization) names that base on the wire
and in caches.

The digest of the first k links is `digest_k = H(digest_{k-1}, link_k)`, so a `Chain` keeps
every `digest_k` as links are appended: its digest, and that of any prefix (what a node that
holds the first k links has), cost nothing per round however long the chain grows.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .core import CORE, b_spec, core_scaling, merge_core
from .injection import adapter_layers
from .layer import merge_delta
from .roles import ADAPTERS, frozen_of, trained_factor
from .spec import A_RULE, LEGACY_A_RULE, RULED_KINDS, ASpec, check_a_rule
from .swapped import TRAINED_A, merge_swapped

EMPTY_DIGEST = hashlib.sha256(b"seedlora-links-v1").hexdigest()
A_RULE_KEY = "a-rule"  # a link header's record of the A rule (absent: no A drawn, or legacy)
LINK_REMEDY = (
    "use the seedlora version that made it, or start a fresh run (another run-name) and "
    "delete this node's link cache (its cache-dir)"
)


def _ruled(specs: Iterable[ASpec]) -> bool:
    """Whether any of `specs` draws its A by the A rule (a gaussian or random-block kind)."""
    return any(s.kind in RULED_KINDS for s in specs)


@dataclass(frozen=True)
class Link:
    """One merged link `(A-spec_c, B_bar_c)`: what chain index c added to the base.

    Merging it is `W0 <- W0 + s B_bar @ A_c` for every adapted layer, s = `spec.scaling(alpha)`
    (a seeded core: `s B0 R_bar A0` at `core.core_scaling`); a links list plus the pretrained
    W0 rebuilds the global base (`rebuild`).

    Attributes:
        alpha: the LoRA alpha; each layer's scale is `spec.scaling(alpha)`.
        specs: the A-spec of every adapted layer, in model order, all at one chain index.
        factors: layer name -> B_bar: (n_out, r), float32 on the CPU as `record_link`
            makes it. With swapped roles (`frozen == "B"`) the specs describe the frozen
            B^T and the factors are the averaged A_bar: (r, n_in); for a seeded core
            (`frozen == "AB"`, seedlora/core.py) the specs describe A0 (B0 is derived from
            them) and the factors are R_bar: (r, r).
        frozen: "A" (default), "B" (swapped roles) or "AB" (seedcore).
    """

    alpha: float
    specs: tuple[ASpec, ...]
    factors: Mapping[str, torch.Tensor]  # layer name -> B_bar (n_out x r), float32 CPU
    frozen: str = "A"

    @property
    def chain_index(self) -> int:
        """The position c of this link in the chain (shared by all its specs)."""
        return self.specs[0].chain_index

    def header(self) -> dict:
        """JSON-able description of everything but the tensor values: alpha, the specs, the
        frozen role unless "A", and the A rule (`A_RULE_KEY`) when a spec's A depends on it
        (a circulant link's header, and so its digest, is the same under every rule)."""
        header: dict = {"alpha": self.alpha, "specs": [asdict(s) for s in self.specs]}
        if self.frozen != "A":
            header["frozen"] = self.frozen
        if _ruled(self.specs):
            header[A_RULE_KEY] = A_RULE
        return header

    def digest(self, previous: str) -> str:
        """sha256(previous digest, header, B bytes in spec order): a hash chain."""
        h = hashlib.sha256(previous.encode())
        h.update(json.dumps(self.header(), sort_keys=True).encode())
        for spec in self.specs:
            b = self.factors[spec.layer].detach().to("cpu", torch.float32).contiguous()
            h.update(b.numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def from_header(cls, header: Mapping, factors: Mapping[str, torch.Tensor]) -> Link:
        """Inverse of `header()`, given the tensors.

        Args:
            header: the dict `header()` made.
            factors: layer name -> B_bar: (n_out, r) (A_bar: (r, n_in) with swapped roles),
                one per spec; stored as given (no cast or move).

        Returns:
            The link. Raises KeyError if a spec's layer has no factor, and
            seedlora.spec.ARuleError if it was made under another A rule (a header without
            one: the legacy rule) and has a kind whose A depends on it.
        """
        specs = tuple(ASpec(**s) for s in header["specs"])
        what = f"link {specs[0].chain_index}" if specs else "a link"
        check_a_rule(header.get(A_RULE_KEY), (s.kind for s in specs), what, LINK_REMEDY)
        missing = [s.layer for s in specs if s.layer not in factors]
        if missing:
            raise KeyError(f"link {specs[0].chain_index}: missing factors for {missing[:5]}")
        return cls(float(header["alpha"]), specs, dict(factors), header.get("frozen", "A"))


class Chain(Sequence[Link]):
    """A links list (chain index 0 first) with its running digests.

    `prefix_digest(k)` is the digest of the first k links (`EMPTY_DIGEST` for k = 0) and
    `digest` that of all of them; `append` hashes only the new link. Indexing and slicing
    read the links (a slice is a plain list).
    """

    def __init__(self, links: Iterable[Link] = ()):
        self._links: list[Link] = []
        self._digests: list[str] = [EMPTY_DIGEST]
        for link in links:
            self.append(link)

    @classmethod
    def of(cls, links: Sequence[Link]) -> Chain:
        """`links` itself if it is a Chain, else a Chain of them (hashing every link once)."""
        return links if isinstance(links, Chain) else cls(links)

    def append(self, link: Link) -> str:
        """Add `link` at the end; returns the new digest."""
        digest = link.digest(self._digests[-1])
        self._links.append(link)
        self._digests.append(digest)
        return digest

    def prefix(self, k: int) -> Chain:
        """The first k links as a new Chain (no hashing: their digests are known)."""
        if not 0 <= k <= len(self._links):
            raise IndexError(f"prefix {k} of a chain of {len(self._links)} links")
        out = Chain()
        out._links, out._digests = self._links[:k], self._digests[: k + 1]
        return out

    def copy(self) -> Chain:
        return self.prefix(len(self._links))

    @property
    def digest(self) -> str:
        """The digest of all links: `links_digest(self)`."""
        return self._digests[-1]

    def prefix_digest(self, k: int) -> str:
        """The digest of the first k links (0 <= k <= len)."""
        if not 0 <= k <= len(self._links):
            raise IndexError(f"prefix {k} of a chain of {len(self._links)} links")
        return self._digests[k]

    def __len__(self) -> int:
        return len(self._links)

    def __getitem__(self, index):
        return self._links[index]

    def __repr__(self) -> str:
        return f"Chain({len(self._links)} links, digest {self.digest[:12]})"


def links_digest(links: Sequence[Link]) -> str:
    """Digest of a whole links list; equal digests mean equal merged bases.

    A `Chain` knows its own (no hashing); any other sequence is hashed link by link."""
    if isinstance(links, Chain):
        return links.digest
    digest = EMPTY_DIGEST
    for link in links:
        digest = link.digest(digest)
    return digest


def record_link(model: nn.Module, factors: Mapping[str, torch.Tensor] | None = None) -> Link:
    """The link that merging the model's current chain index would record.

    The server calls it at the end of each chain index and merges the result with
    `apply_link`, so the merge and the recorded link use the same B.

    Args:
        model: a model with adapters (`inject`), all with one alpha and one frozen role.
        factors: layer name -> B_bar: (n_out, r) (A_bar: (r, n_in) with swapped roles),
            stored as given. None: copy each adapter's own trained factor (detached,
            float32, CPU).

    Returns:
        A `Link` with the adapters' current specs. Raises ValueError if the model has no
        adapters or they disagree on alpha or on the frozen factor.
    """
    layers = list(adapter_layers(model))
    if not layers:
        raise ValueError("model has no adapters")
    alphas = {m.alpha for _, m in layers}
    if len(alphas) != 1:
        raise ValueError(f"adapters disagree on alpha: {sorted(alphas)}")
    roles = {frozen_of(m) for _, m in layers}
    if len(roles) != 1:
        raise ValueError("adapters disagree on which factor is frozen")
    if factors is None:
        factors = {
            m.spec.layer: trained_factor(m).detach().float().cpu().clone() for _, m in layers
        }
    return Link(alphas.pop(), tuple(m.spec for _, m in layers), dict(factors), roles.pop())


@functools.lru_cache(maxsize=16)
def _frozen_digest(layers: tuple[tuple[ASpec, str], ...]) -> str:
    h = hashlib.sha256(b"seedlora-frozen-v2")  # v2: the scale s per unit alpha is hashed
    ruled = _ruled(spec for spec, _ in layers)
    if ruled:
        h.update(A_RULE.encode())
    for spec, role in layers:
        h.update(role.encode())
        h.update(spec.digest().encode())
        if role == CORE:  # B0 is derived from A0's spec, but hash what was drawn
            h.update(b_spec(spec).digest().encode())
        scale = core_scaling(spec, 1.0) if role == CORE else spec.scaling(1.0)
        h.update(repr(scale).encode())
    return f"{A_RULE}:{h.hexdigest()}" if ruled else h.hexdigest()


def a_digest_rule(digest: str) -> str:
    """The A rule an `a_digest` names: its "<rule>:" prefix, `LEGACY_A_RULE` without one (a
    digest before the rule was recorded, or one that depends on no rule)."""
    rule, sep, _ = digest.rpartition(":")
    return rule if sep else LEGACY_A_RULE


def a_digest(model: nn.Module) -> str:
    """sha256 over the A-spec and the frozen factor itself of every adapter, in model order.

    Equal digests mean every party derived the same A, bit for bit, from the same specs:
    averaging B factors made for different A's would be silently inexact. A depends on the
    A rule (seedlora/spec.py `A_RULE`), so when a spec's kind draws by it (gaussian,
    random-block) the rule is hashed and also prefixed in clear ("exact-v2:<hex>",
    `a_digest_rule`), which lets the server tell a node running another rule from one
    that drew another A under the same rule. The scale per unit alpha is hashed too, so a
    client whose code scales a gaussian factor otherwise (before `ASpec.gain`) is rejected
    instead of training on another base. Clients echo it and the server rejects a reply
    whose digest differs from its own. Computed once per link and process (cached by the
    specs); a reduced-rank (nested) adapter counts as the full-rank spec it is a slice of.

    Returns:
        "<A rule>:<hex digest>", or the hex digest alone when no spec draws by the rule
        (circulant); "" for a model without adapters (fedit, full).
    """
    layers = []
    for _, layer in adapter_layers(model):
        spec = layer.spec
        full = getattr(spec, "full", None)  # seedlora.nested.NestedSpec
        layers.append((full() if callable(full) else spec, frozen_of(layer)))
    return _frozen_digest(tuple(layers)) if layers else ""


def _base_layer(model: nn.Module, name: str) -> nn.Module:
    module = model.get_submodule(name)
    return module.base if isinstance(module, ADAPTERS) else module


def apply_link(model: nn.Module, link: Link) -> None:
    """Merge one link into `model`'s base weights, in place.

    Each layer gets `W += s B_bar @ A_c` (s = `spec.scaling(alpha)`), computed in float32 on
    the weight's device and added in the weight's dtype (`merge_delta`, `merge_swapped` for
    swapped roles, `merge_core`: `W += s B0 R_bar A0` for seedcore).
    Adapters, if injected, are untouched: only their `base` layers change, except that an
    adapter in side-path mode (a quantized base: seedlora/sidepath.py) appends the link to
    its side path and leaves the base as it is.

    Args:
        model: the model holding every layer named in `link.specs`, with or without
            adapters.
        link: the link to merge; its factors may be on any device and float dtype.
    """
    merge = merge_swapped if link.frozen == TRAINED_A else merge_delta
    for spec in link.specs:
        module, factor = model.get_submodule(spec.layer), link.factors[spec.layer]
        if link.frozen == CORE:  # W += s B0 R A0 (seedcore; never in side-path mode)
            merge_core(_base_layer(model, spec.layer), spec, factor, link.alpha)
            continue
        scaling = spec.scaling(link.alpha)
        if getattr(module, "aside", None) is not None:  # side-path mode (sidepath.py)
            module.add_link(spec, factor, scaling)
        else:
            merge(_base_layer(model, spec.layer), spec, factor, scaling)


def rebuild(model: nn.Module, links: Sequence[Link]) -> nn.Module:
    """W0 + all links, in order: bit-identical to the server's merges from the same W0.

    Args:
        model: the pretrained model (W0), changed in place.
        links: the merged links, chain index 0 first.

    Returns:
        `model`, whose base weights are now `W0 + sum_j s_j B_j @ A_j` (s_j: each
        layer's `spec.scaling(alpha)`).
    """
    for link in links:
        apply_link(model, link)
    return model
