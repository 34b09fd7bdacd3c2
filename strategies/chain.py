"""Run one chain link with any Flower strategy, without touching the strategy's math.

`LinkStrategy` wraps a fresh inner strategy per link and only composes. It is not itself
a Flower `Strategy`: Flower's `Strategy.start` waits for every reply of a round, and a
chain round streams them (server/rounds.py runs the round, the one loop); so it offers
the hooks that loop calls, not the Strategy interface:

    configure_*  the inner strategy's messages, sampled by Flower's code with a seeded RNG
                 over the nodes in partition order (sampling.py) -> `Outgoing.decorate`
                 (outgoing.py): link config, global round, links digest, and the merged
                 links a node lacks
    aggregate_*  the replies -> the reply pipeline (replies.py): check, unpack, check
                 arrays, screen outliers; fewer than `min_replies` accepted replies skip
                 the round (global B unchanged), else the inner strategy aggregates them.
                 Train replies can be taken one at a time as they arrive (`open_train`,
                 intake.py): the rules exact in weight space add them up and drop them
    every hook   the round's `RoundLedger` (ledger.py), which the server reads

Round numbers. The hooks receive `server_round`, the caller's count of this instance's
rounds from 1 (the chain loop in server/), and use it only to derive the two that
matter:
- `link_round`: the round within this link, from 1, counting the rounds done before a
  resume. The inner strategy sees this one in every hook, so that its step-dependent
  terms (FedAdam/FedYogi bias correction) restart with its B-space state.
- `global_round`: the round of the whole run. It goes on the wire (`server-round` in the
  config clients receive and echo), keys `ledgers` and numbers rounds in the log.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from contract import protocol as p
from contract.config import StrategyConfig, UploadConfig
from seedlora.chain import Chain, Link

from .intake import StreamedMean, TrainIntake, buffering_reason, log_path
from .ledger import Refusals, Rejection, RoundLedger
from .outgoing import Outgoing
from .outliers import OutlierScreen
from .registry import kept_replies, trims_nothing
from .replies import (
    Verdict,
    evaluate_pipeline,
    note_lost,
    own_rejections,
    train_pipeline,
    without_empty_evaluations,
)
from .sampling import NodeOrder, seeded_sampling
from .uploads import Unpack
from .validation import Expectation

__all__ = ["LinkContext", "LinkStrategy", "Rejection", "RoundLedger", "SentRound", "as_float32"]


def as_float32(arrays: ArrayRecord) -> ArrayRecord:
    """The global state stays float32: Flower's server optimizers return float64 arrays
    (numpy promotes their float64 step size), which clients would then send back as
    float32 and the checks would rightly reject as a dtype change."""
    return ArrayRecord(
        {k: Array(np.asarray(a.numpy(), dtype=np.float32)) for k, a in arrays.items()}
    )


@dataclass
class LinkContext:
    """The chain state a link needs: identity, links so far, and what replies must match."""

    run_id: int
    chain_index: int
    links: Sequence[Link]  # a Chain (else made one, hashing every link once)
    link_config: dict  # A-spec fields and training keys sent to every client
    round_offset: int  # global rounds completed before this instance's round 1
    rounds_done: int  # rounds of this link already done before this instance's round 1
    node_links: dict[int, int]  # node id -> number of links it is known to hold
    checks: StrategyConfig = StrategyConfig()  # min-replies, max-num-examples, outlier-*
    upload: UploadConfig = UploadConfig()  # what replies carry: upload-codec, client-ranks
    keep_updates: bool = False  # keep accepted client states per round (save-client-updates)
    a_digest: str = ""  # the server's seedlora.a_digest for this link ("": not checked)
    node_order: NodeOrder | None = None  # run-wide partition order for seeded sampling


@dataclass(frozen=True)
class SentRound:
    """What `configure_train` sent: the round's train replies are checked against it."""

    signature: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the global state
    nodes: frozenset[int] = frozenset()  # the sampled nodes


class LinkStrategy:
    """One chain link of `inner` (a fresh Flower strategy), with checks and links added:
    the hooks of server/rounds.py's round (module docstring)."""

    def __init__(self, inner: Strategy, ctx: LinkContext):
        self.inner = inner
        self.ctx = ctx
        links = Chain.of(ctx.links)
        self.digest = links.digest
        self.ledgers: dict[int, RoundLedger] = {}  # keyed by global round
        self.sent = SentRound()
        self._warned_trim = False
        self.buffering = buffering_reason(ctx.checks, inner)  # None: rounds stream
        self.refusals = Refusals()
        self.outgoing = Outgoing(links, ctx.link_config, ctx.chain_index, ctx.node_links)

    # --- round numbers and bookkeeping -----------------------------------------------
    def global_round(self, server_round: int) -> int:
        """The run's round number of this instance's round `server_round`."""
        return self.ctx.round_offset + server_round

    def link_round(self, server_round: int) -> int:
        """The round within this link (from 1): the only round the inner strategy sees."""
        return self.ctx.rounds_done + server_round

    def ledger(self, server_round: int) -> RoundLedger:
        return self.ledgers.setdefault(self.global_round(server_round), RoundLedger())

    def _expectation(self, signature: dict | None) -> Expectation:
        return Expectation(
            run_id=self.ctx.run_id,
            chain_index=self.ctx.chain_index,
            links_digest=self.digest,
            arrays=signature,
            max_num_examples=self.ctx.checks.max_num_examples,
            a_digest=self.ctx.a_digest or None,
        )

    def _configure(
        self, phase: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid
    ) -> list[Message]:
        """The inner strategy's configure_<phase>, its own sampling included, with the RNG
        seeded from (seed, phase, global round) and, when it samples a subset, the nodes
        in partition order (sampling.py)."""
        train = phase == "train"
        checks = self.ctx.checks
        fraction = checks.fraction_train if train else checks.fraction_evaluate
        configure = self.inner.configure_train if train else self.inner.configure_evaluate
        if fraction < 1 and self.ctx.node_order is not None:
            grid = self.ctx.node_order.view(grid)
        seed = int(self.ctx.link_config.get(p.SEED, 0))
        with seeded_sampling(seed, phase, self.global_round(server_round)):
            return list(configure(self.link_round(server_round), arrays, config, grid))

    def _send(self, messages: Iterable[Message], server_round: int) -> list[Message]:
        out = self.outgoing.decorate(messages, self.global_round(server_round))
        self.ledger(server_round).bytes_down += sum(p.record_bytes(m) for m in out)
        return out

    def _receive(self, verdict: Verdict) -> list[Message]:
        self.outgoing.note_replies(verdict.checked, verdict.rejected_nodes)
        return verdict.accepted

    # --- the round's hooks ----------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "link %d: %s", self.ctx.chain_index, type(self.inner).__name__)
        log_path(self.ctx.chain_index, self.buffering)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sent_arrays = {k: a.numpy() for k, a in arrays.items()}
        messages = self._configure("train", server_round, arrays, config, grid)
        out = self._send(messages, server_round)
        self.ledger(server_round).sent = len(out)
        nodes = frozenset(m.metadata.dst_node_id for m in out)
        self.sent = SentRound(p.arrays_signature(arrays), sent_arrays, nodes)
        return out

    def open_train(self, server_round: int) -> TrainIntake:
        """The round's train intake: `add` each reply as it arrives, then `close_train`
        (intake.py: streamed for the rules exact in weight space, else buffered)."""
        ctx, sent = self.ctx, self.sent
        pipeline = train_pipeline(
            self._expectation(sent.signature),
            Unpack(sent.arrays, ctx.upload.upload_codec, bool(ctx.upload.client_ranks)),
            OutlierScreen(ctx.checks.outlier_mad, ctx.checks.outlier_action, sent.arrays),
        )
        stream = None if self.buffering else StreamedMean(self.inner.weighted_by_key)
        return TrainIntake(pipeline, stream, ctx.keep_updates)

    def close_train(
        self, server_round: int, intake: TrainIntake
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's aggregate from its intake (None: fewer than min-replies accepted),
        with the round's ledger filled in."""
        ledger, global_round = self.ledger(server_round), self.global_round(server_round)
        ctx, taken = self.ctx, intake.close()
        verdict = taken.verdict
        ledger.lost = note_lost(self.sent.nodes, taken.replied, global_round)
        self.outgoing.note_replies(verdict.checked, verdict.rejected_nodes)
        ledger.rejected.extend(own_rejections(verdict.rejected, ledger.lost))
        ledger.refused = self.refusals.count(verdict.checked, ledger.rejected)
        ledger.outliers.extend(verdict.outliers)
        ledger.accepted = taken.accepted
        ledger.updates = taken.updates
        ledger.bytes_up = taken.bytes_up
        self._take_received_evaluations(ledger, global_round, taken.received)
        if taken.accepted < ctx.checks.min_replies:
            log(
                WARNING,
                "round %d skipped: %d valid replies < min-replies %d; global B unchanged",
                global_round,
                taken.accepted,
                ctx.checks.min_replies,
            )
            ledger.skipped = True
            return None, None
        self._warn_if_trimming_nothing(taken.accepted)
        accepted = verdict.accepted
        if self.buffering is None:
            log(INFO, "round %d: %d replies summed as they came", global_round, taken.accepted)
        arrays, metrics = self.inner.aggregate_train(self.link_round(server_round), accepted)
        if arrays is not None and ctx.checks.name in ("krum", "multikrum"):
            self._note_single_kept(global_round, accepted, arrays)
        ledger.train_metrics = dict(metrics or {})
        return (as_float32(arrays) if arrays is not None else None), metrics

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Every reply of the round at once: through `open_train`, then closed."""
        intake = self.open_train(server_round)
        for reply in replies:
            intake.add(reply)
        return self.close_train(server_round, intake)

    def _warn_if_trimming_nothing(self, replies: int) -> None:
        """Once per link: fedtrimmedavg with too few replies to cut any is a plain mean."""
        reason = trims_nothing(self.ctx.checks, replies)
        if reason and not self._warned_trim:
            log(WARNING, "link %d: %s", self.ctx.chain_index, reason)
            self._warned_trim = True

    def _note_single_kept(self, global_round: int, accepted: list[Message], arrays) -> None:
        """Krum (and multikrum with krum-select 1) average one reply: say whose."""
        if kept_replies(self.ctx.checks, len(accepted)) != 1 or len(accepted) < 2:
            return
        got = {k: np.asarray(a.numpy(), np.float32) for k, a in arrays.items()}
        kept = [
            m.metadata.src_node_id
            for m in accepted
            if all(np.array_equal(got[k], a.numpy()) for k, a in m.content[p.ARRAYS].items())
        ]
        log(
            WARNING,
            "round %d: %s kept a single client's update (node %s) and dropped %d: with "
            "non-IID clients a round then trains on one client's data (docs/running.md#strategies)",
            global_round,
            self.ctx.checks.name,
            kept[0] if len(kept) == 1 else "?",
            len(accepted) - 1,
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self._configure("evaluate", server_round, arrays, config, grid)
        return self._send(messages, server_round)

    def _take_received_evaluations(
        self, ledger: RoundLedger, global_round: int, received: list[RecordDict]
    ) -> None:
        """client-eval with-train: the train replies' metrics of the model they received,
        the global model after round `global_round - 1`, aggregated as the inner strategy
        aggregates evaluations (weighted by num-examples; empty evaluations left out)."""
        key = getattr(self.inner, "weighted_by_key", p.NUM_EXAMPLES)
        received = [r for r in received if float(r[p.METRICS].get(key, 0) or 0) > 0]
        if not received:
            return
        aggregate = getattr(self.inner, "evaluate_metrics_aggr_fn", aggregate_metricrecords)
        ledger.eval_metrics = dict(aggregate(received, key) or {})
        ledger.eval_of = global_round - 1

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        ledger = self.ledger(server_round)
        verdict = evaluate_pipeline(self._expectation(None))(without_empty_evaluations(replies))
        accepted = self._receive(verdict)
        ledger.eval_rejected.extend(verdict.rejected)
        if not accepted:
            return None
        metrics = self.inner.aggregate_evaluate(self.link_round(server_round), accepted)
        ledger.eval_metrics = dict(metrics or {})
        ledger.eval_of = self.global_round(server_round)
        return metrics
