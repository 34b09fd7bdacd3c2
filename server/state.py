"""`ChainState`: the run so far, everything `resume` needs (server/checkpoint.py says where
each part is written); `RoundResult`: what one step of a link runner hands to the chain loop;
`replies_of`: a round's ledger as the `Replies` of its `RoundRecord` (contract/round_record.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from contract.round_record import Replies, RoundRecord, run_bytes
from seedlora.chain import Chain
from seedlora.spec import A_RULE, SCALE_RULE
from strategies.ledger import RoundLedger


@dataclass
class ChainState:
    """The run so far. The names follow DESIGN.md: a *link* is one merged record
    `(A-spec_c, B_bar_c)`; the *chain index* c is the link being trained now."""

    config: dict  # the flat run config (dash keys) the run was started with
    links: Chain  # merged links, chain index 0 first, with their running digests
    arrays: dict[str, torch.Tensor]  # global trainable state of link c: B (n_out x r) + heads
    chain_index: int = 0
    round_in_link: int = 0  # rounds of link c done (0..rounds-per-link)
    global_round: int = 0  # rounds done in the whole run
    strategy_state: dict[str, object] = field(default_factory=dict)  # inner B-space state
    history: list[RoundRecord] = field(default_factory=list)  # one per committed round
    scale: str = SCALE_RULE  # the scale rule the links were merged under ("" = before it)
    a_rule: str = A_RULE  # the rule A was derived by (seedlora.spec; "" = before the record)

    def __post_init__(self) -> None:
        self.links = Chain.of(self.links)  # a plain list is hashed once, here


@dataclass
class RoundResult:
    """What one step of a link runner hands to `ChainServer.commit_round`."""

    arrays: dict[str, torch.Tensor]  # the global trainable state after the step
    rounds: int = 1  # rounds the step covered (SecAgg+ runs a whole link at once)
    ledger: RoundLedger | None = None  # None: the runner cannot see single replies
    strategy_state: dict[str, object] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per part of the step


def replies_of(
    ledger: RoundLedger,
    round_in_link: int,
    schedule: tuple[int, int],
    history: Sequence[RoundRecord],
) -> Replies:
    """What the clients of round `round_in_link` did (its `ledger`), with the run's bytes
    after it: those of `history` (the rounds before it) plus its own. `schedule`: (links,
    rounds per link)."""
    up, down = run_bytes(history)
    return Replies(
        round_in_link=round_in_link,
        num_links=schedule[0],
        rounds_per_link=schedule[1],
        sent=ledger.sent,
        accepted=ledger.accepted,
        skipped=ledger.skipped,
        rejected=tuple(ledger.rejected),
        lost=tuple(ledger.lost),
        refused=tuple(ledger.refused),
        outliers=tuple(ledger.outliers),
        train_metrics=dict(ledger.train_metrics),
        client_eval=dict(ledger.eval_metrics),
        client_eval_model=ledger.eval_of,
        bytes_up=ledger.bytes_up,
        bytes_down=ledger.bytes_down,
        bytes_up_total=up + ledger.bytes_up,
        bytes_down_total=down + ledger.bytes_down,
    )
