"""One round's train replies, taken one at a time as they arrive (server/rounds.py).

Each reply goes through the reply pipeline's steps (replies.py: envelope, unpack,
arrays) the moment it arrives; a rejected one is logged and counted, never added.
What happens to an accepted one depends on the round's rule:

streamed  FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad (the rules exact in
          weight space, registry.py) need only sum_i w_i x_i and W = sum_i w_i:
          the reply is added to a `StreamedMean` and dropped. The round holds one sum
          per array key, whatever the number of clients, and the adding overlaps the
          clients still training.
buffered  the rules that need every reply at once keep the accepted replies until the
          round's last, as before: fedmedian, fedtrimmedavg, krum, multikrum (they
          rank or sort the replies), the `outlier-mad` screen (the median of the
          round's norms), and client-level DP (Flower's wrapper clips each reply and
          checks the number of replies against its sample before it averages).

A streamed round hands the inner Flower strategy one reply: the weighted mean with
the total weight W. Flower's FedAvg weighs a reply by w / W, here W / W = 1.0, so
it takes the mean as it is (x * 1.0 = x), and FedAvgM's momentum and FedOpt's moments
act on it as on their own average: the server-optimizer math is Flower's, unchanged.
The mean itself differs from Flower's by float32 rounding (Flower adds (w_i / W) x_i
in float32 in arrival order; here sum_i w_i x_i is exact, seedlora/exactsum.py, and
rounded once), and so do the averaged metrics (exact sums of Fractions, rounded once):
both are now the same whatever order the replies came in, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from contract import protocol as p
from contract.config import StrategyConfig
from seedlora.exactsum import ExactSum

from .ledger import Rejection, client_updates
from .registry import EXACT_IN_WEIGHT_SPACE
from .replies import ReplyPipeline, Verdict

Sum = Fraction | list[Fraction]  # one metric's weighted sum (a list metric: per entry)


def buffering_reason(checks: StrategyConfig, inner: Strategy) -> str | None:
    """Why a round of this link must hold every accepted reply (None: it streams)."""
    if checks.name not in EXACT_IN_WEIGHT_SPACE:
        return f"{checks.name} needs every reply at once"
    if not isinstance(inner, FedAvg):
        return f"{type(inner).__name__} (client-level DP) clips and counts every reply"
    if getattr(inner, "train_metrics_aggr_fn", None) is not aggregate_metricrecords:
        return "the strategy aggregates metrics with a function of its own"
    if checks.outlier_mad > 0:
        return "outlier-mad screens the round's update norms"
    return None


class StreamedMean:
    """The accepted replies of a round as sum_i w_i x_i (one `ExactSum` per array key)
    and W = sum_i w_i, w_i the reply's `weight_key` metric; the same after any order of
    the same replies, bit for bit (module docstring)."""

    def __init__(self, weight_key: str):
        self.weight_key = weight_key
        self.arrays: dict[str, ExactSum] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.metrics: dict[str, Sum] = {}
        self.metric_keys: frozenset[str] | None = None
        self.weight = Fraction(0)
        self.count = 0
        self.run_id = 0
        self.inconsistent = ""  # why Flower would refuse these replies ("" = it would not)

    def add(self, reply: Message) -> None:
        """Add an accepted train reply (its arrays and metrics checked by the pipeline)."""
        metrics = reply.content[p.METRICS]
        if self.weight_key not in metrics:
            self.inconsistent = f"missing required key `{self.weight_key}`"
            return
        weight = metrics[self.weight_key]
        for key, array in reply.content[p.ARRAYS].items():
            values = array.numpy()
            if key not in self.arrays:
                self.arrays[key] = ExactSum(values.shape)
                self.dtypes[key] = values.dtype
            self.arrays[key].add(values, weight)
        self._add_metrics(metrics, Fraction(weight))
        self.weight += Fraction(weight)
        self.count += 1
        self.run_id = reply.metadata.run_id

    def _add_metrics(self, metrics: MetricRecord, weight: Fraction) -> None:
        keys = frozenset(metrics.keys())
        if self.metric_keys is None:
            self.metric_keys = keys
        elif keys != self.metric_keys:
            self.inconsistent = "all MetricRecords must have the same keys"
        for key, value in metrics.items():
            if key == self.weight_key:
                continue
            if isinstance(value, list):
                terms = [Fraction(v) * weight for v in value]
                sums = self.metrics.setdefault(key, [Fraction(0)] * len(terms))
                if len(sums) != len(terms):
                    self.inconsistent = f"metric {key!r}: lists of different lengths"
                    continue
                self.metrics[key] = [a + b for a, b in zip(sums, terms, strict=True)]
            else:
                self.metrics[key] = self.metrics.get(key, Fraction(0)) + Fraction(value) * weight

    def as_reply(self) -> Message:
        """One reply carrying the weighted mean of the arrays (in their dtype) and of the
        metrics, with weight W: what the inner strategy aggregates (module docstring).
        Raises Flower's `InconsistentMessageReplies` where Flower would have."""
        if self.inconsistent:
            raise InconsistentMessageReplies(reason=f"{self.inconsistent}. Skipping aggregation.")
        total = float(self.weight)
        arrays = {
            key: Array((s.total() / total).astype(self.dtypes[key]))
            for key, s in self.arrays.items()
        }
        metrics = {
            key: [float(v / self.weight) for v in s]
            if isinstance(s, list)
            else float(s / self.weight)
            for key, s in self.metrics.items()
        }
        w = self.weight
        metrics[self.weight_key] = int(w) if w.denominator == 1 else float(w)
        content = RecordDict({p.ARRAYS: ArrayRecord(arrays), p.METRICS: MetricRecord(metrics)})
        return Message(content=content, metadata=_round_metadata(self.run_id))


def _round_metadata(run_id: int) -> Metadata:
    """Metadata of the reply standing for a whole streamed round (from the SuperLink's
    node id: no client sent it)."""
    return Metadata(
        run_id=run_id,
        message_id="",
        src_node_id=SUPERLINK_NODE_ID,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id="",
        group_id="",
        created_at=0.0,
        ttl=1.0,
        message_type="train",
    )


@dataclass
class Intake:
    """What a round's train replies came to."""

    verdict: Verdict  # accepted: what the inner strategy aggregates (see TrainIntake.close)
    accepted: int  # replies accepted (a streamed round stands them in one reply)
    replied: set[int] = field(default_factory=set)  # nodes a reply came from
    bytes_up: int = 0  # upload of the accepted replies, as sent
    updates: list[tuple[int, float, dict]] = field(default_factory=list)  # keep-updates
    received: list[RecordDict] = field(default_factory=list)  # RECEIVED_EVAL of checked replies


class TrainIntake:
    """A round's train replies, one `add` per reply as it arrives; `close` after the
    last. With a `stream` the accepted replies are added up and dropped; without, they
    are kept for the pipeline's screen and the inner strategy (module docstring)."""

    def __init__(self, pipeline: ReplyPipeline, stream: StreamedMean | None, keep: bool):
        self.pipeline = pipeline
        self.stream = stream
        self.keep_updates = keep
        self.buffered: list[tuple[Message, int]] = []  # (reply, bytes as sent): no stream
        self.rejected: list[Rejection] = []
        self.checked: list[int] = []
        self.replied: set[int] = set()
        self.bytes_up = 0
        self.updates: list[tuple[int, float, dict]] = []
        self.received: list[RecordDict] = []  # client-eval with-train: small metric records

    def add(self, reply: Message) -> None:
        """Check one reply; add it up (streamed) or keep it (buffered) when it passes."""
        self.replied.add(reply.metadata.src_node_id)
        size = p.record_bytes(reply)  # as sent, before unpacking
        out = self.pipeline.check(reply)
        if isinstance(out, Rejection):
            self.rejected.append(out)
            return
        self.checked.append(out.metadata.src_node_id)
        received = _take_received(reply, out)
        if received is not None:
            self.received.append(RecordDict({p.METRICS: received}))
        if self.stream is None:
            self.buffered.append((out, size))
            return
        self.bytes_up += size
        if self.keep_updates:
            self.updates += client_updates([out])
        self.stream.add(out)

    def close(self) -> Intake:
        """The round's intake: streamed, the one reply standing for every accepted one
        (none if none was); buffered, the accepted replies sorted and screened."""
        if self.stream is not None:
            count = self.stream.count
            accepted = [self.stream.as_reply()] if count else []
            verdict = Verdict(accepted, self.rejected, self.checked)
            updates = sorted(self.updates, key=lambda u: u[0])
            return Intake(verdict, count, self.replied, self.bytes_up, updates, self.received)
        sizes = {id(m): size for m, size in self.buffered}
        verdict = self.pipeline.verdict([m for m, _ in self.buffered], self.rejected)
        self.buffered = []
        if self.keep_updates:
            self.updates = client_updates(verdict.accepted)
        bytes_up = sum(sizes[id(m)] for m in verdict.accepted)
        accepted = len(verdict.accepted)
        return Intake(verdict, accepted, self.replied, bytes_up, self.updates, self.received)


def _take_received(*messages: Message) -> MetricRecord | None:
    """A checked reply's RECEIVED_EVAL record, taken off every form of the reply, so the
    inner strategy sees the one metric record Flower expects."""
    found = None
    for msg in messages:
        record = msg.content.pop(p.RECEIVED_EVAL, None)
        found = found if record is None else record
    return found


def log_path(chain_index: int, reason: str | None) -> None:
    """Once per link: whether its rounds stream their replies, and if not, why."""
    if reason is None:
        log(INFO, "link %d: train replies streamed (exact running sum)", chain_index)
    else:
        log(INFO, "link %d: train replies buffered until the round's last: %s", chain_index, reason)
