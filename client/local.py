"""Local work of one client on one round: train B (and heads), or evaluate. No Flower here.

Training is plain PyTorch: AdamW/Adam/SGD on the trainable parameters only, a fixed
number of local steps (or epochs), gradient clipping, and FedProx's proximal term
`mu/2 * ||theta - theta_global||^2` on the trainable state when mu > 0 (B-space).
Data order is seeded by (seed, round, partition), so reruns and resumes are identical.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from contract.config import RunConfig

# run-config `precision` -> the dtype of the frozen base and of autocast (None: plain fp32).
COMPUTE_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def pick_device(name: str) -> torch.device:
    """'auto' takes the first GPU this process sees, else the CPU.

    Ray sets CUDA_VISIBLE_DEVICES of each client actor to the GPU it assigned, so that GPU
    is `cuda:0` here; `cuda:N` also counts within the visible devices.
    """
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def place(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """Move the model to `device`; under bf16/fp16 store its frozen weights in that dtype.

    Trainable parameters (B, heads) stay float32 master weights. Frozen parameters are cast
    one by one on their way over, so no full float32 copy ever sits on the device.
    """
    dtype = COMPUTE_DTYPES[precision]
    if dtype is not None:
        for param in model.parameters():
            if not param.requires_grad and param.is_floating_point():
                param.data = param.data.to(device, dtype)
    return model.to(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast in the run's compute dtype (a no-op context for fp32)."""
    dtype = COMPUTE_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    num_examples: int
    seconds: float


def _batches(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def _optimizer(cfg: RunConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def train(
    model: torch.nn.Module,
    task,
    dataset,
    cfg: RunConfig,
    device: torch.device,
    *,
    data_seed: int,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train the model's trainable parameters in place; returns the mean training loss.

    Dropout draws from the global RNG, so it is forked and seeded with `data_seed`:
    the same round on the same partition gives the same B, in any process.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(data_seed)
        return _train(model, task, dataset, cfg, device, data_seed, proximal_mu)


def train_partition(
    model: torch.nn.Module,
    task,
    partition_id: int,
    server_round: int,
    cfg: RunConfig,
    device: torch.device,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """One round of `train` on this node's partition, with the round's data seed.

    The seed depends on (run seed, round, partition) only, so a node that restarts, or the
    SecAgg+ path, replays the same batches as the plain path would.
    """
    data_seed = cfg.adapter.seed * 1_000_003 + server_round * 1009 + partition_id
    dataset = task.train_dataset(partition_id)
    return train(model, task, dataset, cfg, device, data_seed=data_seed, proximal_mu=proximal_mu)


def _train(model, task, dataset, cfg, device, data_seed, proximal_mu) -> TrainResult:
    start = time.perf_counter()
    if len(dataset) == 0:
        raise ValueError("this client has no training examples")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(data_seed),
    )
    steps = cfg.train.local_steps or max(1, math.ceil(cfg.train.local_epochs * len(loader)))
    opt = _optimizer(cfg, params)
    # fp16 gradients of a small loss underflow: scale the loss (bf16 has fp32's range).
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    model.train()
    total = 0.0
    for _, batch in zip(range(steps), _batches(loader), strict=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, cfg.train.precision):
            loss = task.loss(model, batch)
        if proximal_mu > 0:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
            loss = loss + 0.5 * proximal_mu * prox
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.train.max_grad_norm > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        total += float(loss.detach())
    model.eval()
    return TrainResult(total / steps, steps, len(dataset), time.perf_counter() - start)


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable state, float32 on the CPU, ready for an ArrayRecord."""
    return {
        n: p.detach().to("cpu", torch.float32).contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def as_floats(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}
