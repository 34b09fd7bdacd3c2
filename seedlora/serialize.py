"""Links and tensor states as bytes and files: safetensors (no pickle) plus a JSON header.

Used for the wire (links a client lacks), the client's link cache and server
checkpoints. Files are written to a temp name and renamed, so a crash leaves either the
old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .chain import Link


class CorruptFileError(ValueError):
    """A checkpoint, cache or payload could not be parsed."""


def state_to_bytes(tensors: Mapping[str, torch.Tensor], meta: Mapping | None = None) -> bytes:
    """Tensors plus a JSON-able `meta` dict as one safetensors blob (no pickle).

    Args:
        tensors: name -> tensor, any shape, dtype and device (moved to the CPU, made
            contiguous; dtypes are kept).
        meta: JSON-able dict, stored in the safetensors header.

    Returns:
        The safetensors bytes.
    """
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return save(clean, metadata={"meta": json.dumps(meta or {}, sort_keys=True)})


def state_from_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    """Inverse of `state_to_bytes`; raises CorruptFileError on anything unparsable.

    Returns:
        (name -> CPU tensor in its stored dtype and shape, the `meta` dict).
    """
    try:
        tensors = load(data)
        # The safetensors format: 8-byte little-endian header size, then a JSON header.
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    except (SafetensorError, ValueError, KeyError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"unreadable safetensors payload: {err}") from err
    return tensors, meta


def links_to_bytes(links: Sequence[Link], start: int = 0) -> bytes:
    """Serialize `links`, a run of the whole links list from position `start` on.

    A client that already holds the first `start` links is sent only the rest.

    Args:
        links: consecutive links; each factor B_bar: (n_out, r) (A_bar: (r, n_in) with
            swapped roles) is stored as float32 under "<position>/<layer>".
        start: the position of `links[0]` in the whole links list.

    Returns:
        The safetensors bytes, with the links' headers and `start` in its metadata.
    """
    tensors, headers = {}, []
    for i, link in enumerate(links):
        headers.append(link.header())
        for layer, b in link.factors.items():
            tensors[f"{start + i}/{layer}"] = b.float()
    return state_to_bytes(tensors, {"start": start, "links": headers})


def links_from_bytes(data: bytes) -> tuple[int, list[Link]]:
    """(position of the first link in the whole list, links) from `links_to_bytes` output.

    The links' factors are float32 CPU tensors. Raises CorruptFileError on anything
    unparsable or incomplete.
    """
    tensors, meta = state_from_bytes(data)
    try:
        start = int(meta["start"])
        links = []
        for i, header in enumerate(meta["links"]):
            prefix = f"{start + i}/"
            factors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            links.append(Link.from_header(header, factors))
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"bad links payload: {err}") from err
    return start, links


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same directory, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
