"""Turn a train reply's upload back into the full-rank float32 state a strategy averages.

Compressed uploads (`upload-codec` other than float32): the reply holds the client's
update in the codec's wire format; the state is what the server sent plus the decoded
update. Heterogeneous ranks: a client of rank r_i <= r_max sends its trained factors with
r_i along the rank axis; they are padded to r_max with the global factor the server sent
(a zero update on the columns the client did not train; seedlora/nested.py says why the
average stays exact). An upload that cannot be unpacked raises `BadUpload`; anything else
that does not fit is left as it came, so the shape and dtype check that follows rejects
it with the usual message.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from contract import protocol as p
from seedlora.compress import decode
from seedlora.nested import pad_rank, rank_axis

from .rejections import BadUpload, decoding

State = dict[str, torch.Tensor]


def _reply_rank(arrays: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> int:
    """The one rank r_i of every trained factor in a reply (0 if it has none); raises
    `BadUpload` when the factors do not fit the sent ones or disagree on the rank."""
    ranks = set()
    for name, full in sent.items():
        axis = rank_axis(name)
        small = arrays.get(name)
        if axis is None or small is None or small.dim() != full.dim():
            continue
        others = [d for i, d in enumerate(small.shape) if i != axis]
        if others != [d for i, d in enumerate(full.shape) if i != axis]:
            raise BadUpload(f"{name}: shape {list(small.shape)} does not fit {list(full.shape)}")
        ranks.add(small.shape[axis])
    if len(ranks) > 1:
        raise BadUpload(f"factors of different ranks {sorted(ranks)} in one reply")
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


def _pad(arrays: State, sent: Mapping[str, torch.Tensor]) -> State:
    """Every trained factor of rank r_i padded to the sent r_max (see the module doc)."""
    rank = _reply_rank(arrays, sent)
    padded = {}
    for name, small in arrays.items():
        full, axis = sent.get(name), rank_axis(name)
        if full is None or axis is None or small.shape == full.shape or small.dtype != full.dtype:
            padded[name] = small
        elif not 1 <= rank <= full.shape[axis]:
            raise BadUpload(f"{name}: rank {rank} outside 1..{full.shape[axis]}")
        else:
            padded[name] = pad_rank(small, full, axis)
    return padded


def unpack_content(
    content: RecordDict, sent: Mapping[str, np.ndarray], codec: str, ranks: bool
) -> None:
    """Rewrite a train reply's arrays in place into the full float32 state.

    Raises `BadUpload` (a codec that does not decode, ranks that do not fit) or
    `BadArrays` (bytes that do not decode at all)."""
    if list(content.array_records) != [p.ARRAYS]:
        return  # the array check explains
    with decoding():
        arrays = {k: torch.from_numpy(np.array(a.numpy())) for k, a in content[p.ARRAYS].items()}
        reference = {k: torch.from_numpy(np.array(v)) for k, v in sent.items()}
        if codec != "float32":
            try:
                arrays = _apply_updates(decode(arrays, codec), reference)
            except ValueError as err:
                raise BadUpload(f"upload-codec {codec}: {err}") from err
        if ranks:
            arrays = _pad(arrays, reference)
        content[p.ARRAYS] = ArrayRecord({k: Array(v.numpy()) for k, v in arrays.items()})


@dataclass(frozen=True)
class Unpack:
    """Reply step: restore a train reply's upload to the full float32 state it stands for
    (`sent`: the global state of this round; `codec`: the run's upload-codec; `ranks`:
    whether clients may train a reduced rank). The reply's arrays are rewritten in place."""

    sent: Mapping[str, np.ndarray]
    codec: str
    ranks: bool

    @property
    def needed(self) -> bool:
        """False when every upload is already the float32 state (nothing to unpack)."""
        return self.codec != "float32" or self.ranks

    def __call__(self, reply: Message) -> Message:
        unpack_content(reply.content, self.sent, self.codec, self.ranks)
        return reply
