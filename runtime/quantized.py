"""A quantized frozen base on the GPU: the run-config key `quantization` (none | 8bit | 4bit).

Loaded the way Hugging Face users load one, `from_pretrained(..., quantization_config=
BitsAndBytesConfig(...))`, straight onto the client's GPU: 4bit is NF4 with double
quantization (the quantization constants quantized again) and a bf16 compute dtype
(QLoRA's recipe); 8bit is LLM.int8(). Layers that are not quantized (embeddings, norms,
the LM head, new classification heads) load in the run's precision. bitsandbytes is
imported only here and only for a quantized run (`pip install -e ".[quant]"`), and its
layers need CUDA: anything else fails early with an error that names `quantization`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

QUANTIZATIONS = ("none", "8bit", "4bit")
# never quantized: output heads (kept in the run's precision, trainable heads in float32)
SKIP_MODULES = ("lm_head", "score", "classifier")


def check_quantization(quantization: str, device: torch.device) -> None:
    """Raise a ValueError naming `quantization` unless this process can run it on `device`."""
    if quantization == "none":
        return
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: expected one of {QUANTIZATIONS}, got {quantization!r}")
    if device.type != "cuda":
        raise ValueError(
            f"quantization {quantization!r}: bitsandbytes layers need a CUDA GPU, and this "
            f"client trains on {device}; set quantization='none' or train on a GPU"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(
            f"quantization {quantization!r}: bitsandbytes is not installed "
            '(pip install -e ".[quant]")'
        )


def bnb_config(quantization: str, skip: Sequence[str] = ()):
    """The transformers `BitsAndBytesConfig` of a quantization (module docstring)."""
    import torch
    from transformers import BitsAndBytesConfig

    skip_modules = sorted(set(SKIP_MODULES) | set(skip))
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=skip_modules,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    raise ValueError(f"quantization: no bitsandbytes config for {quantization!r}")


def load_quantized(
    path: str,
    kind: str,
    quantization: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    num_labels: int = 0,
    seed: int = 0,
    skip: Sequence[str] = (),
    pad_token_id: int | None = None,
) -> torch.nn.Module:
    """The pretrained model at `path` with quantized Linear layers, on `device`, eval mode.

    Args:
        path: a local folder or hub id, already resolved (tasks.models.resolve_model_path).
        kind: "causal" or "seq-cls" (a new head of `num_labels`, seeded by `seed`).
        quantization: "8bit" or "4bit".
        device: a CUDA device (`check_quantization`).
        dtype: the dtype of the layers that stay unquantized.
        skip: more module names to leave unquantized (the run's trained heads).
        pad_token_id: the tokenizer's, for a config that names none.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    check_quantization(quantization, device)
    kwargs = {
        "quantization_config": bnb_config(quantization, skip),
        "device_map": {"": device},
        "dtype": dtype,
    }
    with torch.random.fork_rng(devices=[device]):  # a new head, as in tasks.models
        torch.manual_seed(seed)
        if kind == "causal":
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, ignore_mismatched_sizes=True, **kwargs
            )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    if kind == "causal" and getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    return model.eval()
