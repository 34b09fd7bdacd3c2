"""Where a model runs and in what precision: shared by the client's training and the server's
central evaluation (client/ and server/ never import each other, so this lives below both).

`precision` (run config) is the dtype of the frozen base and of autocast; trainable
parameters (B, heads) stay float32 master weights, so the wire and the average do not
depend on it.
"""

from __future__ import annotations

import contextlib

import torch

from seedlora.names import valid_device_name  # noqa: F401 - re-exported

# run-config `precision` -> the dtype of the frozen base and of autocast (None: plain fp32).
COMPUTE_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def pick_device(name: str) -> torch.device:
    """'auto' takes the first GPU this process sees, else the CPU.

    Ray sets CUDA_VISIBLE_DEVICES of each client actor to the GPU it assigned, so that GPU
    is `cuda:0` here; `cuda:N` also counts within the visible devices. A plain 'cuda' is
    the current device, made explicit (`cuda:0` unless the process chose another), so a
    device compares equal however it was named.
    """
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def check_device(device: torch.device) -> torch.device:
    """`device`, or a ValueError when it names a GPU this process cannot see."""
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA device is visible to this process")
    if device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device {device}: this process sees {count} CUDA device(s)")
    return device


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
