"""Run one chain link with any Flower strategy, without touching the strategy's math.

`LinkStrategy` wraps a fresh inner strategy per link. On the way out it adds the link's
A-spec, the links digest and, per node, the merged links that node lacks; on the way in
it drops every reply that fails `validation.check_reply` (logged with node and reason)
and refuses to aggregate a round with fewer than `min_replies` valid replies. It also
keeps the per-round ledger (bytes, accepted/rejected, metrics) the server writes out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from contract import protocol as p
from seedlora.chain import Link, links_digest
from seedlora.serialize import links_to_bytes

from . import outliers, uploads
from .validation import Expectation, Rejection, split_replies


def as_float32(arrays: ArrayRecord) -> ArrayRecord:
    """The global state stays float32: Flower's server optimizers return float64 arrays
    (numpy promotes their float64 step size), which clients would then send back as
    float32 and the checks would rightly reject as a dtype change."""
    return ArrayRecord(
        {k: Array(np.asarray(a.numpy(), dtype=np.float32)) for k, a in arrays.items()}
    )


def _no_examples(message: Message) -> bool:
    """An evaluate reply that honestly reports zero examples (nothing to weigh, no fault)."""
    if message.has_error() or p.METRICS not in message.content.metric_records:
        return False
    return message.content[p.METRICS].get(p.NUM_EXAMPLES) == 0


@dataclass
class RoundLedger:
    """What happened in one round, for metrics.json and the round log line."""

    bytes_down: int = 0
    bytes_up: int = 0
    sent: int = 0
    accepted: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_rejected: list[Rejection] = field(default_factory=list)
    skipped: bool = False
    updates: list[tuple[int, float, dict]] = field(default_factory=list)  # (partition, n, B)
    outliers: list[dict] = field(default_factory=list)  # node, norm, bound, action
    lost: list[int] = field(default_factory=list)  # sampled nodes that sent no reply in time


@dataclass
class LinkContext:
    """The chain state a link needs: identity, links so far, and what replies must match."""

    run_id: int
    chain_index: int
    links: Sequence[Link]
    link_config: dict  # A-spec fields and training keys sent to every client
    round_offset: int  # global rounds completed before this start() call's round 1
    rounds_done: int  # rounds of this link already done before this start() (resume)
    min_replies: int
    max_num_examples: int
    node_links: dict[int, int]  # node id -> number of links it is known to hold
    keep_updates: bool = False  # keep accepted client states per round (save-client-updates)
    outlier_mad: float = 0.0  # k of the MAD norm rule; 0 = off
    outlier_action: str = "flag"  # flag | drop | clip
    client_ranks: bool = False  # accept factors of rank r_i <= r_max (padded on arrival)
    upload_codec: str = "float32"  # replies carry the update in this codec (seedlora.compress)


class LinkStrategy(Strategy):
    """One chain link of `inner` (a fresh Flower strategy), with checks and links added."""

    def __init__(self, inner: Strategy, ctx: LinkContext):
        self.inner = inner
        self.ctx = ctx
        self.digest = links_digest(ctx.links)
        self.ledgers: dict[int, RoundLedger] = {}
        self.expected_arrays: dict | None = None
        self.sent_arrays: dict = {}
        self.sent_nodes: set[int] = set()
        self._link_blobs: dict[int, bytes] = {}

    # --- helpers -------------------------------------------------------------------
    def global_round(self, server_round: int) -> int:
        return self.ctx.round_offset + server_round

    def link_round(self, server_round: int) -> int:
        """The round within this link (from 1): what the inner strategy sees, so that its
        step-dependent terms (FedAdam's bias correction) restart with its state."""
        return self.ctx.rounds_done + server_round

    def ledger(self, server_round: int) -> RoundLedger:
        return self.ledgers.setdefault(self.global_round(server_round), RoundLedger())

    def _expectation(self, arrays: dict | None) -> Expectation:
        return Expectation(
            run_id=self.ctx.run_id,
            chain_index=self.ctx.chain_index,
            links_digest=self.digest,
            arrays=arrays,
            max_num_examples=self.ctx.max_num_examples,
            unpack=self._unpack,
        )

    def _unpack(self, content: RecordDict) -> str | None:
        """Restore a reply's upload to the full float32 state (strategies/uploads.py)."""
        ctx = self.ctx
        if ctx.upload_codec == "float32" and not ctx.client_ranks:
            return None  # the upload is the state
        return uploads.unpack_reply(content, self.sent_arrays, ctx.upload_codec, ctx.client_ranks)

    def _links_record(self, node_id: int) -> ConfigRecord:
        """The links `node_id` lacks (all of them for a node never seen)."""
        start = min(self.ctx.node_links.get(node_id, 0), len(self.ctx.links))
        if start not in self._link_blobs:
            self._link_blobs[start] = links_to_bytes(self.ctx.links[start:], start)
        return ConfigRecord(
            {
                p.LINKS_START: start,
                p.LINKS_PREFIX_DIGEST: links_digest(self.ctx.links[:start]),
                p.LINKS_DATA: self._link_blobs[start],
            }
        )

    def _decorate(self, messages: Iterable[Message], server_round: int) -> list[Message]:
        """Copy each message with the link config and the node's missing links added."""
        out = []
        ledger = self.ledger(server_round)
        for msg in messages:
            content = msg.content
            config = ConfigRecord(dict(content[p.CONFIG]))
            config.update(self.ctx.link_config)
            config[p.SERVER_ROUND] = self.global_round(server_round)
            config[p.CHAIN_INDEX] = self.ctx.chain_index
            config[p.LINKS_DIGEST] = self.digest
            config[p.LINKS_COUNT] = len(self.ctx.links)
            record = RecordDict(
                {
                    p.ARRAYS: content[p.ARRAYS],
                    p.CONFIG: config,
                    p.LINKS: self._links_record(msg.metadata.dst_node_id),
                }
            )
            new = Message(
                content=record,
                dst_node_id=msg.metadata.dst_node_id,
                message_type=msg.metadata.message_type,
            )
            ledger.bytes_down += p.record_bytes(new)
            out.append(new)
        return out

    def _filter(self, replies: Iterable[Message], arrays: dict | None, ledger_list) -> list:
        valid, rejected = split_replies(replies, self._expectation(arrays))
        for r in rejected:
            if r.node_id == SUPERLINK_NODE_ID:  # Flower's error for a node it could not reach
                log(WARNING, "rejected the SuperLink's error for a lost node: %s", r.reason)
                continue  # the lost node is named by _note_lost
            log(WARNING, "rejected reply from node %s: %s", r.node_id, r.reason)
            self.ctx.node_links[r.node_id] = 0  # resend every link: cheap, and always safe
        ledger_list.extend(rejected)
        for msg in valid:
            self.ctx.node_links[msg.metadata.src_node_id] = len(self.ctx.links)
        return valid

    def _screen_outliers(self, valid: list[Message], ledger: RoundLedger) -> list[Message]:
        """Apply the MAD norm rule (strategies/outliers.py): flag, drop or clip."""
        if self.ctx.outlier_mad <= 0:
            return valid
        states = [{k: a.numpy() for k, a in m.content[p.ARRAYS].items()} for m in valid]
        norms = [outliers.update_norm(s, self.sent_arrays) for s in states]
        bound = outliers.threshold(norms, self.ctx.outlier_mad)
        if bound is None:
            return valid
        kept = []
        for msg, state, norm in zip(valid, states, norms, strict=True):
            if norm > bound:
                node = msg.metadata.src_node_id
                action = self.ctx.outlier_action
                log(WARNING, "node %s update norm %.3g > bound %.3g: %s", node, norm, bound, action)
                ledger.outliers.append(
                    {"node": node, "norm": norm, "bound": bound, "action": action}
                )
                if action == "drop":
                    continue
                if action == "clip":
                    clip = outliers.clipped(state, self.sent_arrays, bound / norm)
                    msg.content[p.ARRAYS] = ArrayRecord({k: Array(v) for k, v in clip.items()})
            kept.append(msg)
        return kept

    # --- Strategy interface --------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "link %d: %s", self.ctx.chain_index, type(self.inner).__name__)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.expected_arrays = p.arrays_signature(arrays)
        self.sent_arrays = {k: a.numpy() for k, a in arrays.items()}
        messages = self.inner.configure_train(self.global_round(server_round), arrays, config, grid)
        out = self._decorate(messages, server_round)
        self.ledger(server_round).sent = len(out)
        self.sent_nodes = {m.metadata.dst_node_id for m in out}
        return out

    def _note_lost(self, server_round: int, replies: list[Message], ledger: RoundLedger) -> None:
        """Name the sampled nodes that sent nothing of their own (crashed, cut off, or past
        round-timeout; Flower's 'node unavailable' error comes from the SuperLink's id): the
        round goes on with the others, and a late reply is never counted in a later round."""
        lost = sorted(self.sent_nodes - {m.metadata.src_node_id for m in replies})
        if lost:
            log(
                WARNING,
                "round %d: no reply from node(s) %s (crashed, offline or past round-timeout)",
                self.global_round(server_round),
                ", ".join(map(str, lost)),
            )
            ledger.lost = lost

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        ledger = self.ledger(server_round)
        replies = list(replies)
        uploaded = {id(m): p.record_bytes(m) for m in replies}  # as sent, before unpacking
        self._note_lost(server_round, replies, ledger)
        valid = self._filter(replies, self.expected_arrays, ledger.rejected)
        valid = self._screen_outliers(valid, ledger)
        ledger.accepted = len(valid)
        if self.ctx.keep_updates:
            ledger.updates = [
                (
                    int(m.content[p.ECHO][p.PARTITION_ID]),
                    float(m.content[p.METRICS][p.NUM_EXAMPLES]),
                    m.content[p.ARRAYS].to_torch_state_dict(),
                )
                for m in valid
            ]
        ledger.bytes_up = sum(uploaded[id(m)] for m in valid)
        if len(valid) < self.ctx.min_replies:
            log(
                WARNING,
                "round %d skipped: %d valid replies < min-replies %d; global B unchanged",
                self.global_round(server_round),
                len(valid),
                self.ctx.min_replies,
            )
            ledger.skipped = True
            return None, None
        arrays, metrics = self.inner.aggregate_train(self.link_round(server_round), valid)
        ledger.train_metrics = dict(metrics or {})
        return (as_float32(arrays) if arrays is not None else None), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.inner.configure_evaluate(
            self.link_round(server_round), arrays, config, grid
        )
        return self._decorate(messages, server_round)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        ledger = self.ledger(server_round)
        replies = list(replies)
        empty = [m for m in replies if _no_examples(m)]
        for m in empty:  # e.g. a client whose packages have no held-out files
            log(INFO, "node %s has no evaluation data", m.metadata.src_node_id)
        valid = self._filter([m for m in replies if m not in empty], None, ledger.eval_rejected)
        if not valid:
            return None
        metrics = self.inner.aggregate_evaluate(self.link_round(server_round), valid)
        ledger.eval_metrics = dict(metrics or {})
        return metrics
