"""Local work of one client on one round: train B (and heads), or evaluate. No Flower here.

Training is plain PyTorch: AdamW/Adam/SGD on the trainable parameters only, a fixed
number of local steps (or epochs), gradient clipping, and FedProx's proximal term
`mu/2 * ||theta - theta_global||^2` on the trainable state when mu > 0 (B-space).
Data order is seeded by (seed, round, partition), so reruns and resumes are identical.

`step-mode` picks how a step runs: `eager` (one autograd node per adapter), `grouped`
(q/k/v and gate/up share one `A x` and one node: seedlora/grouped.py), or `graphed` (grouped,
and on CUDA the round's steps replay one CUDA graph of forward, backward, clipping and a
fused capturable AdamW: seedlora/capture.py; a batch of another shape takes a plain step).
Capture warms up on the round's first batch and undoes the warm-up, so the first replay is
the first step; dropout draws, if any, differ from the eager path's. The graph and its
AdamW are kept with the model (`seedlora.capture.kept_step`), so a process that trains one
link's resident model for many clients and rounds captures once: each round the received
B and heads are already in the same tensors, the moments and step counts are zeroed in
place and the round's lr written into the lr tensor the graph reads. A new model (a new
link), a regrouped one or another loss, precision, clipping or optimizer captures anew; so
does a round whose first batch has another shape, and every round of a private copy
(heterogeneous ranks: client.uploads.fit_rank), which lives for one round.

The lr is the one the server sent for the round (server/schedule.py), `lr` of the run
config when none came. With `grad-accum-steps` k, one optimizer step takes k micro-batches
of `batch-size` and backpropagates `loss_j / k` for each, so the gradient it applies is

    g = (1/k) sum_j grad loss_j,

the gradient of the mean loss over the k micro-batches: for a loss that is a mean over
equally sized batches, the gradient of one batch of k x batch-size (up to float rounding
and dropout draws). Clipping and the step see that accumulated g; `local-steps` counts
optimizer steps, so a round reads local-steps x k micro-batches.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from contract.config import RunConfig
from runtime.devices import autocast
from seedlora.capture import CapturedStep, KeptStep, kept_step
from seedlora.grouped import group_siblings, ungroup

log = logging.getLogger("seedlora.train")


@dataclass(frozen=True)
class TrainResult:
    loss: float
    steps: int
    num_examples: int
    seconds: float


def _batches(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def _optimizer(
    cfg: RunConfig,
    params: list[torch.nn.Parameter],
    lr: float | torch.Tensor,
    capturable: bool = False,
) -> torch.optim.Optimizer:
    """The run's optimizer; `capturable`: fused and stepping on the device (for a graph)."""
    if cfg.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.train.weight_decay)
    cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    extra = {"fused": True, "capturable": True} if capturable else {}
    return cls(params, lr=lr, weight_decay=cfg.train.weight_decay, **extra)


def _not_graphed(cfg: RunConfig, device: torch.device, proximal_mu: float) -> str | None:
    """Why this round's steps cannot replay one captured CUDA graph under step-mode graphed
    (None: they can). A graph replays one micro-batch a step on the device, with no
    proximal term (its anchor is per round), no fp16 loss scaler (it syncs to skip steps)
    and an optimizer that steps on the device."""
    t = cfg.train
    reasons = {
        f"the device is {device.type}, not cuda": device.type != "cuda",
        f"grad-accum-steps is {t.grad_accum_steps}, not 1": t.grad_accum_steps != 1,
        f"the FedProx proximal term (mu={proximal_mu:g}) changes every round": proximal_mu != 0,
        "precision fp16 scales the loss with host syncs": t.precision == "fp16",
        f"optimizer {t.optimizer} has no capturable step": t.optimizer not in ("adamw", "adam"),
    }
    return next((why for why, applies in reasons.items() if applies), None)


@functools.cache
def _say_grouped(why: str) -> None:
    """One warning per process and reason: graphed was asked for and grouped steps run."""
    log.warning("step-mode graphed runs grouped steps here: %s", why)


def _graphable(cfg: RunConfig, device: torch.device, proximal_mu: float) -> bool:
    """Whether this round's steps replay one captured CUDA graph (step-mode graphed); when
    graphed was asked for and cannot be, says why once."""
    if cfg.train.step_mode != "graphed":
        return False
    why = _not_graphed(cfg, device, proximal_mu)
    if why is not None:
        _say_grouped(why)
    return why is None


def _kept_step(
    model: torch.nn.Module,
    task,
    cfg: RunConfig,
    device: torch.device,
    params: list[torch.nn.Parameter],
    lr: float,
) -> KeptStep:
    """The model's kept graphed step (module docstring), begun at `lr`. Besides the model,
    a capture bakes in the loss (the task), the autocast precision, the clipping norm and
    the optimizer's kind and weight decay; the lr is a float32 tensor on the device."""
    t = cfg.train
    config = (
        type(task),
        getattr(task, "config", None),
        t.precision,
        t.max_grad_norm,
        t.optimizer,
        t.weight_decay,
        str(device),
    )

    def optimizer() -> torch.optim.Optimizer:
        lr_tensor = torch.tensor(lr, dtype=torch.float32, device=device)
        return _optimizer(cfg, params, lr_tensor, capturable=True)

    kept = kept_step(model, config, params, optimizer)
    kept.begin(lr)
    return kept


@contextlib.contextmanager
def _seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """The global RNG (dropout draws from it) forked and seeded for one round's training."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def train(
    model: torch.nn.Module,
    task,
    dataset,
    cfg: RunConfig,
    device: torch.device,
    *,
    data_seed: int,
    proximal_mu: float = 0.0,
    lr: float | None = None,
) -> TrainResult:
    """Train the model's trainable parameters in place at `lr` (None: the run config's);
    returns the mean training loss over the micro-batches.

    Dropout draws from the global RNG, so it is forked and seeded with `data_seed`:
    the same round on the same partition gives the same B, in any process.
    """
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
    accum = cfg.train.grad_accum_steps
    epoch_steps = math.ceil(len(loader) / accum)  # optimizer steps in one pass over the data
    steps = cfg.train.local_steps or max(1, math.ceil(cfg.train.local_epochs * epoch_steps))
    lr = cfg.train.lr if lr is None else lr
    model.train()
    if cfg.train.step_mode == "eager":
        ungroup(model)
    else:
        group_siblings(model)
    kept = None
    if _graphable(cfg, device, proximal_mu):
        kept = _kept_step(model, task, cfg, device, params, lr)
    opt = kept.optimizer if kept is not None else _optimizer(cfg, params, lr)
    # fp16 gradients of a small loss underflow: scale the loss (bf16 has fp32's range).
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")

    def loss_of(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with autocast(device, cfg.train.precision):
            return task.loss(model, batch)

    def clip() -> None:
        if cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)

    # Losses summed on the device in float64 (a Python float's sum, without a host sync
    # per micro-batch), read once at the end.
    total = torch.zeros((), dtype=torch.float64, device=device)
    captured: CapturedStep | None = None
    batches = _batches(loader)
    with _seeded_rng(device, data_seed):
        for _ in range(steps):
            if kept is not None:
                batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
                if captured is None:
                    captured = kept.ready(loss_of, batch, before_step=clip)
                if captured.fits(batch):
                    total += captured(batch)
                    continue
                batches = itertools.chain([batch], batches)  # another shape: a plain step
            opt.zero_grad(set_to_none=True)
            for _, batch in zip(range(accum), batches, strict=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = loss_of(batch)
                if proximal_mu > 0:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    loss = loss + 0.5 * proximal_mu * prox
                scaler.scale(loss / accum).backward()  # x / 1 is exact: accum 1 is unchanged
                total += loss.detach()
            if cfg.train.max_grad_norm > 0:
                scaler.unscale_(opt)
            clip()
            scaler.step(opt)
            scaler.update()
    model.eval()
    mean = float(total) / (steps * accum)
    return TrainResult(mean, steps, len(dataset), time.perf_counter() - start)


def train_partition(
    model: torch.nn.Module,
    task,
    partition_id: int,
    global_round: int,
    cfg: RunConfig,
    device: torch.device,
    proximal_mu: float = 0.0,
    lr: float | None = None,
) -> TrainResult:
    """One round of `train` on this node's partition, with the round's data seed and lr.

    The seed depends on (run seed, global round, partition) only, so a node that restarts, or the
    SecAgg+ path, replays the same batches as the plain path would.
    """
    data_seed = cfg.adapter.seed * 1_000_003 + global_round * 1009 + partition_id
    dataset = task.train_dataset(partition_id)
    return train(
        model, task, dataset, cfg, device, data_seed=data_seed, proximal_mu=proximal_mu, lr=lr
    )


def cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable state, float32 on the CPU, ready for an ArrayRecord."""
    return {
        n: p.detach().to("cpu", torch.float32).contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def release(device: torch.device) -> None:
    """Hand back what a message allocated on the GPU, so memory does not grow across rounds.

    The resident model (client.resident) stays; the optimizer state, activations and any
    private copy are freed by reference counting when the call returns (none of them is in
    a reference cycle: no gc.collect, which costs 0.4-0.8 s in a process with transformers,
    datasets and Flower loaded). empty_cache hands the freed blocks back, so clients packed
    on one GPU do not hold each other's peak.
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()


def as_floats(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}
