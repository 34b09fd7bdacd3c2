"""The model a client trains on: its task and partition, and the link's resident model.

Both train paths (client/trainer.py and the SecAgg+ one in client/secure.py) and
evaluation get it here, from the trainer's `ResidentModel` (client/resident.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from flwr.app import Context

from contract import protocol as p
from contract.config import RunConfig
from runtime.devices import COMPUTE_DTYPES
from seedlora import Link
from tasks import build_task

from .links import BaseSource
from .resident import ModelKey, ResidentModel, effective_chain_index


def node_task(context: Context, cfg: RunConfig):
    """(task, partition id) of this node, from its node config."""
    node = context.node_config
    num_partitions = int(node.get("num-partitions", 1))
    return build_task(cfg.task_config(num_partitions)), int(node.get("partition-id", 0))


def model_key(cfg: RunConfig, task, config: Mapping[str, Any], device: torch.device) -> ModelKey:
    """The key of the model the server's link `config` asks for (its method, A kind, seed,
    rank, alpha, chain index and links digest), with this run's adapter and train keys."""
    method = str(config[p.METHOD])
    targets = cfg.adapter.targets(task.target_modules)
    return ModelKey(
        task=task.config,
        links=str(config[p.LINKS_DIGEST]),
        method=method,
        kind=str(config[p.A_KIND]),
        seed=int(config[p.SEED]),
        rank=int(config[p.RANK]),
        alpha=float(config[p.ALPHA]),
        chain_index=effective_chain_index(method, int(config[p.CHAIN_INDEX])),
        targets=targets if isinstance(targets, str) else tuple(targets),
        heads=tuple(cfg.adapter.heads(task.modules_to_save)),
        frozen=cfg.adapter.frozen_factor,
        dropout=cfg.adapter.adapter_dropout,
        precision=cfg.train.precision,
        device=str(device),
        checkpointing=cfg.train.gradient_checkpointing,
        quantization=cfg.train.quantization,
        kernels=cfg.train.base_kernels,
    )


def base_loader(
    cfg: RunConfig, task, device: torch.device
) -> BaseSource | Callable[[], torch.nn.Module]:
    """What the resident model is built from: the source of the task's float32 CPU W0 (the
    host's mapped master is the process's one float32 copy: the checkpoint as stored, read
    only to write the master file, and the model's skeleton on the meta device, which
    takes the mapped tensors), or with `quantization` a loader of the quantized W0 on
    `device` (its unquantized layers in the run's precision; 4bit layers compute in bf16
    whatever it is)."""
    q = cfg.train.quantization
    if q == "none":
        return BaseSource(task.load_stored, task.load_skeleton, task.weights_fingerprint, "task")
    dtype = COMPUTE_DTYPES[cfg.train.precision] or torch.float32
    heads = tuple(cfg.adapter.heads(task.modules_to_save))
    return functools.partial(task.load_quantized, q, device, dtype, heads)


@contextlib.contextmanager
def link_model(
    resident: ResidentModel,
    cfg: RunConfig,
    task,
    config: Mapping[str, Any],
    links: Callable[[], Sequence[Link]],
    device: torch.device,
    cache_dir: str | os.PathLike,
) -> Iterator[torch.nn.Module]:
    """`resident`'s model of the link `config` names, on `device` in the run's precision,
    for the length of one client's call; its trainable state is whatever the last client
    left: load the global state first. `links()` gives the links list named by the
    config's digest; it is called only when neither `resident` nor the host's master
    files in `cache_dir` (the node's cache folder) have that base."""
    load = base_loader(cfg, task, device)
    key = model_key(cfg, task, config, device)
    with resident.use(key, links, load, cache_dir) as model:
        yield model
