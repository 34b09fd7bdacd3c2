"""Turn a train reply's upload back into the full-rank float32 state a strategy averages.

Compressed uploads (`upload-codec` other than float32): the reply holds the client's
update in the codec's wire format; the state is what the server sent plus the decoded
update. Heterogeneous ranks: a client of rank r_i <= r_max sends its trained factors with
r_i along the rank axis; they are padded to r_max with the global factor the server sent
(a zero update on the columns the client did not train; seedlora/nested.py says why the
average stays exact). Anything that does not fit is left as it came, so the shape and
dtype check that follows rejects it with the usual message.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from contract import protocol as p
from seedlora.compress import decode
from seedlora.nested import pad_rank, rank_axis

State = dict[str, torch.Tensor]


def _reply_rank(arrays: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]):
    """The one rank r_i of every trained factor in a reply, or the reason there is none."""
    ranks = set()
    for name, full in sent.items():
        axis = rank_axis(name)
        small = arrays.get(name)
        if axis is None or small is None or small.dim() != full.dim():
            continue
        others = [d for i, d in enumerate(small.shape) if i != axis]
        if others != [d for i, d in enumerate(full.shape) if i != axis]:
            return f"{name}: shape {list(small.shape)} does not fit {list(full.shape)}"
        ranks.add(small.shape[axis])
    if len(ranks) > 1:
        return f"factors of different ranks {sorted(ranks)} in one reply"
    return ranks.pop() if ranks else 0


def _reference(name: str, like: torch.Tensor, sent: Mapping[str, torch.Tensor]):
    """The part of the sent state a (possibly reduced-rank) array starts from, or None."""
    full = sent.get(name)
    if full is None or full.dim() != like.dim():
        return None
    if like.shape == full.shape:
        return full
    axis = rank_axis(name)
    if axis is None or like.shape[axis] > full.shape[axis]:
        return None
    ref = full.narrow(axis, 0, like.shape[axis])
    return ref if ref.shape == like.shape else None


def _apply_updates(update: State, sent: Mapping[str, torch.Tensor]) -> State:
    out = {}
    for name, u in update.items():
        ref = _reference(name, u, sent)
        out[name] = u if ref is None else ref + u
    return out


def _pad(arrays: State, sent: Mapping[str, torch.Tensor]) -> State | str:
    rank = _reply_rank(arrays, sent)
    if isinstance(rank, str):
        return rank
    padded = {}
    for name, small in arrays.items():
        full, axis = sent.get(name), rank_axis(name)
        if full is None or axis is None or small.shape == full.shape or small.dtype != full.dtype:
            padded[name] = small
        elif not 1 <= rank <= full.shape[axis]:
            return f"{name}: rank {rank} outside 1..{full.shape[axis]}"
        else:
            padded[name] = pad_rank(small, full, axis)
    return padded


def unpack_reply(
    content: RecordDict, sent: Mapping[str, np.ndarray], codec: str, ranks: bool
) -> str | None:
    """Rewrite a train reply's arrays in place into the full float32 state; or a reason."""
    if list(content.array_records) != [p.ARRAYS]:
        return None  # the array check explains
    arrays = {k: torch.from_numpy(np.array(a.numpy())) for k, a in content[p.ARRAYS].items()}
    reference = {k: torch.from_numpy(np.array(v)) for k, v in sent.items()}
    if codec != "float32":
        try:
            arrays = _apply_updates(decode(arrays, codec), reference)
        except ValueError as err:
            return f"upload-codec {codec}: {err}"
    if ranks:
        arrays = _pad(arrays, reference)
        if isinstance(arrays, str):
            return arrays
    content[p.ARRAYS] = ArrayRecord({k: Array(v.numpy()) for k, v in arrays.items()})
    return None
