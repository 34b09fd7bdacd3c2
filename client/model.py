"""The model a client trains on: its task and partition, and the link's adapted base.

Both train paths (client/app.py and the SecAgg+ one in client/secure.py) build it here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context

from contract import protocol as p
from contract.config import RunConfig
from seedlora import prepare
from tasks import build_task

from .links import BaseCache

_BASES = BaseCache()


def node_task(context: Context, cfg: RunConfig):
    """(task, partition id) of this node, from its node config."""
    node = context.node_config
    num_partitions = int(node.get("num-partitions", 1))
    return build_task(cfg.task_config(num_partitions)), int(node.get("partition-id", 0))


def link_model(cfg: RunConfig, task, links, config: Mapping[str, Any]) -> torch.nn.Module:
    """The base rebuilt from `links`, adapted as the server's link `config` says (its method,
    A kind, seed, rank, alpha and chain index); trainable state still the fresh one."""
    return prepare(
        _BASES.get(cfg.task.model_name, links, task.load_model),
        str(config[p.METHOD]),
        cfg.adapter.targets(task.target_modules),
        kind=str(config[p.A_KIND]),
        seed=int(config[p.SEED]),
        rank=int(config[p.RANK]),
        alpha=float(config[p.ALPHA]),
        chain_index=int(config[p.CHAIN_INDEX]),
        dropout=cfg.adapter.adapter_dropout,
        heads=cfg.adapter.heads(task.modules_to_save),
        frozen=cfg.adapter.frozen_factor,
    )
