"""Local work of one client on one round: train B (and heads), or evaluate. No Flower here.

Training is plain PyTorch: AdamW/Adam/SGD on the trainable parameters only, a fixed
number of local steps (or epochs), gradient clipping, and FedProx's proximal term
`mu/2 * ||theta - theta_global||^2` on the trainable state when mu > 0 (B-space).
Data order is seeded by (seed, round, partition), so reruns and resumes are identical.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from server.config import RunConfig


def pick_device(name: str) -> torch.device:
    """'auto' takes the GPU Ray (or the user) made visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def _train(model, task, dataset, cfg, device, data_seed, proximal_mu) -> TrainResult:
    start = time.perf_counter()
    if len(dataset) == 0:
        raise ValueError("this client has no training examples")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(data_seed),
    )
    steps = cfg.local_steps or max(1, math.ceil(cfg.local_epochs * len(loader)))
    opt = _optimizer(cfg, params)
    model.train()
    total = 0.0
    for _, batch in zip(range(steps), _batches(loader), strict=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = task.loss(model, batch)
        if proximal_mu > 0:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
            loss = loss + 0.5 * proximal_mu * prox
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
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
