"""Compressed uploads: a client's update (trained state minus the state it received) in
fewer bits, with error feedback so what rounding loses in one round is sent in the next.

Codecs (wire tensors per array `name`):
  float32   the update as is (no compression)
  float16   `name` as float16
  bfloat16  `name` as the bfloat16 bit pattern in an int16 tensor (numpy has no bfloat16)
  int8      `name` as int8 plus `name#scale` (float32): one scale per index of the
            array's shorter axis, i.e. per rank component of a factor (B: n_out x r has
            r scales), so the upload is a quarter of float32 plus 4 r bytes per factor.

Error feedback (EF-SGD style): the client sends Q(u + e) for its update u and residual
e, and keeps e <- (u + e) - deQ(Q(u + e)). The server decodes and averages as usual; its
average is exact in weight space for what it received (the rule stays linear in B).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .names import CODECS, Codec  # noqa: F401 - re-exported

SCALE = "#scale"
INT8_MAX = 127.0


def _scale_axis(t: torch.Tensor) -> int | None:
    """The axis that keeps its own scales (a 2-D array's shorter one); None: one scale."""
    if t.dim() != 2:
        return None
    return 0 if t.shape[0] <= t.shape[1] else 1


def _int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales: (k,)) of a float32 tensor, k as in `_scale_axis`."""
    axis = _scale_axis(t)
    mag = t.abs().amax() if axis is None else t.abs().amax(dim=1 - axis, keepdim=True)
    scale = (mag / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(t / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.reshape(-1).to(torch.float32)


def encode(update: Mapping[str, torch.Tensor], codec: str) -> dict[str, torch.Tensor]:
    """The wire tensors of an update under `codec` (see the module docstring).

    Args:
        update: name -> tensor, any shape, e.g. a B update: (n_out, r); cast to float32
            and moved to the CPU first.
        codec: one of `CODECS`.

    Returns:
        name -> CPU tensor of the same shape in the codec's wire dtype (`WIRE_DTYPE`); for
        int8 also `name#scale`: float32 (k,), k = the shorter axis of a 2-D tensor (r for
        B: (n_out, r)), else k = 1. Raises ValueError on an unknown codec.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in update.items():
        t = t.detach().to("cpu", torch.float32).contiguous()
        if codec == "float32":
            out[name] = t
        elif codec == "float16":
            out[name] = t.to(torch.float16)
        elif codec == "bfloat16":
            out[name] = t.to(torch.bfloat16).view(torch.int16)
        elif codec == "int8":
            out[name], out[name + SCALE] = _int8(t)
        else:
            raise ValueError(f"upload-codec: unknown {codec!r}; expected one of {CODECS}")
    return out


WIRE_DTYPE = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.int16,
    "int8": torch.int8,
}


def decode(wire: Mapping[str, torch.Tensor], codec: str) -> dict[str, torch.Tensor]:
    """The float32 update from its wire tensors (inverse of `encode`, up to rounding).

    Args:
        wire: name -> tensor as `encode` made it, in `WIRE_DTYPE[codec]`, plus
            `name#scale`: float32 (k,) per array for int8.
        codec: the codec the sender used.

    Returns:
        name -> float32 tensor of the wire tensor's shape and device. Raises ValueError
        (saying what does not fit) on unexpected arrays, dtypes or scale shapes.
    """
    names = [k for k in wire if not k.endswith(SCALE)]
    extra = sorted(set(wire) - set(names) - {n + SCALE for n in names})
    if extra:
        raise ValueError(f"unexpected arrays {extra[:3]}")
    out = {}
    for name in names:
        t = wire[name]
        if t.dtype != WIRE_DTYPE[codec]:
            raise ValueError(f"{name}: {t.dtype} on the wire, expected {WIRE_DTYPE[codec]}")
        if codec == "bfloat16":
            out[name] = t.view(torch.bfloat16).float()
        elif codec == "int8":
            out[name] = _dequantize(name, t, wire.get(name + SCALE))
        else:
            out[name] = t.float()
    return out


def _dequantize(name: str, q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """`q * scale` as float32, after checking the scales: float32 (k,) as `_int8` makes."""
    axis = _scale_axis(q)
    n = 1 if axis is None else q.shape[axis]
    if scale is None or scale.dtype != torch.float32 or tuple(scale.shape) != (n,):
        got = None if scale is None else f"{scale.dtype}{list(scale.shape)}"
        raise ValueError(f"{name}{SCALE}: {got}, expected float32[{n}]")
    if axis is not None:
        scale = scale.reshape((n, 1) if axis == 0 else (1, n))
    return q.float() * scale


def compress(
    update: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor] | None,
    codec: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(wire tensors, new residual) for `update` plus the carried `residual` (error feedback).

    Sending Q(u + e) and keeping the rounding loss as the next e means that loss is sent in
    a later round instead of dropped (within one chain index).

    Args:
        update: name -> the client's update (trained state minus received state), any
            float dtype, on the CPU; e.g. B: (n_out, r).
        residual: the new residual this function returned last round (same keys and
            shapes), or None. One whose keys or shapes do not match (a new chain index,
            another rank) is dropped.
        codec: one of `CODECS`.

    Returns:
        (wire, residual): the `encode` output for `update + residual`, and name -> float32
        tensor of the update's shape, `(update + residual) - decode(wire)`.
    """
    carried = {k: v.float() for k, v in update.items()}
    if residual is not None and all(
        k in residual and residual[k].shape == v.shape for k, v in carried.items()
    ):
        carried = {k: v + residual[k].float() for k, v in carried.items()}
    wire = encode(carried, codec)
    sent = decode(wire, codec)
    return wire, {k: carried[k] - sent[k] for k in carried}
