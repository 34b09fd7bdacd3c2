"""Export to the formats people already load: a PEFT LoRA adapter, or a merged HF model.

A chain of k links is one LoRA adapter of rank k*r, because
`sum_j s_j B_j A_j = [s_1 B_1 ... s_k B_k] @ [A_1; ...; A_k]`. The export folds each
link's scale s_j (`ASpec.scaling`: alpha/r times the gaussian gain) into its B block and
sets PEFT's lora_alpha = rank, so PEFT's own scale is 1 and
`PeftModel.from_pretrained(W0, path)` gives the chained model. A seedcore link
`s B0 R A0` exports as the block `(s B0 R, A0)`: R is folded into B.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .chain import Link
from .core import CORE, core_scaling, lift
from .injection import adapter_layers, unwrap
from .roles import trained_factor
from .sharing import shared_copy
from .swapped import TRAINED_A


def atomic_dir(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write a directory under a temp name beside `path`, then rename it into place.

    `write(tmp)` fills the temp directory; an existing `path` is replaced only once it
    succeeded, so a crash leaves the old directory or the new one, never half of one.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _stack(links: Sequence[Link], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_cat * scale: (n_out, k r), A_cat: (k r, n_in)) for one layer over k links.

    Float32 on the CPU; each link's B block is scaled by its s (B0 R for a core link).
    """
    bs, as_ = [], []
    for link in links:
        spec = next(s for s in link.specs if s.layer == layer)
        trained = link.factors[layer].float().cpu()
        if link.frozen == CORE:  # fold R into B: B = B0 R
            bs.append(lift(spec, trained).float() * core_scaling(spec, link.alpha))
            as_.append(spec.dense())
            continue
        frozen = spec.dense()  # A, or B^T when the roles are swapped
        b, a = (frozen.t(), trained) if link.frozen == TRAINED_A else (trained, frozen)
        bs.append(b * spec.scaling(link.alpha))
        as_.append(a)
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a Hugging Face model, from its class: "CAUSAL_LM" for
    *ForCausalLM / *LMHeadModel, "SEQ_CLS" for *ForSequenceClassification, else None."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None


def export_peft(
    base: nn.Module,
    links: Sequence[Link],
    path: str | os.PathLike,
    *,
    heads: Mapping[str, torch.Tensor] | None = None,
    base_model_name_or_path: str | None = None,
    task_type: str | None = "auto",
) -> Path:
    """Save a PEFT LoRA adapter of rank sum(r_j) equal to W0 + all `links`.

    Lets anyone load the chained model with `PeftModel.from_pretrained(W0, path)`, without
    this package (module docstring: each layer's B_j blocks, scaled, and A_j stacked).

    Args:
        base: a model of W0's modules without adapters (not modified: a `shared_copy` is
            adapted); only its structure matters, since only the adapter and the heads are
            written, so the merged base of a run serves as well as the pristine W0.
        links: the links to export, chain index 0 first, all over the same layers; each
            factor B_bar: (n_out, r) (A_bar: (r, n_in) with swapped roles). Links whose
            factors are all zero are skipped. To include the current, unmerged chain
            index, append `record_link(model)` as the last element.
        path: the output directory (written atomically).
        heads: the fully trained modules (`modules_to_save`) as parameter name -> tensor of
            that parameter's shape, e.g. "score.weight": (num_labels, hidden).
        base_model_name_or_path: recorded in the adapter config as given (None: none;
            never the path the base happened to be loaded from on this machine).
        task_type: PEFT's task type in the adapter config ("CAUSAL_LM", "SEQ_CLS", ...);
            "auto" infers it from the base's class (`peft_task_type`), None leaves it out.

    Returns:
        The output directory. Raises ValueError if every link has B = 0.
    """
    from peft import LoraConfig, get_peft_model

    links = [link for link in links if any(b.abs().sum() > 0 for b in link.factors.values())]
    if not links:
        raise ValueError("nothing to export: every link has B = 0")
    layers = [s.layer for s in links[0].specs]
    rank = sum(link.specs[0].rank for link in links)
    model = shared_copy(base)  # base's storage, untouched: heads get storage of their own
    head_modules = sorted({name.rsplit(".", 1)[0] for name in heads or {}})
    if heads:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in heads.items():
                params[name].data = torch.empty_like(params[name]).copy_(value)
    conv = any(isinstance(model.get_submodule(n), Conv1D) for n in layers)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=layers,
        lora_dropout=0.0,
        fan_in_fan_out=conv,
        modules_to_save=head_modules or None,
        init_lora_weights=False,
        task_type=peft_task_type(base) if task_type == "auto" else task_type,
    )
    peft_model = get_peft_model(model, config)
    # get_peft_model records the path the base was loaded from; record the caller's name
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    with torch.no_grad():
        for layer in layers:
            b_cat, a_cat = _stack(links, layer)
            module = peft_model.base_model.model.get_submodule(layer)
            module.lora_A["default"].weight.copy_(a_cat)
            module.lora_B["default"].weight.copy_(b_cat)
    return atomic_dir(path, peft_model.save_pretrained)


def export_merged(model: nn.Module, path: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Save a plain HF model with every adapter folded in (the input model is untouched).

    `save_pretrained` is called on a merged, unwrapped `shared_copy`: a layer whose trained
    factor is nonzero is merged into a clone of its base weight, every other tensor is
    the model's own (no copy: a chain's final model has B = 0 after its last merge). A
    layer with a zero factor is left unmerged; merging would add exact zeros (it could only
    turn a -0.0 weight into +0.0).

    Args:
        model: an HF model, with or without adapters.
        path: the output directory (written atomically).
        tokenizer: saved beside the model when given (anything with `save_pretrained`).

    Returns:
        The output directory.
    """
    merged = shared_copy(model)
    for _, layer in adapter_layers(merged):
        factor = trained_factor(layer)
        if factor.any():
            factor.data = factor.data.clone()  # merge() zeroes it
            layer.base.weight.data = layer.base.weight.data.clone()
            layer.merge()
    unwrap(merged)

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return atomic_dir(path, write)
