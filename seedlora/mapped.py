"""A model's tensors as one memory-mapped safetensors file: a master many processes share.

`write_merged(path, model, links)` writes every parameter and buffer of `model` with
`links` merged, tensor by tensor: an adapted layer's weight is cloned, the links are merged
into the clone with `apply_link` (per layer, in link order: the same bits as merging the
whole model in place, since a merge touches only its own layer), written and dropped. So
a writer holds one layer of new memory, never a second model, and `model` (which may
itself be mapped, read-only) is not changed. The file appears complete or not at all
(`atomic_write`: temp file, fsync, rename).

`map_file(path)` gives the file's tensors over one private mapping of it (copy-on-write):
reading shares the page cache with every process that maps the same file, so N processes
hold one copy (PSS counts it once), and a write into a tensor would copy the page, never
reach the file or another process. Nothing here writes into them: `fill` points a model's
parameters and buffers at them, and the adapted layers never change their base weights.

Format: standard safetensors (`safetensors.safe_open` reads it), tensors ordered by
element size, largest first, so each is aligned in the mapping; tied tensors are stored
once and named in the metadata (`aliases`).
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn

from .chain import Link, apply_link
from .serialize import CorruptFileError, atomic_write

ALIASES = "aliases"  # metadata key: tied name -> the name its tensor is stored under
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    return itertools.chain(
        model.named_parameters(remove_duplicate=False),
        model.named_buffers(remove_duplicate=False),
    )


def stored_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for a floating tensor of lower precision (a bf16/fp16 checkpoint: the cast
    `model.float()` makes, exactly), else the tensor's own dtype."""
    if tensor.is_floating_point() and tensor.element_size() < 4:
        return torch.float32
    return tensor.dtype


def stored_tensors(model: nn.Module) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """(every distinct parameter and buffer of `model` as (first name, tensor), in file
    order; every other name of a tied tensor -> its first name)."""
    first: dict[int, str] = {}
    stored, aliases = [], {}
    for name, tensor in _named_tensors(model):
        seen = first.setdefault(id(tensor), name)
        if seen == name:
            stored.append((name, tensor))
        else:
            aliases[name] = seen
    stored.sort(key=lambda item: -stored_dtype(item[1]).itemsize)  # stable: model order
    return stored, aliases


class _Merges:
    """The merged values of the tensors that `links` change, one layer at a time."""

    def __init__(self, model: nn.Module, links: Sequence[Link]):
        self.model, self.links = model, links
        self.owner: dict[int, str] = {}  # id(parameter) -> the adapted layer it belongs to
        for layer in {s.layer for link in links for s in link.specs}:
            for param in model.get_submodule(layer)._parameters.values():
                if param is not None:
                    self.owner[id(param)] = layer
        self._layer: str | None = None
        self._values: dict[int, torch.Tensor] = {}

    def value(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` itself, or its value with the links merged if a link changes it."""
        layer = self.owner.get(id(tensor))
        if layer is None:
            return tensor
        if layer != self._layer:
            self._values = {}  # the last layer's clones go before the next are made
            self._values, self._layer = self._merge(layer), layer
        return self._values[id(tensor)]

    def _merge(self, layer: str) -> dict[int, torch.Tensor]:
        """Clone `layer`'s parameters, merge every link's part for it into the clones
        (`apply_link` of a one-layer link, in link order), put the originals back."""
        module = self.model.get_submodule(layer)
        originals = {k: p for k, p in module._parameters.items() if p is not None}
        clones = {
            k: nn.Parameter(p.detach().to(stored_dtype(p), copy=True), requires_grad=False)
            for k, p in originals.items()
        }
        module._parameters.update(clones)
        try:
            for link in self.links:
                spec = next((s for s in link.specs if s.layer == layer), None)
                if spec is not None:
                    part = Link(link.alpha, (spec,), {layer: link.factors[layer]}, link.frozen)
                    apply_link(self.model, part)
        finally:
            module._parameters.update(originals)
        return {id(originals[k]): clones[k].data for k in originals}


def _write_tensor(f: BinaryIO, tensor: torch.Tensor) -> None:
    if tensor.numel():
        data = tensor.detach().to(stored_dtype(tensor)).contiguous()
        f.write(data.reshape(-1).view(torch.uint8).numpy())


def write_merged(path: str | os.PathLike, model: nn.Module, links: Sequence[Link] = ()) -> Path:
    """Write `model`'s parameters and buffers, with `links` merged in order, to `path`
    (module docstring). `model` is a plain (unadapted) CPU model; it is not changed. A
    bf16/fp16 model (a checkpoint as stored, its pages still mapped from disk) is written
    in float32 tensor by tensor (`stored_dtype`), and merged in float32: the bits of
    `model.float()` then `apply_link`, without a float32 copy of the whole model.

    Returns the path. Raises ValueError for a tensor on the meta device or of a dtype
    safetensors cannot store."""
    stored, aliases = stored_tensors(model)
    header: dict[str, dict] = {"__metadata__": {"format": "pt", ALIASES: json.dumps(aliases)}}
    offset = 0
    for name, tensor in stored:
        dtype = stored_dtype(tensor)
        if tensor.is_meta or dtype not in _CODES:
            raise ValueError(f"cannot store {name} ({tensor.dtype}, {tensor.device})")
        size = tensor.numel() * dtype.itemsize
        header[name] = {
            "dtype": _CODES[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors writes it
    merges = _Merges(model, links)

    def write(f: BinaryIO) -> None:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        with torch.no_grad():
            for _, tensor in stored:
                _write_tensor(f, merges.value(tensor))

    return atomic_write(path, write)


def map_file(fileno: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(name -> tensor over a private mapping of the open file `fileno`, aliases).

    The tensors keep the mapping alive; it is unmapped when the last of them goes (closing
    or unlinking the file does not affect it). Raises CorruptFileError for anything that
    is not a complete file of this format."""
    size = os.fstat(fileno).st_size
    if size < 8:
        raise CorruptFileError(f"master file of {size} bytes")
    view = mmap.mmap(fileno, 0, access=mmap.ACCESS_COPY)
    length = int.from_bytes(view[:8], "little")
    try:
        header = json.loads(view[8 : 8 + length])
        meta = header.pop("__metadata__", None) or {}
        aliases = json.loads(meta.get(ALIASES, "{}"))
        tensors = {}
        for name, info in header.items():
            dtype, shape = _DTYPES[info["dtype"]], [int(n) for n in info["shape"]]
            start, end = (8 + length + int(x) for x in info["data_offsets"])
            count = math.prod(shape)
            if end - start != count * dtype.itemsize or end > size:
                raise CorruptFileError(f"{name}: bytes {start}-{end} of {size}")
            tensors[name] = (
                torch.frombuffer(view, dtype=dtype, count=count, offset=start).view(shape)
                if count
                else torch.empty(shape, dtype=dtype)
            )
    except (KeyError, TypeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise CorruptFileError(f"bad master file: {err}") from err
    return tensors, aliases


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module, _, leaf = name.rpartition(".")
    return model.get_submodule(module), leaf


def fill(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str]
) -> nn.Module:
    """Point every parameter and buffer of `model` at `tensors` (no copy), ties as `aliases`
    says; `requires_grad` as `model` had it. `model` is a skeleton (tensors on the meta
    device) or a model of the same modules (an earlier master, or the checkpoint a master
    was written from: a floating tensor takes the file's float dtype).

    Raises ValueError when a name or shape differs from the file's, a dtype does (other
    than float for float), or the file holds a tensor the model lacks."""
    params: dict[str, nn.Parameter] = {}
    used: set[str] = set()
    for name, old in list(_named_tensors(model)):
        key = aliases.get(name, name)
        new = tensors.get(key)
        floats = new is not None and new.is_floating_point() and old.is_floating_point()
        if new is None or new.shape != old.shape or (new.dtype != old.dtype and not floats):
            got = None if new is None else (tuple(new.shape), new.dtype)
            want = (tuple(old.shape), old.dtype)
            raise ValueError(f"master file: {name} is {got}, the model's is {want}")
        owner, leaf = _owner(model, name)
        used.add(key)
        if isinstance(old, nn.Parameter):
            if key not in params:
                params[key] = nn.Parameter(new, requires_grad=old.requires_grad)
            owner._parameters[leaf] = params[key]
        else:
            owner._buffers[leaf] = new
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"master file: tensors the model lacks: {extra[:5]}")
    return model
