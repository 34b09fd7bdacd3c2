"""The model a client trains on: its task and partition, and the link's resident model,
built from the link spec the server sent (contract/link_spec.py) and nothing else.

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
from contract.link_spec import LinkSpec, LinkSpecError
from runtime.devices import COMPUTE_DTYPES
from seedlora import Link
from seedlora.spec import SCALE_RULE, ARuleError, check_a_rule
from tasks import build_task

from .links import BaseSource
from .resident import ModelKey, ResidentModel, effective_chain_index

REMEDY = "run one seedlora version on the server and every client"


def node_task(context: Context, cfg: RunConfig):
    """(task, partition id) of this node, from its node config."""
    node = context.node_config
    num_partitions = int(node.get("num-partitions", 1))
    return build_task(cfg.task_config(num_partitions)), int(node.get("partition-id", 0))


def link_spec(config: Mapping[str, Any]) -> LinkSpec:
    """The link a message's `config` defines (contract.link_spec), refused when it was made
    under another A rule or scale rule than this seedlora's: its A's or their scale
    would differ, so the client's B could not be averaged with the server's A."""
    spec = LinkSpec.from_wire(config.get(p.LINK_SPEC))
    try:
        check_a_rule(spec.a_rule, [spec.a_kind], "the server's link spec", REMEDY)
    except ARuleError as err:
        raise LinkSpecError(f"link-spec: {err}") from None
    if spec.scale_rule != SCALE_RULE and spec.a_kind == "gaussian":
        raise LinkSpecError(
            f"link-spec: the server scales A by {spec.scale_rule!r}, this client by "
            f"{SCALE_RULE!r}; {REMEDY}"
        )
    return spec


def model_key(
    cfg: RunConfig, task, spec: LinkSpec, links_digest: str, device: torch.device
) -> ModelKey:
    """The key of the model of link `spec` on the base `links_digest`: the link from the
    spec alone, how it trains (precision, checkpointing, quantization, kernels) from this
    client's run config."""
    return ModelKey(
        task=task.config,
        links=links_digest,
        method=spec.method,
        kind=spec.a_kind,
        seed=spec.seed,
        rank=spec.rank,
        alpha=spec.alpha,
        chain_index=effective_chain_index(spec.method, spec.chain_index),
        targets=spec.targets,
        heads=spec.heads,
        frozen=spec.frozen_factor,
        dropout=spec.dropout,
        precision=cfg.train.precision,
        device=str(device),
        checkpointing=cfg.train.gradient_checkpointing,
        quantization=cfg.train.quantization,
        kernels=cfg.train.base_kernels,
    )


def base_loader(
    cfg: RunConfig, task, spec: LinkSpec, device: torch.device
) -> BaseSource | Callable[[], torch.nn.Module]:
    """What the resident model is built from: the source of the task's float32 CPU W0 (the
    host's mapped master is the process's one float32 copy: the checkpoint as stored, read
    only to write the master file, and the model's skeleton on the meta device, which
    takes the mapped tensors), or with `quantization` a loader of the quantized W0 on
    `device` (its unquantized layers in the run's precision; 4bit layers compute in bf16
    whatever it is; the link's heads stay unquantized)."""
    q = cfg.train.quantization
    if q == "none":
        return BaseSource(task.load_stored, task.load_skeleton, task.weights_fingerprint, "task")
    dtype = COMPUTE_DTYPES[cfg.train.precision] or torch.float32
    return functools.partial(task.load_quantized, q, device, dtype, spec.heads)


@contextlib.contextmanager
def link_model(
    resident: ResidentModel,
    cfg: RunConfig,
    task,
    spec: LinkSpec,
    links_digest: str,
    links: Callable[[], Sequence[Link]],
    device: torch.device,
    cache_dir: str | os.PathLike,
) -> Iterator[torch.nn.Module]:
    """`resident`'s model of link `spec` on the base `links_digest`, on `device` in the
    run's precision, for the length of one client's call; its trainable state is whatever
    the last client left: load the global state first. `links()` gives the links list
    named by the digest; it is called only when neither `resident` nor the host's master
    files in `cache_dir` (the node's cache folder) have that base."""
    load = base_loader(cfg, task, spec, device)
    key = model_key(cfg, task, spec, links_digest, device)
    with resident.use(key, links, load, cache_dir) as model:
        yield model
