"""What happened in one round, for metrics.json and the round log line.

`LinkStrategy.ledgers` holds one `RoundLedger` per global round; the server reads it
after the round (server/chain_server.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID

from contract import protocol as p
from contract.round_record import Refused, Rejection

__all__ = ["Refusals", "Refused", "Rejection", "RoundLedger", "client_updates"]


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
    eval_of: int | None = None  # the global round whose model eval_metrics describe
    eval_rejected: list[Rejection] = field(default_factory=list)
    skipped: bool = False
    updates: list[tuple[int, float, dict]] = field(default_factory=list)  # (partition, n, B)
    outliers: list[dict] = field(default_factory=list)  # node, norm, bound, action
    lost: list[int] = field(default_factory=list)  # sampled nodes that sent no reply in time
    refused: list[Refused] = field(default_factory=list)  # Refusals.count


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


class Refusals:
    """Per link: how many train replies each node sent and how many were rejected, so a
    node whose every reply in the link was refused can be named, with the last reason
    (the round line, metrics.json's `refused_nodes`)."""

    def __init__(self) -> None:
        self.replies: dict[int, int] = {}
        self.rejected: dict[int, int] = {}
        self.reason: dict[int, str] = {}

    def count(self, accepted: Iterable[int], rejected: Sequence[Rejection]) -> list[Refused]:
        """Count a round's replies (nodes that passed the checks; own rejections, not the
        SuperLink's); the nodes of this link so far with every reply rejected, by id."""
        for node in accepted:
            self.replies[node] = self.replies.get(node, 0) + 1
        for r in rejected:
            if r.node_id == SUPERLINK_NODE_ID:
                continue
            self.replies[r.node_id] = self.replies.get(r.node_id, 0) + 1
            self.rejected[r.node_id] = self.rejected.get(r.node_id, 0) + 1
            self.reason[r.node_id] = r.reason
        return [
            Refused(node, n, self.reason[node])
            for node, n in sorted(self.replies.items())
            if self.rejected.get(node) == n
        ]
