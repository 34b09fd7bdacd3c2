"""This project's method and the baselines people would otherwise pick, behind one call.

The same Flower pipeline trains and ships whatever `prepare` marks trainable, so the
benchmarks compare methods side by side:

- `seedlora`: B-only adapters on a seeded A that changes with the chain index (exact).
- `seedcore`: seeded A0 and B0 that change with the chain index, only an r x r core R
              trained and sent (exact, r^2 numbers per layer; seedlora/core.py).
- `ffa`:      B-only on one fixed gaussian A, no chain (FFA-LoRA; exact, rank r only).
- `fedit`:    ordinary LoRA (PEFT), A and B both trained and averaged separately (FedIT;
              not exact: mean(B_i) mean(A_i) != mean(B_i A_i)).
- `full`:     every parameter trained and averaged (FedAvg; small models only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .core import CORE
from .injection import Targets, _matches, inject
from .names import B_ONLY, CHAINED, LINKED, Method, method_kind  # noqa: F401 - re-exported


def _any_conv1d(model: nn.Module, targets: Targets) -> bool:
    return any(
        isinstance(m, Conv1D) and _matches(n, targets) for n, m in model.named_modules() if n
    )


def prepare(
    model: nn.Module,
    method: Method,
    targets: Targets,
    *,
    kind: str | None = None,
    seed: int,
    rank: int,
    alpha: float,
    chain_index: int = 0,
    dropout: float = 0.0,
    heads: Sequence[str] = (),
    frozen: str = "A",
) -> nn.Module:
    """Make `model` trainable the way `method` does; returns the model to train.

    `kind` is the frozen factor's kind (`spec.KINDS`); None takes the method's own:
    circulant for seedlora, gaussian for ffa and seedcore (whose A0 and B0 share it). ffa
    *is* one fixed gaussian A (FFA-LoRA), so any other kind is refused rather than
    ignored. fedit and full have no seeded factor and ignore it. Raises ValueError on an
    unknown method or a kind ffa cannot take.
    """
    if method in LINKED:
        chained = method in CHAINED
        kind = method_kind(method, kind)
        if method == "seedcore":
            if frozen != "A":
                raise ValueError("frozen-factor: seedcore freezes both factors; leave it 'A'")
            frozen = CORE
        inject(
            model,
            targets,
            kind=kind,
            seed=seed,
            rank=rank,
            alpha=alpha,
            chain_index=chain_index if chained else 0,
            dropout=dropout,
            modules_to_save=heads,
            frozen=frozen,
        )
        return model
    if method == "fedit":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=targets if isinstance(targets, str) else list(targets),
            lora_dropout=dropout,
            fan_in_fan_out=_any_conv1d(model, targets),
            modules_to_save=list(heads) or None,
        )
        with torch.random.fork_rng():  # PEFT draws A from the global RNG
            torch.manual_seed(seed)
            return get_peft_model(model, config)
    if method == "full":
        return model.requires_grad_(True)
    raise ValueError(f"method: unknown {method!r}; expected seedlora, seedcore, ffa, fedit or full")
