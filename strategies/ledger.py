"""What happened in one round, for metrics.json and the round log line.

`LinkStrategy.ledgers` holds one `RoundLedger` per global round; the server reads it
after the round (server/chain_server.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message

from contract import protocol as p


@dataclass(frozen=True)
class Rejection:
    """A reply the pipeline refused: the node that sent it and the reason."""

    node_id: int
    reason: str


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


def client_updates(accepted: Iterable[Message]) -> list[tuple[int, float, dict]]:
    """(partition id, num-examples, state) of each accepted reply (save-client-updates)."""
    return [
        (
            int(m.content[p.ECHO][p.PARTITION_ID]),
            float(m.content[p.METRICS][p.NUM_EXAMPLES]),
            m.content[p.ARRAYS].to_torch_state_dict(),
        )
        for m in accepted
    ]
