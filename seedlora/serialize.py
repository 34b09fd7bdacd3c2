"""Links and tensor states as bytes and files: safetensors (no pickle) plus a JSON header.

Used for the wire (links a client lacks, `links_to_bytes`), one merged link per file (the
server's link log and the client's link cache, `link_to_bytes`) and server checkpoints.
Files are written to a temp name and renamed, so a crash leaves either the old file or the
new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .chain import Link
from .spec import ARuleError


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
    unparsable or incomplete, seedlora.spec.ARuleError on a link made under another A rule.
    """
    tensors, meta = state_from_bytes(data)
    try:
        start = int(meta["start"])
        links = []
        for i, header in enumerate(meta["links"]):
            prefix = f"{start + i}/"
            factors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            links.append(Link.from_header(header, factors))
    except ARuleError:  # readable, but made under another A rule: say so, not "corrupt"
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"bad links payload: {err}") from err
    return start, links


def link_to_bytes(link: Link, index: int, prefix_digest: str) -> bytes:
    """One link as a file of its own: the link at position `index` of a chain whose first
    `index` links have the digest `prefix_digest`.

    The chain's digest through this link is `link.digest(prefix_digest)`, so a reader can
    check the file against the name it was stored under (`link_from_bytes`).

    Args:
        link: its factors (B_bar: (n_out, r), or A_bar: (r, n_in) with swapped roles) are
            stored as float32 under their layer names.
        index: the link's position in the chain (0 for the first).
        prefix_digest: the digest of the links before it (`EMPTY_DIGEST` for index 0).
    """
    tensors = {layer: b.float() for layer, b in link.factors.items()}
    meta = {"index": index, "prefix-digest": prefix_digest, "link": link.header()}
    return state_to_bytes(tensors, meta)


def link_from_bytes(data: bytes) -> tuple[int, str, Link]:
    """(index, prefix digest, link) from `link_to_bytes` output; the link's factors are float32
    CPU tensors. Raises CorruptFileError on anything unparsable or incomplete,
    seedlora.spec.ARuleError on a link made under another A rule."""
    tensors, meta = state_from_bytes(data)
    try:
        index, prefix = int(meta["index"]), str(meta["prefix-digest"])
        return index, prefix, Link.from_header(meta["link"], tensors)
    except ARuleError:
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"bad link file: {err}") from err


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call `write(f)` on a temp file in `path`'s directory, fsync, then rename it to `path`:
    readers see the old file or the whole new one. A crash leaves at most the temp file
    (`.<name>.<random>`, never opened as `path`); an exception removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` via a temp file in the same directory, fsync, then rename."""
    return atomic_write(path, lambda f: f.write(data))
