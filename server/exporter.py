"""The run's exports (`export = true`): a PEFT adapter and a merged Hugging Face model.

One export function per method, in `EXPORTS`:

- the linked methods (seedlora, seedcore, ffa): `peft-adapter/`, one LoRA adapter of rank
  up to k*r that stacks the k merged links (`W0 + sum_j s_j B_j A_j`) with the trainable
  heads, and `merged-model/`, the float32 master (W0 with every link merged);
- fedit (already a PEFT model): its adapter as PEFT writes it, and the merged model
  (`merge_and_unload` of a copy, so the master keeps its adapters);
- full: the merged model only (there is no adapter).

Every export names the base by its portable name (not this machine's path) and writes the
tokenizer beside the merged model, so `merged-model/` loads on its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.common.logger import log

from contract.config import RunConfig
from seedlora import atomic_dir, export_merged, export_peft, unwrap
from seedlora.export import peft_task_type
from seedlora.methods import LINKED
from seedlora.roles import is_factor_key
from seedlora.sharing import shared_copy
from tasks import portable_name

from .state import ChainState

ADAPTER = "peft-adapter"
MERGED = "merged-model"


def export_linked(model: torch.nn.Module, state: ChainState, out: Path, base: str, tokenizer):
    """The links as one PEFT adapter (plus heads), and the merged master."""
    heads = {k: v for k, v in state.arrays.items() if not is_factor_key(k)}
    try:
        export_peft(  # the master's modules (unwrapped) stand in for W0's: only the
            unwrap(shared_copy(model)),  # adapter and heads are written
            state.links,
            out / ADAPTER,
            heads=heads,
            base_model_name_or_path=base,
        )
    except ValueError as err:
        log(WARNING, "PEFT export skipped: %s", err)
    export_merged(model, out / MERGED, tokenizer=tokenizer)


def export_fedit(model: torch.nn.Module, state: ChainState, out: Path, base: str, tokenizer):
    """PEFT's own adapter, and a merged copy."""
    config = model.peft_config["default"]
    config.base_model_name_or_path = base
    config.task_type = config.task_type or peft_task_type(model.get_base_model())
    atomic_dir(out / ADAPTER, model.save_pretrained)
    merged = copy.deepcopy(model).merge_and_unload()
    export_merged(merged, out / MERGED, tokenizer=tokenizer)


def export_full(model: torch.nn.Module, state: ChainState, out: Path, base: str, tokenizer):
    """Every weight was trained: the model is the export."""
    export_merged(model, out / MERGED, tokenizer=tokenizer)


Export = Callable[[torch.nn.Module, ChainState, Path, str, object], None]
EXPORTS: dict[str, Export] = {
    **dict.fromkeys(LINKED, export_linked),
    "fedit": export_fedit,
    "full": export_full,
}


class Exporter:
    """Writes the exports of a run's final state into its folder."""

    def __init__(self, task, cfg: RunConfig, out_dir: Path):
        self.task, self.out_dir = task, Path(out_dir)
        self.method = cfg.adapter.method
        self.base = portable_name(cfg.task.model_name)  # not this machine's path

    def export(self, model: torch.nn.Module, state: ChainState) -> None:
        """`EXPORTS[method]` of the master `model` holding `state`'s links."""
        tokenizer = self.task.load_tokenizer()  # merged-model/ loads with its tokenizer
        EXPORTS[self.method](model, state, self.out_dir, self.base, tokenizer)
        log(INFO, "exports written to %s", self.out_dir)
