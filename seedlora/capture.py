"""A whole training step (forward, backward, optimizer) recorded once as a CUDA graph.

A small model's step on a fast GPU is bound by the host: Python, autograd and the
dispatcher issue ~10^4 kernels a step, and the GPU waits between them. Replaying a CUDA
graph issues the same kernels with one launch, so the step's wall time falls to the GPU's
busy time. What capture needs, and what this module assumes:

- static shapes and addresses: the batch is copied into tensors made at capture, and a
  batch of another shape must take the eager step instead (`CapturedStep.fits`);
- no host-device synchronisation inside the step (no `.item()`, no data-dependent
  shapes): the B-only nodes (`seedlora.fused`, `seedlora.grouped`) issue none;
- an optimizer whose step runs on the device: `torch.optim.AdamW(..., capturable=True)`,
  fused or foreach; a float learning rate is baked into the graph, a tensor one (on the
  device) is read from its address at every replay.

Capture runs a few warm-up steps on a side stream first (cuBLAS workspaces, the
optimizer's state, autograd's caches); they would move B and the optimizer state, so both
are put back afterwards and the first replay is the first step, as the eager loop's is.
The warm-up draws from a forked RNG, so a replay's dropout draws depend on the RNG state
at the replay only (the same for a fresh capture and a kept one).

A capture costs ~0.6-0.9 s on a 7B model, about half a 10-step round, so `KeptStep` keeps
the graph and its optimizer for every round of one model (one link's resident model):

    round t:  B, heads <- received (in place: the same tensors)
              m, v, step <- 0 (in place)          lr tensor <- lr_t (in place)
              replay the graph once per step

which is what a fresh capture with a fresh AdamW at lr_t would run. `kept_step` gives a
model's kept step while nothing the graph points into has changed (`Layout`), else a new
one. A tensor lr is a float32: the step equals a float lr's exactly when lr is a float32
number, and otherwise within lr's float32 rounding (2^-24 relative).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from torch import nn

from .injection import adapter_layers

Batch = Mapping[str, torch.Tensor]


class CapturedStep:
    """`loss_fn(batch)`, its backward and `optimizer.step()`, as one replayable CUDA graph.

    Args:
        loss_fn: maps a batch (name -> tensor on the GPU) to a scalar loss.
        params: the trained parameters (restored after the warm-up steps).
        optimizer: built with `capturable=True` on those parameters, or None (a step that
            only runs forward and backward, like the bench's no-adapter floor).
        example: a batch of the shapes every replayed batch must have.
        warmup: eager steps on a side stream before capture.
        before_step: run between backward and the optimizer (gradient clipping), captured.

    Calling the object with a batch copies it into the static inputs, replays the graph
    and returns the loss (a tensor the next call overwrites: clone it to keep it).
    """

    def __init__(
        self,
        loss_fn: Callable[[Batch], torch.Tensor],
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
        example: Batch,
        warmup: int = 3,
        before_step: Callable[[], None] | None = None,
    ):
        self.static = {k: v.detach().clone() for k, v in example.items()}
        before = _snapshot(params, optimizer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.random.fork_rng(devices=[side.device]), torch.cuda.stream(side):
            for _ in range(warmup):
                _eager_step(loss_fn, self.static, optimizer, before_step)
        torch.cuda.current_stream().wait_stream(side)
        _restore(before, params, optimizer)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = _eager_step(loss_fn, self.static, optimizer, before_step, zero=False)

    def fits(self, batch: Batch) -> bool:
        """Whether `batch` has the captured names, shapes and dtypes (else: step eagerly)."""
        return batch.keys() == self.static.keys() and all(
            v.shape == self.static[k].shape and v.dtype == self.static[k].dtype
            for k, v in batch.items()
        )

    def __call__(self, batch: Batch) -> torch.Tensor:
        for k, v in batch.items():
            self.static[k].copy_(v, non_blocking=True)
        self.graph.replay()
        return self.loss


def _eager_step(
    loss_fn: Callable[[Batch], torch.Tensor],
    batch: Batch,
    optimizer: torch.optim.Optimizer | None,
    before_step: Callable[[], None] | None,
    zero: bool = True,
) -> torch.Tensor:
    if zero and optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(batch)
    loss.backward()
    if before_step is not None:
        before_step()
    if optimizer is not None:
        optimizer.step()
    return loss.detach()


def _state_tensors(optimizer: torch.optim.Optimizer | None) -> dict[tuple[int, str], torch.Tensor]:
    if optimizer is None:
        return {}
    return {
        (id(p), k): v
        for p, state in optimizer.state.items()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }


def _snapshot(
    params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer | None
) -> tuple[list[torch.Tensor], dict[tuple[int, str], torch.Tensor]]:
    with torch.no_grad():
        values = [p.detach().clone() for p in params]
        state = {k: v.clone() for k, v in _state_tensors(optimizer).items()}
    return values, state


def _restore(
    before: tuple[list[torch.Tensor], dict[tuple[int, str], torch.Tensor]],
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Parameters and optimizer state back to the snapshot, in place (the graph keeps their
    addresses); state the warm-up created is zeroed, which is what a fresh AdamW starts
    from (step 0, zero moments)."""
    values, state = before
    with torch.no_grad():
        for p, v in zip(params, values, strict=True):
            p.copy_(v)
        for key, t in _state_tensors(optimizer).items():
            if key in state:
                t.copy_(state[key])
            else:
                t.zero_()


def reset_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Every state tensor zeroed in place: Adam(W)'s moments and step counts start from zero,
    so the next step is a fresh optimizer's first, at the addresses a graph reads."""
    tensors = list(_state_tensors(optimizer).values())
    if tensors:
        with torch.no_grad():
            torch._foreach_zero_(tensors)  # one launch per device and dtype, not per tensor


class Layout:
    """What a captured step's kernels point into, compared by identity and address.

    A graph holds raw addresses, so it stays valid while the model keeps every parameter
    and buffer as the same tensor at the same address (`.data =` moves one) with the same
    `requires_grad`, and every adapter its A-spec and sibling group (they own the (s A)^T
    and column tensors made on a first forward: `set_spec`, `ungroup` then `group_siblings`
    make new ones). Holding the objects keeps their ids from being reused meanwhile.
    """

    def __init__(self, model: nn.Module):
        tensors = [*model.parameters(), *model.buffers()]
        adapters = (
            (getattr(m, "spec", None), getattr(m, "group", None)) for _, m in adapter_layers(model)
        )
        self.objects: list[object] = [*tensors, *itertools.chain.from_iterable(adapters)]
        self.marks = [(t.data_ptr(), t.requires_grad) for t in tensors]

    def same(self, other: Layout) -> bool:
        return (
            self.marks == other.marks
            and len(self.objects) == len(other.objects)
            and all(a is b for a, b in zip(self.objects, other.objects, strict=True))
        )


class KeptStep:
    """A captured step and the optimizer it steps, kept across runs of steps (rounds) on one
    model (module docstring), so capture is paid once.

    Per run: load the trainable state into the same parameters in place, `begin(lr)`, then
    `ready(loss_fn, first_batch, ...)` gives the captured step, capturing only when there is
    none yet or the batch has another shape (the old graph is freed first).

    Args:
        params: the trained parameters.
        optimizer: on `params`, capturable, its lr a tensor on the device in every group.
        config: whatever else the capture bakes in (loss, precision, clipping, optimizer
            kind): a kept step is reused only under an equal config.
        layout: the model's layout now.

    Attributes:
        captures: graphs captured so far.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        config: Hashable,
        layout: Layout,
    ):
        if not all(isinstance(g["lr"], torch.Tensor) for g in optimizer.param_groups):
            raise ValueError("a kept step needs the optimizer's lr as a tensor (graphs read it)")
        self.params = list(params)
        self.optimizer = optimizer
        self.config = config
        self.layout = layout
        self.step: CapturedStep | None = None
        self.captures = 0

    def begin(self, lr: float) -> None:
        """A new run at `lr`: moments and step counts zeroed, the lr written, in place."""
        reset_optimizer(self.optimizer)
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)

    def ready(
        self,
        loss_fn: Callable[[Batch], torch.Tensor],
        example: Batch,
        before_step: Callable[[], None] | None = None,
    ) -> CapturedStep:
        """The captured step for batches like `example` (`CapturedStep`'s arguments)."""
        if self.step is None or not self.step.fits(example):
            self.step = None  # the old graph's memory goes back before the new capture
            self.step = CapturedStep(
                loss_fn, self.params, self.optimizer, example, before_step=before_step
            )
            self.captures += 1
        return self.step


# A model's kept step, dropped with the model (weakly keyed; a KeptStep holds the model's
# tensors and submodules, never the model itself).
_KEPT: weakref.WeakKeyDictionary[nn.Module, KeptStep] = weakref.WeakKeyDictionary()


def kept_step(
    model: nn.Module,
    config: Hashable,
    params: Sequence[torch.Tensor],
    optimizer: Callable[[], torch.optim.Optimizer],
) -> KeptStep:
    """`model`'s kept step if it has one under an equal `config` and the same `Layout`,
    else a new one on `optimizer()` (any old one forgotten first)."""
    layout = Layout(model)
    kept = _KEPT.get(model)
    if kept is not None and kept.config == config and kept.layout.same(layout):
        return kept
    forget(model)
    kept = _KEPT[model] = KeptStep(params, optimizer(), config, layout)
    return kept


def kept_for(model: nn.Module) -> KeptStep | None:
    """`model`'s kept step, if any (for inspection: `captures`)."""
    return _KEPT.get(model)


def forget(model: nn.Module) -> None:
    """Drop `model`'s kept step: its graph's memory pool and optimizer state go back now."""
    _KEPT.pop(model, None)
