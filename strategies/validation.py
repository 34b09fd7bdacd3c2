"""Check every reply before any strategy sees it: a bad reply is logged, never averaged.

A reply made for another link (stale chain index or links digest), another run, with
missing/extra keys, a wrong shape or dtype, NaN/Inf, or an absurd `num-examples` is
rejected with the node id and the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Message, RecordDict

from contract import protocol as p


@dataclass(frozen=True)
class Expectation:
    """What a valid reply for this round must look like."""

    run_id: int
    chain_index: int
    links_digest: str
    arrays: dict[str, tuple[tuple[int, ...], str]] | None  # None for evaluate replies
    max_num_examples: int
    # Rewrites a train reply's arrays into the expected full state (reduced rank, codecs:
    # strategies/uploads.py) before the array check; returns a reason to reject instead.
    unpack: Callable[[RecordDict], str | None] | None = None


@dataclass(frozen=True)
class Rejection:
    node_id: int
    reason: str


def _check_echo(content, exp: Expectation) -> str | None:
    if p.ECHO not in content.config_records:
        return "no echo record"
    echo = content.config_records[p.ECHO]
    if echo.get(p.RUN_ID) != exp.run_id:
        return f"foreign run id {echo.get(p.RUN_ID)!r} (expected {exp.run_id})"
    if echo.get(p.CHAIN_INDEX) != exp.chain_index:
        return f"stale chain index {echo.get(p.CHAIN_INDEX)!r} (expected {exp.chain_index})"
    if echo.get(p.LINKS_DIGEST) != exp.links_digest:
        return f"foreign links digest {str(echo.get(p.LINKS_DIGEST))[:12]}"
    return None


def _check_metrics(content, exp: Expectation) -> str | None:
    if list(content.metric_records) != [p.METRICS]:
        return f"expected one metric record {p.METRICS!r}, got {list(content.metric_records)}"
    metrics = content.metric_records[p.METRICS]
    n = metrics.get(p.NUM_EXAMPLES)
    if not isinstance(n, int | float) or isinstance(n, bool) or not math.isfinite(n):
        return f"num-examples is not a finite number: {n!r}"
    if n <= 0 or n > exp.max_num_examples:
        return f"num-examples {n} outside (0, {exp.max_num_examples}]"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(not math.isfinite(float(v)) for v in values):
            return f"metric {key!r} is not finite"
    return None


def _check_arrays(content, exp: Expectation) -> str | None:
    if list(content.array_records) != [p.ARRAYS]:
        return f"expected one array record {p.ARRAYS!r}, got {list(content.array_records)}"
    arrays = content.array_records[p.ARRAYS]
    got, want = set(arrays.keys()), set(exp.arrays or {})
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        return f"array keys differ: missing {missing[:3]}, extra {extra[:3]}"
    for name, array in arrays.items():
        shape, dtype = exp.arrays[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            return f"{name}: {array.dtype}{list(array.shape)} (expected {dtype}{list(shape)})"
        values = array.numpy()  # the bytes may disagree with the header: check what they hold
        if values.shape != shape or values.dtype != np.dtype(dtype):
            return f"{name}: data is {values.dtype}{list(values.shape)}, header says {dtype}"
        if not np.isfinite(values).all():
            return f"{name}: contains NaN or Inf"
    return None


def check_reply(message: Message, exp: Expectation) -> str | None:
    """The reason to reject `message`, or None if it may be aggregated."""
    if message.has_error():
        return f"client error: {message.error.reason}"
    content = message.content
    for check in (_check_echo, _check_metrics):
        reason = check(content, exp)
        if reason:
            return reason
    if exp.arrays is None:
        return None
    try:  # Flower decodes arrays with numpy, allow_pickle=False: bad bytes raise, never run
        reason = exp.unpack(content) if exp.unpack is not None else None
        return reason or _check_arrays(content, exp)
    except (ValueError, TypeError, EOFError) as err:
        return f"undecodable arrays: {err}"


def split_replies(
    replies: Iterable[Message], exp: Expectation
) -> tuple[list[Message], list[Rejection]]:
    """(valid replies sorted by partition id, rejections): sorting makes sums reproducible."""
    valid, rejected = [], []
    for message in replies:
        reason = check_reply(message, exp)
        if reason:
            rejected.append(Rejection(message.metadata.src_node_id, reason))
        else:
            valid.append(message)
    valid.sort(key=lambda m: (m.content[p.ECHO].get(p.PARTITION_ID, 0), m.metadata.src_node_id))
    return valid, rejected
