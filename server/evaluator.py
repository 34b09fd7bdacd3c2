"""Central evaluation: the held-out set, the device it runs on, and the global model there.

The global model is the float32 master (`W0 + sum_j s_j B_j A_j`, with link c's adapters)
with the round's trainable state loaded. On the CPU in fp32 the master itself is
evaluated; otherwise a replica on `server-device` in the run's precision, rebuilt once per
link (only merges change the base) from a `shared_copy` of the master, so no second
float32 copy is held on the host. The master stays on the CPU for merges and exports.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from logging import INFO, WARNING

import datasets
import torch
from flwr.common.logger import log

from contract.config import RunConfig, RunConfigError
from runtime.devices import autocast, check_device, pick_device, place
from seedlora import load_trainable_state
from seedlora.sharing import own_trainable, shared_copy
from tasks.corpus import SPLIT_SEED
from tasks.partitioning import cap, held_out_half, stratified_cap

from .state import ChainState

# RNG key of the central-eval-max subset (tasks.partitioning.cap_key never makes it).
CENTRAL_SUBSET_KEY = (SPLIT_SEED, 0, 1)
# RNG key of the central-eval-split halves (likewise never a cap_key).
CENTRAL_HALF_KEY = (SPLIT_SEED, 0, 2)


def central_set(task, cfg: RunConfig) -> datasets.Dataset:
    """The central evaluation set: the task's held-out set (capped by max-eval-blocks),
    or with `central-eval-split` one fixed seeded half of it (validation or test, the two
    disjoint), then with `central-eval-max` a fixed seeded subset of that many examples,
    the same in every run (as the central set is); stratified by label when labels are
    classes."""
    data = task.eval_dataset(None)
    classes = isinstance(data.features.get("labels"), datasets.Value)  # one class per row
    if cfg.output.central_eval_split != "all":
        column = "labels" if classes else None
        data = _plain(
            data,
            lambda d: held_out_half(d, cfg.output.central_eval_split, column, CENTRAL_HALF_KEY),
        )
    limit = cfg.output.central_eval_max
    if not limit or len(data) <= limit:
        return data
    if not classes:
        return cap(data, limit, CENTRAL_SUBSET_KEY)
    return _plain(data, lambda d: stratified_cap(d, limit, "labels", CENTRAL_SUBSET_KEY))


def _plain(
    data: datasets.Dataset, pick: Callable[[datasets.Dataset], datasets.Dataset]
) -> datasets.Dataset:
    """`pick(data)` run on the rows without their torch format (so it reads plain values),
    the format put back on what it returns."""
    fmt = data.format
    picked = pick(data.with_format(None))
    return picked.with_format(
        fmt["type"],
        columns=fmt["columns"],
        output_all_columns=fmt["output_all_columns"],
        **fmt["format_kwargs"],
    )


def eval_device(cfg: RunConfig, examples: int) -> torch.device:
    """`server-device` resolved and checked (auto: the first visible GPU, else the CPU);
    logged once, with a warning when a visible GPU is left idle."""
    name = cfg.output.server_device
    try:
        device = check_device(pick_device(name))
    except ValueError as err:
        raise RunConfigError(f"run-config key 'server-device': {err}") from None
    log(INFO, "central evaluation on %s (%s, %d examples)", device, cfg.train.precision, examples)
    if device.type == "cpu" and torch.cuda.is_available():
        log(WARNING, "central evaluation on the CPU although a GPU is visible (%s)", name)
    return device


class Evaluator:
    """Evaluates the global state on the central set (None: `central-eval` off, every
    evaluation is `{}`) and writes a generative task's samples with the same model."""

    def __init__(self, task, master: torch.nn.Module, cfg: RunConfig):
        self.task, self.master = task, master
        self.precision = cfg.train.precision
        self.batch_size = cfg.train.eval_batch_size
        self.eval_set = central_set(task, cfg) if cfg.output.central_eval else None
        self.device = eval_device(cfg, len(self.eval_set)) if self.eval_set is not None else None
        self._replica: torch.nn.Module | None = None  # the master on `device` (see model)
        self._replica_key: tuple[int, int] | None = None
        self.replica_builds = 0

    def model(self, state: ChainState) -> torch.nn.Module:
        """The global model of `state` (base + links + global B) on the eval device, in the
        run's precision (module docstring: the master itself, or the link's replica)."""
        device, precision = self.device, self.precision
        assert device is not None, "no central evaluation in this run"
        if device.type == "cpu" and precision == "fp32":
            load_trainable_state(self.master, state.arrays)
            return self.master
        key = (state.chain_index, len(state.links))
        if key != self._replica_key:
            self._replica = self._replica_key = None  # free the old replica first
            gc.collect()  # its adapters are reference cycles (seedlora.grouped)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            replica = own_trainable(shared_copy(self.master))
            self._replica = place(replica, device, precision).eval()
            self._replica_key = key
            self.replica_builds += 1
        load_trainable_state(self._replica, state.arrays)
        return self._replica

    def evaluate(self, state: ChainState) -> dict[str, float]:
        """The task's metrics of the global model of `state` on the central set."""
        if self.eval_set is None:
            return {}
        model, device = self.model(state), self.device
        with autocast(device, self.precision):
            metrics = self.task.evaluate(model, self.eval_set, self.batch_size, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # activations: clients may share this GPU
        return metrics

    def samples(self, state: ChainState) -> list[dict]:
        """The final model's completions of a few held-out prompts (the task's `samples`),
        on the evaluation device (without central evaluation: the float32 master)."""
        if self.device is None:
            load_trainable_state(self.master, state.arrays)
            model, device = self.master, torch.device("cpu")
        else:
            model, device = self.model(state), self.device
        with autocast(device, self.precision):
            return self.task.samples(model, device)
