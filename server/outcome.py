"""When a run has failed although every round "ran": the rule for updates never accepted.

A round is *empty* when it aggregates no client update: every reply was rejected or
lost (none in time: `round-timeout`), or fewer than `min-replies` were valid (the round
is skipped). An empty round changes nothing, and a run keeps going past one. But

(a) a run whose first round is empty fails at once (before that round is committed):
    nothing has ever worked, so every later round would most likely be empty too (every
    client failing, a round-timeout shorter than a round, a simulation that never
    started); and
(b) a run fails when a whole link ends empty (before it would be merged): the link
    would merge nothing, and the run would "complete" with a model equal to its base.

Failing raises `RunFailed`, whose one-line message says which rule and why (the counts,
and the first rejection reason); the ServerApp logs it and the launcher prints it as its
last line and exits 1. A failure under (b) keeps the last checkpoint, so `resume=true`
(with, say, a longer `round-timeout`, which may change on resume) continues the run.
SecAgg+ hides single replies: its step (a whole link) counts as empty when it returns the
arrays it started from.

A run can also end early and *succeed*: (c) with `comm-budget-mb` B > 0, once the run's
cumulative traffic after a round (MB = 1e6 bytes, up + down, as metrics.json counts it:
train messages sent, replies accepted) reaches B, no further round starts. The link open
at that moment is closed and merged with the rounds it has, so the exported model (PEFT
adapter, merged model, both built from the merged links) holds every round the run paid
for; a link whose rounds so far accepted no update is left unmerged (it would add
nothing). metrics.json records `"stopped": "comm-budget"`; the ServerApp exits normally
(launcher exit 0). Resuming such a run stops again at once (its history is over budget);
resuming it with a larger `comm-budget-mb` (or 0) continues with the next link.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from contract.round_record import RoundRecord, run_mb

from .state import ChainState, RoundResult

REASON_CHARS = 160  # of the first rejection reason quoted in the message
STOPPED_BUDGET = "comm-budget"  # metrics.json "stopped" of a run ended by rule (c)


class RunFailed(RuntimeError):
    """The run cannot produce a trained model; the message is one line."""


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _why(result: RoundResult, timeout: float) -> str:
    ledger = result.ledger
    if ledger is None:
        return "SecAgg+ aggregated no update"
    parts = [f"{ledger.sent} sent"]
    if ledger.lost:
        parts.append(f"{len(ledger.lost)} without a reply in time (round-timeout {timeout:g} s)")
    if ledger.rejected:
        first = ledger.rejected[0]
        reason = " ".join(first.reason.split())[:REASON_CHARS]
        parts.append(f"{len(ledger.rejected)} rejected, e.g. node {first.node_id}: {reason}")
    if ledger.skipped and ledger.accepted:
        parts.append(f"{ledger.accepted} valid, fewer than min-replies")
    return ", ".join(parts)


class EmptyRunRule:
    """Applies rules (a) and (b) of the module docstring to the chain loop's steps."""

    def __init__(self, state: ChainState, timeout: float):
        history = state.history
        self.timeout = timeout
        self.ever = any(r.updates for r in history)
        self.in_link = sum(r.updates for r in history if r.chain_index == state.chain_index)

    def round(self, result: RoundResult, state: ChainState) -> None:
        """Before `commit_round`: raise under (a), else count the round's updates."""
        if result.ledger is None:
            accepted = int(not _same(result.arrays, state.arrays))
        else:
            accepted = 0 if result.ledger.skipped else result.ledger.accepted
        if accepted == 0 and not self.ever:
            raise RunFailed(
                f"round {state.global_round + 1} accepted no client update "
                f"({_why(result, self.timeout)}); a run whose first round accepts none fails"
            )
        self.ever = self.ever or accepted > 0
        self.in_link += accepted

    def link(self, state: ChainState) -> None:
        """Before `close_link`: raise under (b), else start counting the next link."""
        if self.in_link == 0:
            raise RunFailed(
                f"link {state.chain_index} accepted no client update in its "
                f"{state.round_in_link} round(s) (see 'rejected' and 'lost' in metrics.json); "
                "nothing to merge, so the run fails (resume=true continues from its last "
                "checkpoint)"
            )
        self.in_link = 0


def budget_reached(history: Sequence[RoundRecord], budget_mb: float) -> bool:
    """Rule (c): the run's MB up + down has reached `budget_mb` (never when it is 0)."""
    return budget_mb > 0 and sum(run_mb(history)) >= budget_mb
