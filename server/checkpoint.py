"""Server checkpoints: what `resume` reads, written so that a round costs the same at link
200 as at link 2.

A run directory holds
- `links/00000.safetensors`, `links/00001.safetensors`, ...: the link log, one file per merged
  link (seedlora.serialize `link_to_bytes`: the link, its position and the digest of the
  links before it). Each is written once, atomically, by the first `save` whose state has
  that link (the one at close_link), before the checkpoint that counts it.
- `checkpoint.safetensors`: what changes within a link: the global B + heads and the inner
  strategy's B-space state (FedAdam moments, FedAvgM momentum, ...) as tensors; the
  counters, the run config, the number of merged links and their digest in its JSON
  metadata. Its size does not depend on the number of links or rounds. It is written to a
  temp file and renamed every round; the previous one is kept as `.prev`, so a crash
  during a write, or a corrupt file, still leaves a good checkpoint to resume from.

A round writes the checkpoint and stats one log file; nothing scans, hashes or rewrites
the links. `load` reads the newest readable checkpoint (else `.prev`) and the first
`links-merged` files of the log, checked once against the checkpoint's digest (the hash
chain). A log file beyond that count was left by a crash between writing a link and the
checkpoint that counts it: `load` ignores it and `discard_links_from` removes it (the
resumed run merges that link again). The round history is not here: server/report.py
keeps it (rounds.jsonl). A checkpoint written before the link log (links and history
inside it) still loads; `save` then writes the links it lacks into the log.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from seedlora.chain import Chain
from seedlora.serialize import (
    CorruptFileError,
    atomic_write_bytes,
    link_from_bytes,
    link_to_bytes,
    links_from_bytes,
    state_from_bytes,
    state_to_bytes,
)
from seedlora.spec import ARuleError

from .rundir import CHECKPOINT as FILE
from .rundir import PREVIOUS_CHECKPOINT as PREVIOUS
from .state import ChainState

LINKS = "links"  # the link log's folder in the run directory
log = logging.getLogger("flwr")


def _pack_strategy(state: dict[str, object]) -> tuple[dict[str, torch.Tensor], dict]:
    """Flower strategies keep dicts/lists of ndarrays or ArrayRecords; tag and flatten."""
    tensors, tags = {}, {}
    for attr, value in state.items():
        if value is None:
            continue
        if hasattr(value, "to_numpy_ndarrays"):  # an ArrayRecord
            kind, items = "arrayrecord", {k: a.numpy() for k, a in value.items()}
        elif isinstance(value, dict):
            kind, items = "dict", value
        elif isinstance(value, list):
            kind, items = "list", {str(i): v for i, v in enumerate(value)}
        else:
            raise TypeError(f"cannot checkpoint strategy attribute {attr}: {type(value)}")
        tags[attr] = {"kind": kind, "keys": list(items)}
        for key, array in items.items():
            tensors[f"strategy/{attr}/{key}"] = torch.from_numpy(np.ascontiguousarray(array))
    return tensors, tags


def _unpack_strategy(tensors: dict[str, torch.Tensor], tags: dict) -> dict[str, object]:
    from flwr.app import ArrayRecord

    state: dict[str, object] = {}
    for attr, tag in tags.items():
        items = {k: tensors[f"strategy/{attr}/{k}"].numpy() for k in tag["keys"]}
        if tag["kind"] == "arrayrecord":
            state[attr] = ArrayRecord({k: torch.from_numpy(v) for k, v in items.items()})
        elif tag["kind"] == "list":
            state[attr] = [items[str(i)] for i in range(len(items))]
        else:
            state[attr] = items
    return state


def link_path(directory: str | os.PathLike, index: int) -> Path:
    """The link log's file for the link at position `index`."""
    return Path(directory) / LINKS / f"{index:05d}.safetensors"


def _remove_stale_temps(directory: Path) -> None:
    """Delete temp files of writes that a SIGKILL interrupted (loading never reads them).

    The ServerApp is the only writer of its run directory, so any temp file present
    before a write is an orphan."""
    for stale in directory.glob(f".{FILE}.*"):
        log.warning("removing %s, left by an interrupted checkpoint write", stale.name)
        stale.unlink(missing_ok=True)


def _append_links(directory: Path, links: Chain) -> None:
    """Write the links the log lacks: normally none, or the one close_link just merged.

    The log is written in order and never rewritten, so the files missing are a tail:
    one stat when the log is complete."""
    have = len(links)
    while have > 0 and not link_path(directory, have - 1).exists():
        have -= 1
    for index in range(have, len(links)):
        data = link_to_bytes(links[index], index, links.prefix_digest(index))
        atomic_write_bytes(link_path(directory, index), data)


def discard_links_from(directory: str | os.PathLike, count: int) -> list[Path]:
    """Remove the log's files for positions >= `count` (and temp files of interrupted
    writes): what a crash between a link file and its checkpoint, or an earlier run in the
    same directory, left behind. Returns the paths removed."""
    removed = []
    for path in sorted((Path(directory) / LINKS).glob("*")):
        stem = path.name.split(".")[0]
        if path.name.startswith(".") or not stem.isdigit() or int(stem) >= count:
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.warning("removed %d link log file(s) beyond the checkpoint's %d", len(removed), count)
    return removed


def clear(directory: str | os.PathLike) -> None:
    """Remove the checkpoints and link log an earlier run left in `directory` (a fresh run
    starting there: its state must never be mistaken for this run's)."""
    directory = Path(directory)
    for name in (FILE, PREVIOUS):
        (directory / name).unlink(missing_ok=True)
    discard_links_from(directory, 0)


def save(directory: str | os.PathLike, ckpt: ChainState) -> Path:
    """Write the links the log lacks, then `ckpt` atomically, keeping the last good
    checkpoint as the `.prev` fallback."""
    directory = Path(directory)
    _append_links(directory, ckpt.links)
    tensors, tags = _pack_strategy(ckpt.strategy_state)
    tensors.update({f"arrays/{k}": v.float() for k, v in ckpt.arrays.items()})
    meta = {
        "config": ckpt.config,
        "chain_index": ckpt.chain_index,
        "round_in_link": ckpt.round_in_link,
        "global_round": ckpt.global_round,
        "strategy": tags,
        "links_merged": len(ckpt.links),
        "links_digest": ckpt.links.digest,
        "scale": ckpt.scale,
        "a_rule": ckpt.a_rule,
    }
    data = state_to_bytes(tensors, meta)
    _remove_stale_temps(directory)
    current = directory / FILE
    if current.exists():
        os.replace(current, directory / PREVIOUS)  # a crash from here on leaves .prev
    return atomic_write_bytes(current, data)


def read_links(directory: str | os.PathLike, count: int, digest: str) -> Chain:
    """The first `count` links of the log, checked against their digest `digest`.

    Raises CorruptFileError if a file is missing, unreadable, out of place or the links do
    not hash to `digest`."""
    links = Chain()
    for index in range(count):
        path = link_path(directory, index)
        try:
            stored, prefix, link = link_from_bytes(path.read_bytes())
        except OSError as err:
            raise CorruptFileError(f"link log: {err}") from err
        if stored != index or prefix != links.digest:
            raise CorruptFileError(f"{path}: not link {index} of this chain")
        links.append(link)
    if links.digest != digest:
        raise CorruptFileError(f"link log: {count} links do not hash to {digest[:12]}")
    return links


def _read(path: Path) -> ChainState:
    tensors, meta = state_from_bytes(path.read_bytes())
    try:
        if "links" in tensors:  # written before the link log: links and history inside
            _, links = links_from_bytes(tensors["links"].numpy().tobytes())
            links, history = Chain(links), list(meta["history"])
        else:
            links = read_links(path.parent, int(meta["links_merged"]), meta["links_digest"])
            history = []
        arrays = {k[len("arrays/") :]: v for k, v in tensors.items() if k.startswith("arrays/")}
        return ChainState(
            config=meta["config"],
            links=links,
            arrays=arrays,
            chain_index=int(meta["chain_index"]),
            round_in_link=int(meta["round_in_link"]),
            global_round=int(meta["global_round"]),
            strategy_state=_unpack_strategy(tensors, meta["strategy"]),
            history=history,
            scale=meta.get("scale", ""),
            a_rule=meta.get("a_rule", ""),
        )
    except (CorruptFileError, ARuleError):  # ARuleError: readable, made under another rule
        raise
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{path}: incomplete checkpoint ({err})") from err


def load(directory: str | os.PathLike) -> ChainState:
    """The newest readable checkpoint in `directory` with its links from the log (its
    `history` is empty: server/report.py keeps it); falls back to `.prev` if corrupt.

    A link made under another A rule is no corruption: its seedlora.spec.ARuleError is
    raised as it is (the state's own `a_rule` is checked by the caller, who knows the
    run's kind)."""
    directory = Path(directory)
    errors = []
    for name in (FILE, PREVIOUS):
        path = directory / name
        if not path.exists():
            errors.append(f"{name}: missing")
            continue
        try:
            return _read(path)
        except CorruptFileError as err:
            log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, err)
            errors.append(str(err))
    raise FileNotFoundError(f"no usable checkpoint in {directory}: {'; '.join(errors)}")
