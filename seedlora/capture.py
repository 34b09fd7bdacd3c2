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
  fused or foreach; its learning rate is baked into the graph, so a new lr needs a new
  capture (or a tensor lr).

Capture runs a few warm-up steps on a side stream first (cuBLAS workspaces, the
optimizer's state, autograd's caches); they would move B and the optimizer state, so both
are put back afterwards and the first replay is the first step, as the eager loop's is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

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
        with torch.cuda.stream(side):
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
