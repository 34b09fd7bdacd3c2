"""Rounds over Flower's message-API strategies: the plain `LinkRunner` of `run_chain`.

Each link gets a fresh inner strategy (strategies/registry.py), so B-space optimizer state
(FedAdam moments, FedAvgM momentum) resets when the A coordinates change; a resumed link
gets its state back through strategies/state.py. `LinkStrategy` (strategies/chain.py) adds
the link's A-spec and catch-up links to every message and checks every reply. The round
below is the project's one round loop (Flower's `Strategy.start` is not used: it waits
for a round's every reply, and the chain loop owns the round counter):

    configure_train -> push, then each reply as it arrives: check, add up -> aggregate
    configure_evaluate -> push, pull every reply -> aggregate_evaluate

`train_exchange` is the round's train half: Flower's `push_messages`, then
`pull_messages` every 50 ms (strategies/exchange.py; Flower's own `send_and_receive`
waits 3 s between pulls on a SuperLink), each reply checked and added to the round's
sum the moment it arrives (strategies/intake.py), so the server aggregates while the
slower clients train and holds no reply past its turn. The inner strategy sees one
round number, the round within the link (from 1).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from contract import protocol as p
from contract.config import RunConfig
from seedlora import a_digest
from strategies import exchange, privacy
from strategies.chain import LinkContext, LinkStrategy
from strategies.registry import build_strategy
from strategies.sampling import NodeOrder
from strategies.state import load_state, save_state

from .chain_server import ChainServer
from .state import RoundResult


class FlowerRounds:
    """Opens each link as a `LinkStrategy` around a fresh Flower strategy."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.node_order: NodeOrder | None = None  # run-wide, made with the first link

    def open_link(self, server: ChainServer) -> FlowerLink:
        cfg, s = server.cfg, server.state
        num_nodes = len(list(self.grid.get_node_ids()))
        if self.node_order is None:
            self.node_order = NodeOrder(cfg.strategy.round_timeout)
        inner = privacy.wrap(build_strategy(cfg.strategy), cfg, num_nodes, server.privacy)
        load_state(inner, s.strategy_state)
        ctx = LinkContext(
            run_id=server.run_id,
            chain_index=s.chain_index,
            links=s.links.copy(),
            link_config=server.link_config(),
            round_offset=s.global_round - s.round_in_link,
            rounds_done=0,
            node_links=server.node_links,
            checks=cfg.strategy,
            upload=cfg.upload,
            keep_updates=cfg.output.save_client_updates,
            a_digest=a_digest(server.model),  # replies must echo it: same A as ours
            node_order=self.node_order,
        )
        link = LinkStrategy(inner, ctx)
        return FlowerLink(self.grid, link, server.round_lr, cfg)


class FlowerLink:
    """One open link: runs its rounds through the grid."""

    def __init__(
        self, grid: Grid, link: LinkStrategy, round_lr: Callable[[int], float], cfg: RunConfig
    ):
        self.grid, self.link, self.round_lr = grid, link, round_lr
        self.timeout = cfg.strategy.round_timeout
        self.local_steps = cfg.train.local_steps
        self.with_train = cfg.strategy.client_eval == "with-train"
        self.evaluates = cfg.strategy.fraction_evaluate > 0
        self.fraction_evaluate = cfg.strategy.fraction_evaluate
        self.seed = cfg.adapter.seed
        self.last_round = cfg.schedule[0] * cfg.schedule[1]  # the run's last global round
        self.link.summary()

    def train_config(self, link_round: int) -> ConfigRecord:
        """The round's train config: the lr the server's schedule gives its global round,
        and with client-eval with-train the request to evaluate the model sent first."""
        lr = self.round_lr(self.link.global_round(link_round))
        return ConfigRecord({p.LR: lr, p.LOCAL_STEPS: self.local_steps})

    def ask_evaluations(self, link_round: int, messages: list[Message]) -> None:
        """client-eval with-train: a `fraction-evaluate` sample of the round's train nodes
        (at least one; seeded by the run's seed and the global round, over the sorted node
        ids) also evaluates the model it receives; the nodes are named in the config."""
        if not (self.evaluates and self.with_train and messages):
            return
        nodes = sorted({m.metadata.dst_node_id for m in messages})
        count = min(len(nodes), max(1, round(self.fraction_evaluate * len(nodes))))
        seed = f"{self.seed}-evaluate-received-{self.link.global_round(link_round)}"
        chosen = sorted(random.Random(seed).sample(nodes, count))
        for message in messages:
            message.content[p.CONFIG][p.EVALUATE_RECEIVED] = chosen

    def evaluates_apart(self, link_round: int) -> bool:
        """Whether this round sends evaluate messages after its aggregate: always with
        client-eval separate, and with with-train only in the run's last round, so the
        final model is evaluated too."""
        if not self.evaluates:
            return False
        return not self.with_train or self.link.global_round(link_round) >= self.last_round

    def run_round(self, link_round: int, arrays: dict[str, torch.Tensor]) -> RoundResult:
        grid, link = self.grid, self.link
        record = ArrayRecord(arrays)
        log(INFO, "link %d round %d", link.ctx.chain_index, link_round)
        clock = [time.perf_counter()]
        messages = list(
            link.configure_train(link_round, record, self.train_config(link_round), grid)
        )
        self.ask_evaluations(link_round, messages)
        clock.append(time.perf_counter())
        aggregated, measured = train_exchange(grid, link, link_round, messages, self.timeout)
        record = aggregated if aggregated is not None else record
        now = time.perf_counter()
        clock += [now - measured.closing, now]  # the train exchange ends at the last reply
        if self.evaluates_apart(link_round):
            messages = link.configure_evaluate(link_round, record, ConfigRecord(), grid)
            replies = exchange.send_and_receive(grid, messages, self.timeout)
            link.aggregate_evaluate(link_round, replies)
        clock.append(time.perf_counter())
        steps = ("configure", "train_exchange", "aggregate", "evaluate_exchange")
        phases = {k: b - a for k, a, b in zip(steps, clock, clock[1:], strict=False)}
        return RoundResult(
            arrays=record.to_torch_state_dict(),
            ledger=link.ledger(link_round),
            strategy_state=save_state(link.inner),
            phases={**phases, **measured.phases(phases["train_exchange"])},
        )


@dataclass
class TrainExchange:
    """What a round's train exchange measured: the clients' spans [start, start +
    train-time] (from their replies' metrics), the seconds spent checking and adding up
    replies as they came (`intake`, inside the exchange: it overlaps the clients still
    training), and closing the round after the last reply (`closing`: the sum's
    division and the inner strategy's aggregate; the round's `aggregate` phase)."""

    spans: list[tuple[float, float]] = field(default_factory=list)
    intake: float = 0.0
    closing: float = 0.0

    def phases(self, exchange: float) -> dict[str, float]:
        """The clients' share of the train exchange (`client_phases`), and `intake`."""
        return {**client_phases(self.spans, exchange), "intake": self.intake}


def train_exchange(
    grid: Grid,
    link: LinkStrategy,
    link_round: int,
    messages: Iterable[Message],
    timeout: float,
) -> tuple[ArrayRecord | None, TrainExchange]:
    """One round's train exchange: push `messages`, pull every 50 ms until each is
    answered or `timeout` s passed, each reply checked and added up as it arrives
    (`LinkStrategy.open_train`); then the round's aggregate (None: nothing to take)."""
    measured = TrainExchange()
    intake = link.open_train(link_round)
    for reply in exchange.replies(grid, messages, timeout):
        began = time.perf_counter()
        measured.spans += client_span(reply)
        intake.add(reply)
        measured.intake += time.perf_counter() - began
    began = time.perf_counter()
    aggregated, _ = link.close_train(link_round, intake)
    measured.closing = time.perf_counter() - began
    return aggregated, measured


def client_span(reply: Message) -> list[tuple[float, float]]:
    """[(start, start + train-time)] as a reply reports it, [] when it does not."""
    if reply.has_error() or p.METRICS not in reply.content.metric_records:
        return []
    metrics = reply.content[p.METRICS]
    took, start = metrics.get(p.TRAIN_TIME), metrics.get(p.TRAIN_START)
    if isinstance(took, int | float) and isinstance(start, int | float):
        return [(float(start), float(start) + float(took))]
    return []


def client_phases(spans: list[tuple[float, float]], exchange: float) -> dict[str, float]:
    """The clients' share of a train exchange, from the spans their replies report.

    `client_train_sum` / `client_train_max`: the clients' own train-time (their critical
    path is the sum over the concurrent clients); `client_busy`: the wall time during which
    at least one client was training (the union of their [start, start + train-time]
    intervals: comparable on one machine, not across machines with skewed clocks);
    `idle`: the rest of the exchange (scheduling, transfer, waiting)."""
    if not spans:
        return {}
    busy, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return {
        "client_train_sum": sum(b - a for a, b in spans),
        "client_train_max": max(b - a for a, b in spans),
        "client_busy": busy,
        "idle": max(0.0, exchange - busy),
    }
