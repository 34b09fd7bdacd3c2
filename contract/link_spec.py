"""`LinkSpec`: everything that defines a chain link, the one record a client builds it from.

A link trains B against a frozen factor in every adapted layer (DESIGN.md sections 1, 3):

    W = W0 + s * B @ A_c       s = (alpha / r) * gain,   gain = sqrt(r / n_in) for gaussian
                                                                 1 for the block kinds

so a client needs the method, the frozen factor's kind and the rule its entries are drawn
by (`a_rule`), r, alpha and the rule that turns alpha into s per layer (`scale_rule`), the
public seed and the chain index c of every A-spec, which layers are adapted (`targets`),
which factor is frozen, which modules are trained whole (`heads`) and the adapter's input
dropout. The server makes the spec from its run config and task (`LinkSpec.of`) and sends
it whole in every message's config under `contract.protocol.LINK_SPEC`, as compact JSON
(`to_wire`: 242 bytes for the embedded default); the client takes the link from it alone,
never from its own run config (client/model.py), and refuses a spec with a missing or
unknown field, naming it (`from_wire`). The client's own config keeps how it trains
(precision, device, local steps, lr default), its data (partition, batch order) and what it
uploads, not what it trains.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from seedlora.names import A_RULE, SCALE_RULE, Kind, Method

from .config import AdapterConfig


class LinkSpecError(ValueError):
    """A link spec that cannot be taken; the message names the field."""


class LinkSpec(BaseModel):
    """The definition of one chain link (module docstring); frozen, and equal specs define
    the same adapted model on every machine."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    method: Method
    a_kind: Kind  # resolved: never "auto"
    a_rule: str  # seedlora.names.A_RULE of the server
    rank: int = Field(gt=0)
    alpha: float = Field(gt=0)
    scale_rule: str  # seedlora.names.SCALE_RULE of the server
    seed: int = Field(ge=0)
    chain_index: int = Field(ge=0)  # c: the link's position in the chain
    targets: str | tuple[str, ...]  # module-name patterns, or one regex
    frozen_factor: Literal["A", "B"]
    heads: tuple[str, ...]  # modules trained whole (PEFT's modules_to_save)
    dropout: float = Field(ge=0, lt=1)

    @classmethod
    def of(
        cls,
        adapter: AdapterConfig,
        default_targets: Sequence[str],
        default_heads: Sequence[str],
        chain_index: int = 0,
    ) -> LinkSpec:
        """The spec of link `chain_index` of a run with `adapter`, whose task adapts
        `default_targets` and trains `default_heads` whole unless the run says otherwise."""
        targets = adapter.targets(default_targets)
        return cls(
            method=adapter.method,
            a_kind=adapter.kind,
            a_rule=A_RULE,
            rank=adapter.rank,
            alpha=adapter.alpha,
            scale_rule=SCALE_RULE,
            seed=adapter.seed,
            chain_index=chain_index,
            targets=targets if isinstance(targets, str) else tuple(targets),
            frozen_factor=adapter.frozen_factor,
            heads=tuple(adapter.heads(default_heads)),
            dropout=adapter.adapter_dropout,
        )

    def at(self, chain_index: int) -> LinkSpec:
        """The same link definition at chain index `chain_index`."""
        return self.model_copy(update={"chain_index": chain_index})

    def to_wire(self) -> str:
        """Compact JSON: what `LINK_SPEC` carries."""
        return self.model_dump_json()

    @classmethod
    def from_wire(cls, text: object) -> LinkSpec:
        """The spec a message carries; LinkSpecError names what is wrong with it."""
        if text is None:
            raise LinkSpecError(
                "link-spec: missing from the message's config (a server of another version?)"
            )
        if not isinstance(text, str):
            raise LinkSpecError(f"link-spec: expected a JSON string, got {type(text).__name__}")
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as err:
            raise LinkSpecError(f"link-spec: not JSON ({err})") from None
        if not isinstance(fields, dict):
            raise LinkSpecError(f"link-spec: expected a JSON object, got {type(fields).__name__}")
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            raise LinkSpecError(f"link-spec: {_problems(err)}") from None


def _problems(err: ValidationError) -> str:
    """'missing field rank; unknown field extra; field alpha: ...' of a validation error."""
    out = []
    for e in err.errors():
        name = ".".join(str(x) for x in e["loc"][:1]) or "?"
        if e["type"] == "missing":
            out.append(f"missing field {name!r}")
        elif e["type"] == "extra_forbidden":
            out.append(f"unknown field {name!r}")
        else:
            out.append(f"field {name!r}: {e['msg']}")
    unique = list(dict.fromkeys(out))
    return "; ".join(unique) + " (the server and this client run different versions?)"
