"""Server checkpoints: the ChainState (everything `resume` needs), one file written atomically.

One safetensors file holds the links list (as its own serialized blob), the current
global B + heads, the inner strategy's B-space state (FedAdam moments, FedAvgM
momentum, ...) and, in its JSON metadata, the counters, run config and history. It is
written to a temp file and renamed; the previous checkpoint is kept as `.prev`, so a
crash during a write, or a corrupt file, still leaves a good checkpoint to resume from.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from seedlora.serialize import (
    CorruptFileError,
    atomic_write_bytes,
    links_from_bytes,
    links_to_bytes,
    state_from_bytes,
    state_to_bytes,
)

from .state import ChainState

FILE = "checkpoint.safetensors"
PREVIOUS = "checkpoint.prev.safetensors"
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


def _remove_stale_temps(directory: Path) -> None:
    """Delete temp files of writes that a SIGKILL interrupted (loading never reads them).

    The ServerApp is the only writer of its run directory, so any temp file present
    before a write is an orphan."""
    for stale in directory.glob(f".{FILE}.*"):
        log.warning("removing %s, left by an interrupted checkpoint write", stale.name)
        stale.unlink(missing_ok=True)


def save(directory: str | os.PathLike, ckpt: ChainState) -> Path:
    """Write `ckpt` atomically, keeping the last good one as the `.prev` fallback."""
    directory = Path(directory)
    tensors, tags = _pack_strategy(ckpt.strategy_state)
    tensors.update({f"arrays/{k}": v.float() for k, v in ckpt.arrays.items()})
    tensors["links"] = torch.frombuffer(bytearray(links_to_bytes(ckpt.links)), dtype=torch.uint8)
    meta = {
        "config": ckpt.config,
        "chain_index": ckpt.chain_index,
        "round_in_link": ckpt.round_in_link,
        "global_round": ckpt.global_round,
        "strategy": tags,
        "history": ckpt.history,
    }
    data = state_to_bytes(tensors, meta)
    _remove_stale_temps(directory)
    current = directory / FILE
    if current.exists():
        os.replace(current, directory / PREVIOUS)  # a crash from here on leaves .prev
    return atomic_write_bytes(current, data)


def _read(path: Path) -> ChainState:
    tensors, meta = state_from_bytes(path.read_bytes())
    try:
        _, links = links_from_bytes(tensors["links"].numpy().tobytes())
        arrays = {k[len("arrays/") :]: v for k, v in tensors.items() if k.startswith("arrays/")}
        return ChainState(
            config=meta["config"],
            links=links,
            arrays=arrays,
            chain_index=int(meta["chain_index"]),
            round_in_link=int(meta["round_in_link"]),
            global_round=int(meta["global_round"]),
            strategy_state=_unpack_strategy(tensors, meta["strategy"]),
            history=list(meta["history"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"{path}: incomplete checkpoint ({err})") from err


def load(directory: str | os.PathLike) -> ChainState:
    """The newest readable checkpoint in `directory`; falls back to `.prev` if corrupt."""
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
