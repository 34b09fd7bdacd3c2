"""Put adapters into a model by module-name pattern, and move its trainable state around.

Targets follow PEFT's `target_modules`: a list of names matches a module whose full
name equals an entry or ends with "." + entry; a string is a regex that must match the
full name. Heads listed in `modules_to_save` stay fully trainable and travel with B.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .core import CORE, CoreLoRALayer
from .layer import SeedLoRALayer, layer_shape
from .roles import ADAPTERS
from .spec import ASpec, Kind
from .swapped import TRAINED_A, SwappedLoRALayer, frozen_spec

Targets = str | Sequence[str]


def _matches(name: str, targets: Targets) -> bool:
    """Whether module `name` is targeted (PEFT's rules, module docstring)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_layers(
    model: nn.Module,
) -> Iterator[tuple[str, SeedLoRALayer | SwappedLoRALayer | CoreLoRALayer]]:
    """(module name, layer) for every adapter (any role), in model order."""
    for name, module in model.named_modules():
        if isinstance(module, ADAPTERS):
            yield name, module


def inject(
    model: nn.Module,
    targets: Targets,
    *,
    kind: Kind,
    seed: int,
    rank: int,
    alpha: float,
    chain_index: int = 0,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] = (),
    frozen: str = "A",
) -> list[str]:
    """Freeze `model`, wrap every matching Linear/Conv1D in a `SeedLoRALayer` (or, with
    `frozen="B"`, a `SwappedLoRALayer`: seeded B, trained A; with `frozen="AB"`, a
    `CoreLoRALayer`: seeded A0 and B0, trained r x r core R).

    Each adapter gets the spec `(kind, seed, chain_index, rank, module name, shape)` and a
    zero trained factor, float32 on the layer's device (float64 under a float64 base).

    Returns the adapted module names. Raises if nothing matches, so a typo in the target
    list fails loudly instead of training nothing.
    """
    if frozen not in ("A", TRAINED_A, CORE):
        raise ValueError(f"frozen-factor: expected 'A' or 'B', got {frozen!r}")
    model.requires_grad_(False)
    names = [
        n
        for n, m in model.named_modules()
        if n and _matches(n, targets) and not isinstance(m, ADAPTERS)
    ]
    adapted = []
    for name in names:
        base = model.get_submodule(name)
        try:
            n_in, n_out = layer_shape(base)
        except TypeError:
            continue
        if frozen == TRAINED_A:
            spec = frozen_spec(kind, seed, chain_index, rank, name, base)
            _set_submodule(model, name, SwappedLoRALayer(base, spec, alpha, dropout))
        elif frozen == CORE:
            spec = ASpec(kind, seed, chain_index, rank, name, n_in, n_out)
            _set_submodule(model, name, CoreLoRALayer(base, spec, alpha, dropout))
        else:
            spec = ASpec(kind, seed, chain_index, rank, name, n_in, n_out)
            _set_submodule(model, name, SeedLoRALayer(base, spec, alpha, dropout))
        adapted.append(name)
    if not adapted:
        raise ValueError(f"target-modules: {targets!r} matched no Linear/Conv1D layer")
    for head in modules_to_save:
        found = [m for n, m in model.named_modules() if n and _matches(n, [head])]
        if not found:
            raise ValueError(f"modules-to-save: {head!r} matched no module")
        for module in found:
            module.requires_grad_(True)
            for layer in module.modules():  # a head holding adapters: its bases now train
                if isinstance(layer, SeedLoRALayer):
                    layer.refresh_path()
    return adapted


def set_chain_index(model: nn.Module, chain_index: int) -> None:
    """Move every adapter to the A of chain index `chain_index`, with B reset to zero.

    Whatever B holds is discarded, not merged: to keep it, merge first (`merge_adapters`,
    or `federate.close_link`, which records the link, merges it and calls this).
    """
    for _, layer in adapter_layers(model):
        s = layer.spec
        layer.set_spec(ASpec(s.kind, s.seed, chain_index, s.rank, s.layer, s.n_in, s.n_out))


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter's current `s B A` into its base weight (B becomes zero; s is the
    layer's `scaling`)."""
    for _, layer in adapter_layers(model):
        layer.merge()


def keep_links_aside(model: nn.Module) -> int:
    """Put every B-only adapter in side-path mode: links merged from now on (`apply_link`,
    `close_link`) stay beside the base as a stacked low-rank path (seedlora/sidepath.py).

    Adapters over a quantized base are in that mode from the start; this makes any base
    behave so (the CPU tests use plain float layers). Returns the adapters switched.
    """
    layers = [m for _, m in adapter_layers(model) if isinstance(m, SeedLoRALayer)]
    if len(layers) != len(list(adapter_layers(model))):
        raise ValueError("side paths need B-only adapters (frozen-factor A)")
    for layer in layers:
        layer.keep_links_aside()
    return len(layers)


def fold_aside(model: nn.Module) -> nn.Module:
    """Merge every side path densely into its float base (`SeedLoRALayer.fold`): export.

    The same `merge_delta` calls in the same order as the dense master's merges, so a base
    that started as the master's W0 ends with the master's bits.
    """
    for _, layer in adapter_layers(model):
        if isinstance(layer, SeedLoRALayer):
            layer.fold()
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Replace each adapter by its base layer (call `merge_adapters` first to keep B A)."""
    for name, layer in list(adapter_layers(model)):
        _set_submodule(model, name, layer.base)
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Ordered name -> tensor of what is trained and sent: every B and every head.

    Returns:
        Parameter name -> detached copy, in `named_parameters` order, in the parameter's
        dtype and on its device: "<layer>.lora_B": (n_out, r), float32 (the master copy;
        "<layer>.lora_A": (r, n_in) with swapped roles), and each head parameter in its
        own shape and dtype.
    """
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load B factors and heads, in place (e.g. the global state a client receives).

    Args:
        model: the injected model.
        state: name -> tensor (or array) with exactly the keys and shapes of
            `trainable_state(model)`, e.g. "<layer>.lora_B": (n_out, r); any device and
            dtype, copied in the parameter's dtype onto its device.

    Raises KeyError on missing/extra keys and ValueError on a wrong shape.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise KeyError(f"trainable state mismatch: missing {missing[:5]}, extra {extra[:5]}")
    for name, param in params.items():
        value = torch.as_tensor(state[name])
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{name}: shape {tuple(value.shape)} != expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
