"""Typed rejections: why a reply must not be aggregated.

Every step of the reply pipeline (strategies/replies.py) either returns the reply or
raises one of these with the reason, a sentence naming what is wrong; the pipeline logs
it with the node id and the round's ledger keeps it as a `Rejection`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class ReplyRejected(Exception):
    """A reply that is logged and recorded, never averaged; `reason` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ClientErrorReply(ReplyRejected):
    """The reply is an error: the ClientApp failed, or Flower answered for a lost node."""


class ForeignReply(ReplyRejected):
    """The reply was made for another run, chain link or links digest (or echoes nothing)."""


class ForeignA(ReplyRejected):
    """The reply was trained on another frozen factor: the client derived an A whose digest
    differs from the server's for the same A-spec (another A rule, seedlora.spec.A_RULE,
    or another A under the same rule), so averaging it would be silently inexact."""


class BadMetrics(ReplyRejected):
    """The metric record is missing, not finite, or `num-examples` is absurd."""


class BadUpload(ReplyRejected):
    """The upload does not unpack: a codec that does not decode, or ranks that do not fit."""


class BadArrays(ReplyRejected):
    """The arrays differ from what was sent (keys, shape, dtype), hold NaN/Inf, or do not
    decode at all."""


@contextmanager
def decoding() -> Iterator[None]:
    """Turn the errors of decoding a reply's arrays into a `BadArrays` rejection.

    Flower decodes arrays with numpy and `allow_pickle=False`: bad bytes raise, never run.
    """
    try:
        yield
    except (ValueError, TypeError, EOFError) as err:
        raise BadArrays(f"undecodable arrays: {err}") from err
