"""The chain loop: the global model, its ChainState, and the steps of a run.

`run_chain` is the whole schedule, `num-links x rounds-per-link` rounds:

    for each link:                       (a fresh strategy: B-space state resets)
        for each round:  configure -> send/receive -> aggregate    (a LinkRunner's round)
                         -> commit_round                           (eval, entry, checkpoint)
        close_link                       (merge s B_bar A_c, next A, B = 0)

A `LinkRunner` (server/rounds.py: Flower's message-API strategies; server/secure.py:
SecAgg+) does the rounds' communication. `ChainServer` holds the state and the float32
master and takes each step; three objects do the rest, one job each: the `Evaluator`
(server/evaluator.py: central set, device, evaluation), the `RunStore` (server/store.py:
run folder, metrics.json, checkpoints, resume) and the `Exporter` (server/exporter.py).
server/compose.py builds all four, for the ServerApp and the in-process harness alike.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Protocol

import torch
from flwr.common.logger import log

from contract import protocol as p
from contract.config import RunConfig
from seedlora import (
    apply_link,
    close_link,
    load_trainable_state,
    set_chain_index,
    trainable_state,
)
from seedlora.methods import LINKED
from strategies.privacy import PrivacyLedger

from . import report
from .evaluator import Evaluator
from .exporter import Exporter
from .outcome import STOPPED_BUDGET, EmptyRunRule, RunFailed, budget_reached, run_mb
from .schedule import round_lr
from .state import ChainState, RoundResult
from .store import RunStore


class OpenLink(Protocol):
    def run_round(self, link_round: int, arrays: dict[str, torch.Tensor]) -> RoundResult:
        """Round `link_round` (from 1) of the open link, from the global `arrays`."""
        ...


class LinkRunner(Protocol):
    """How rounds reach the clients: opens one link at a time for the chain loop."""

    def open_link(self, server: ChainServer) -> OpenLink: ...


def run_chain(server: ChainServer, runner: LinkRunner) -> None:
    """The run, from wherever its ChainState stands (round 0, or a resumed checkpoint).

    `EmptyRunRule` (server/outcome.py) raises RunFailed when the first round, or a whole
    link, accepts no client update. Once `comm-budget-mb` is spent no round starts, and
    the open link is merged with the rounds it has (outcome.py, rule (c))."""
    server.begin()
    num_links, rounds = server.cfg.schedule
    state = server.state
    rule = EmptyRunRule(state, server.cfg.strategy.round_timeout)
    while state.chain_index < num_links and (state.round_in_link or not server.over_budget()):
        link = runner.open_link(server)
        while state.round_in_link < rounds and not server.over_budget():
            result = link.run_round(state.round_in_link + 1, state.arrays)
            rule.round(result, state)
            server.commit_round(result)
        if state.round_in_link < rounds and not rule.in_link:
            break  # over budget, and this link's rounds so far have nothing to merge
        try:
            rule.link(state)
        except RunFailed:
            server.store.write_metrics(state)  # the failed link's rounds, for the reader
            raise
        server.close_link()
    server.finish()


class ChainServer:
    """The loop's state: the float32 master (W0 + merged links, with link c's adapters),
    the ChainState, and the evaluator, store and exporter it hands each step's output to.

    With `resume` the store's checkpoint replaces the fresh state, its links merged into
    the master (compose.build_server builds the master fresh, then resumes)."""

    def __init__(
        self,
        cfg: RunConfig,
        run_id: int,
        task,
        model: torch.nn.Module,
        evaluator: Evaluator,
        store: RunStore,
        exporter: Exporter,
    ):
        self.cfg, self.run_id, self.task, self.model = cfg, run_id, task, model
        self.evaluator, self.store, self.exporter = evaluator, store, exporter
        self.state = ChainState(cfg.to_flower(), links=[], arrays=trainable_state(model))
        log(INFO, report.adapter_summary(model, cfg.adapter.method, self.state.arrays, cfg.upload))
        self.node_links: dict[int, int] = {}  # node id -> merged links it is known to hold
        if cfg.output.resume:
            self._adopt(store.resume(self.state.config))
        done = [h for h in self.state.history if h.get("round", 0) > 0 and not h.get("skipped")]
        self.privacy = PrivacyLedger(releases=len(done) if cfg.privacy.dp_clip > 0 else 0)
        self.stopped: str | None = None  # why the run ended before its last round
        self._round_start = time.perf_counter()

    def _adopt(self, ckpt: ChainState) -> None:
        """Continue from the checkpoint `ckpt`: its links merged into the master, its
        chain index and global trainable state set."""
        for link in ckpt.links:
            apply_link(self.model, link)
        set_chain_index(self.model, ckpt.chain_index)
        load_trainable_state(self.model, ckpt.arrays)
        self.state = ckpt
        log(
            INFO,
            "resumed at link %d round %d (%d links merged, digest %s)",
            ckpt.chain_index,
            ckpt.round_in_link,
            len(ckpt.links),
            ckpt.links.digest[:12],
        )

    # --- what the runners ask ------------------------------------------------------------
    def round_lr(self, global_round: int) -> float:
        """The clients' lr in global round `global_round` (server/schedule.py)."""
        return round_lr(self.cfg.train, global_round, self.cfg.num_rounds)

    def over_budget(self) -> bool:
        """Whether the run's traffic so far has reached `comm-budget-mb` (0: never)."""
        return budget_reached(self.state.history, self.cfg.chain.comm_budget_mb)

    def link_config(self) -> dict:
        """The A-spec fields every client of this link needs (the chain index is added per
        message by strategies/)."""
        a = self.cfg.adapter
        return {
            p.METHOD: a.method,
            p.A_KIND: a.kind,
            p.SEED: a.seed,
            p.RANK: a.rank,
            p.ALPHA: a.alpha,
            p.RUN_ID: self.run_id,
        }

    # --- the steps of run_chain ----------------------------------------------------------
    def begin(self) -> None:
        """Evaluate the base model once, as round 0 of a fresh run (which first clears what
        an earlier run left in the same directory: checkpoints, link log, rounds.jsonl)."""
        s = self.state
        fresh = s.global_round == 0 and not s.history
        self.store.open(s, fresh)
        if fresh:
            s.history.append({"round": 0, "link": 0, "central": self.evaluator.evaluate(s)})
            self.store.base_round(s)
            log(INFO, "base model | central %s", s.history[0]["central"])
        self.store.write_metrics(s)
        self._round_start = time.perf_counter()

    def commit_round(self, result: RoundResult) -> None:
        """Take a round's global state: count it, evaluate, log, and hand its entry to the
        store (rounds.jsonl, checkpoint)."""
        s = self.state
        s.arrays = {k: v.clone() for k, v in result.arrays.items()}
        s.round_in_link += result.rounds
        s.global_round += result.rounds
        s.strategy_state = result.strategy_state
        entry = {
            "round": s.global_round,
            "link": s.chain_index,
            "lr": self.round_lr(s.global_round),
        }
        if result.ledger is None:  # SecAgg+: no single reply is visible
            entry["secure"] = True
        else:
            entry.update(self._ledger_entry(result))
        evaluated = time.perf_counter()
        entry["central"] = self.evaluator.evaluate(s)
        central = time.perf_counter() - evaluated
        entry["wall_time"] = time.perf_counter() - self._round_start
        entry["phases"] = {**result.phases, "central_eval": central}
        self._round_start = time.perf_counter()
        s.history.append(entry)
        if result.ledger is None:
            log(INFO, "secure link %d | central %s", s.chain_index, entry["central"])
        else:
            log(INFO, report.round_line(entry))
        self.store.commit(s, result.ledger.updates if result.ledger is not None else None)

    def _ledger_entry(self, result: RoundResult) -> dict:
        ledger = result.ledger
        return {
            "round_in_link": self.state.round_in_link,
            "num_links": self.cfg.schedule[0],
            "rounds_per_link": self.cfg.schedule[1],  # the run's rounds for one-link methods
            "train_loss": ledger.train_metrics.get(p.TRAIN_LOSS),
            "train_metrics": ledger.train_metrics,
            "client_eval": ledger.eval_metrics,
            "client_eval_model": ledger.eval_of,  # global round of the model evaluated
            "sent": ledger.sent,
            "accepted": ledger.accepted,
            "rejected": [{"node": r.node_id, "reason": r.reason} for r in ledger.rejected],
            "skipped": ledger.skipped,
            "lost": ledger.lost,
            "refused": ledger.refused,
            "outliers": ledger.outliers,
            "bytes_up": ledger.bytes_up,
            "bytes_down": ledger.bytes_down,
            "bytes_up_per_client": ledger.bytes_up / max(ledger.accepted, 1),
            **report.running_totals(self.state.history, ledger.bytes_up, ledger.bytes_down),
        }

    def close_link(self) -> None:
        """Merge the link's averaged B into the base, record it, advance A, reset B; then
        the checkpoint (which adds the link to the log first) and metrics.json.

        fedit and full have no link to merge: their state stays in the arrays."""
        s = self.state
        load_trainable_state(self.model, s.arrays)
        s.chain_index += 1
        s.round_in_link = 0
        if self.cfg.adapter.method in LINKED:
            link = close_link(self.model)  # record, merge, next A with B = 0
            digest = s.links.append(link)
            s.arrays = trainable_state(self.model)
            s.strategy_state = {}
            log(INFO, "link %d merged | links digest %s", link.chain_index, digest[:12])
        self.store.checkpoint(s)
        self.store.write_metrics(s, self.stopped, progress=True)

    def finish(self) -> None:
        """Final summary, plot, generated samples (a generative task) and exports (PEFT adapter
        of rank k*r, merged HF model)."""
        history = self.state.history
        rounds = [h for h in history if h.get("central")]
        if len(rounds) >= 2:
            first, last = rounds[0]["central"], rounds[-1]["central"]
            log(INFO, "central eval: base %s -> final %s", first, last)
        for r in report.refused_nodes(history):
            log(
                WARNING,
                "node %s: every reply of link %d rejected (%d): %s",
                r["node"],
                r["link"],
                r["replies"],
                r["reason"],
            )
        if self.over_budget() and self.state.global_round < self.cfg.num_rounds:
            self.stopped = STOPPED_BUDGET
            up, down = run_mb(history)
            log(
                INFO,
                "communication budget reached: %.3f MB up + %.3f MB down >= comm-budget-mb %g; "
                "the run stopped after round %d of %d (links merged: %d)",
                up,
                down,
                self.cfg.chain.comm_budget_mb,
                self.state.global_round,
                self.cfg.num_rounds,
                len(self.state.links),
            )
        self.store.close(self.state, self.stopped)
        if self.task.sample_count:
            self.store.write_samples(self.evaluator.samples(self.state))
        if self.cfg.output.export:
            self.exporter.export(self.model, self.state)
