"""Liger's Triton kernels in a frozen base model (run-config key `base-kernels`).

A B-only client's step is mostly the frozen base's work, so the base's kernels set its
speed. liger-kernel fuses RMSNorm (one kernel instead of ~7 elementwise ops, forward and
backward) and the SwiGLU MLP's `silu(gate) * up` (one kernel, and it recomputes the
product in backward instead of keeping it). On an H200 with the whole step captured as a
CUDA graph this took a step from 48 to 37 ms at the Qwen2.5-0.5B shape and from 142 to
106 ms at the Llama-2-7B shape, and lowered peak memory (docs/results.md, step overhead).

Only what liger-kernel patches on the model instance is used: RMSNorm and the MLP. Left
off on purpose:
- its RoPE and its module class swaps are globals of the transformers modeling module
  (every model the process builds later would get them, the server's CPU evaluation copy
  of an in-process run included), so the module is restored after patching;
- its fused linear cross-entropy reads the token count with `.item()`, a host sync that a
  captured step (step-mode graphed) cannot contain.
"""

from __future__ import annotations

import inspect
import sys

from torch import nn

KEY = "base-kernels"


def use_liger(model: nn.Module) -> nn.Module:
    """Patch `model`'s RMSNorm and SwiGLU MLP modules with Liger's kernels, in place.

    Raises ImportError naming the key when liger-kernel (or Triton) is missing, and
    ValueError when liger-kernel has no kernels for the model's type.
    """
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as err:
        raise ImportError(
            f"{KEY}: 'liger' needs liger-kernel and Triton (a CUDA machine): "
            f"pip install -e '.[liger]' ({err})"
        ) from err
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        known = ", ".join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))
        raise ValueError(
            f"{KEY}: liger-kernel has no kernels for model type {model_type!r} "
            f"(it has: {known}); set {KEY}='torch'"
        )
    wanted = {
        "rope": False,
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
        "rms_norm": True,
        "swiglu": True,
    }
    accepted = inspect.signature(apply).parameters
    module = sys.modules[type(model).__module__]
    saved = dict(vars(module))
    try:
        apply(model=model, **{k: v for k, v in wanted.items() if k in accepted})
    finally:
        for name, value in saved.items():  # undo the module-level swaps (docstring)
            if vars(module).get(name) is not value:
                setattr(module, name, value)
    return model
