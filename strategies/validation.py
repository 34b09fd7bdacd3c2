"""Check every reply before any strategy sees it: a bad reply is logged, never averaged.

A reply made for another link (stale chain index or links digest), another run, on
another A (its A digest differs from the server's), with missing/extra keys, a wrong
shape or dtype, NaN/Inf, or an absurd `num-examples` is rejected: each check returns
the reply or raises a `ReplyRejected` (strategies/rejections.py) whose reason names the
fault. strategies/replies.py chains them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from contract import protocol as p
from seedlora.chain import a_digest_rule

from .rejections import (
    BadArrays,
    BadMetrics,
    ClientErrorReply,
    ForeignA,
    ForeignReply,
    decoding,
)


@dataclass(frozen=True)
class Expectation:
    """What a valid reply for this round must look like."""

    run_id: int
    chain_index: int
    links_digest: str
    arrays: dict[str, tuple[tuple[int, ...], str]] | None  # None: not checked (evaluate)
    max_num_examples: int
    a_digest: str | None = None  # the server's seedlora.a_digest for this link; None: unchecked


def _check_echo(content, exp: Expectation) -> None:
    if p.ECHO not in content.config_records:
        raise ForeignReply("no echo record")
    echo = content.config_records[p.ECHO]
    if echo.get(p.RUN_ID) != exp.run_id:
        raise ForeignReply(f"foreign run id {echo.get(p.RUN_ID)!r} (expected {exp.run_id})")
    if echo.get(p.CHAIN_INDEX) != exp.chain_index:
        raise ForeignReply(
            f"stale chain index {echo.get(p.CHAIN_INDEX)!r} (expected {exp.chain_index})"
        )
    if echo.get(p.LINKS_DIGEST) != exp.links_digest:
        raise ForeignReply(f"foreign links digest {str(echo.get(p.LINKS_DIGEST))[:12]}")
    if exp.a_digest and echo.get(p.A_DIGEST) != exp.a_digest:
        got = str(echo.get(p.A_DIGEST) or "")
        ours, theirs = a_digest_rule(exp.a_digest), a_digest_rule(got)
        if got and theirs != ours:
            raise ForeignA(
                f"A rule {theirs!r} of the client differs from the server's {ours!r}: it "
                "derives another A from the same A-spec, so its B cannot be averaged; run one "
                "seedlora version on the server and every client"
            )
        raise ForeignA(
            f"A digest {got[-12:] if got else 'missing'} differs from the server's "
            f"{exp.a_digest[-12:]} under the same A rule {ours!r}: the client derived another "
            "A from the same A-spec, so its B cannot be averaged exactly"
        )


def _check_metrics(content, exp: Expectation) -> None:
    """One `metrics` record (a train reply may add `received-eval`: client-eval
    with-train), every value finite, num-examples in range (an evaluation may count 0)."""
    names = list(content.metric_records)
    if names not in ([p.METRICS], [p.METRICS, p.RECEIVED_EVAL]):
        raise BadMetrics(f"expected one metric record {p.METRICS!r}, got {names}")
    _check_record(content.metric_records[p.METRICS], exp, p.METRICS, least=1)
    if p.RECEIVED_EVAL in content.metric_records:
        _check_record(content.metric_records[p.RECEIVED_EVAL], exp, p.RECEIVED_EVAL, least=0)


def _check_record(metrics, exp: Expectation, name: str, least: int) -> None:
    n = metrics.get(p.NUM_EXAMPLES)
    if not isinstance(n, int | float) or isinstance(n, bool) or not math.isfinite(n):
        raise BadMetrics(f"{name}: num-examples is not a finite number: {n!r}")
    if n < least or n > exp.max_num_examples:
        raise BadMetrics(f"{name}: num-examples {n} outside [{least}, {exp.max_num_examples}]")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if any(not math.isfinite(float(v)) for v in values):
            raise BadMetrics(f"{name}: metric {key!r} is not finite")


def check_envelope(message: Message, exp: Expectation) -> Message:
    """`message` if it is no error and its echo and metrics fit `exp`; else raise."""
    if message.has_error():
        raise ClientErrorReply(f"client error: {message.error.reason}")
    _check_echo(message.content, exp)
    _check_metrics(message.content, exp)
    return message


def _check_arrays(content, exp: Expectation) -> None:
    if list(content.array_records) != [p.ARRAYS]:
        raise BadArrays(
            f"expected one array record {p.ARRAYS!r}, got {list(content.array_records)}"
        )
    arrays = content.array_records[p.ARRAYS]
    got, want = set(arrays.keys()), set(exp.arrays or {})
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise BadArrays(f"array keys differ: missing {missing[:3]}, extra {extra[:3]}")
    for name, array in arrays.items():
        shape, dtype = exp.arrays[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            raise BadArrays(
                f"{name}: {array.dtype}{list(array.shape)} (expected {dtype}{list(shape)})"
            )
        values = array.numpy()  # the bytes may disagree with the header: check what they hold
        if values.shape != shape or values.dtype != np.dtype(dtype):
            raise BadArrays(
                f"{name}: data is {values.dtype}{list(values.shape)}, header says {dtype}"
            )
        if not np.isfinite(values).all():
            raise BadArrays(f"{name}: contains NaN or Inf")


def check_arrays(message: Message, exp: Expectation) -> Message:
    """`message` if its one array record has exactly the keys, shapes and dtypes of
    `exp.arrays` and only finite values; else raise `BadArrays`."""
    with decoding():
        _check_arrays(message.content, exp)
    return message
