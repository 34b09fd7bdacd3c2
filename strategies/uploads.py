"""Turn a train reply's upload back into the full-rank float32 state a strategy averages.

Heterogeneous ranks: a client of rank r_i <= r_max sends its trained factors with r_i
along the rank axis; they are padded to r_max with the global factor the server sent
(a zero update on the columns the client did not train; seedlora/nested.py says why the
average stays exact). Anything that does not fit is left as it came, so the shape check
that follows rejects it with the usual message.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from seedlora.nested import pad_rank, rank_axis

from . import protocol as p


def _reply_rank(arrays: Mapping[str, np.ndarray], sent: Mapping[str, np.ndarray]) -> int | str:
    """The one rank r_i of every trained factor in a reply, or the reason there is none."""
    ranks = set()
    for name, full in sent.items():
        axis = rank_axis(name)
        small = arrays.get(name)
        if axis is None or small is None or small.ndim != full.ndim:
            continue
        others = [d for i, d in enumerate(small.shape) if i != axis]
        if others != [d for i, d in enumerate(full.shape) if i != axis]:
            return f"{name}: shape {list(small.shape)} does not fit {list(full.shape)}"
        ranks.add(small.shape[axis])
    if len(ranks) > 1:
        return f"factors of different ranks {sorted(ranks)} in one reply"
    return ranks.pop() if ranks else 0


def pad_reply(content: RecordDict, sent: Mapping[str, np.ndarray]) -> str | None:
    """Pad a reduced-rank reply in place to the sent (full) shapes; a reason if it cannot."""
    if list(content.array_records) != [p.ARRAYS]:
        return None  # the array check explains
    arrays = {k: a.numpy() for k, a in content[p.ARRAYS].items()}
    rank = _reply_rank(arrays, sent)
    if isinstance(rank, str):
        return rank
    padded = {}
    for name, small in arrays.items():
        full, axis = sent.get(name), rank_axis(name)
        if full is None or axis is None or small.shape == full.shape or small.dtype != full.dtype:
            padded[name] = small
            continue
        if not 1 <= rank <= full.shape[axis]:
            return f"{name}: rank {rank} outside 1..{full.shape[axis]}"
        ref = torch.from_numpy(np.array(full))
        padded[name] = pad_rank(torch.from_numpy(np.array(small)), ref, axis).numpy()
    content[p.ARRAYS] = ArrayRecord({k: Array(v) for k, v in padded.items()})
    return None
