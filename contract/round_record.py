"""`RoundRecord`: what one committed round produced, written once and read by every reader.

The server builds one per committed round (server/chain_server.py); the report (the round
line, metrics.json, rounds.jsonl, the plot), TensorBoard, the communication budget and the
empty-run rule (server/outcome.py) read its fields, and resume reads it back from
rounds.jsonl (`from_dict`). Its JSON form (`to_dict`) is metrics.json's round entry,
unchanged in keys and values:

    round, link, central                          every record (round 0: the base model)
    lr, wall_time, phases                         every committed round
    secure: true                                  a SecAgg+ step (no single reply seen)
    round_in_link, num_links, rounds_per_link,    a plain round: `Replies`
    sent, accepted, skipped, rejected, lost, refused, outliers, train_loss, train_metrics,
    client_eval, client_eval_model, bytes_up, bytes_down, bytes_up_per_client,
    bytes_up_total, bytes_down_total, mb_up_total, mb_down_total

Round numbers have one name each: `global_round` ("round" in JSON) counts the run's
rounds from 1 (0 is the base model's evaluation), `round_in_link` the rounds of one link
from 1, and `chain_index` ("link") is the link's position in the chain, DESIGN.md's c.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .protocol import TRAIN_LOSS

MB = 1e6  # bytes: what comm-budget-mb counts in


@dataclass(frozen=True)
class Rejection:
    """A reply the server refused: the node that sent it and the reason."""

    node_id: int
    reason: str


@dataclass(frozen=True)
class Refused:
    """A node whose every train reply of the link so far was rejected (`replies` of them)."""

    node: int
    replies: int
    reason: str


@dataclass(frozen=True)
class Replies:
    """What the clients of a plain round did, and the traffic it cost (none in round 0,
    and none visible in a SecAgg+ step)."""

    round_in_link: int
    num_links: int  # the run's schedule, for the round line
    rounds_per_link: int
    sent: int  # train messages
    accepted: int  # replies aggregated
    skipped: bool = False  # fewer than min-replies accepted: the global B did not change
    rejected: tuple[Rejection, ...] = ()
    lost: tuple[int, ...] = ()  # sampled nodes without a reply in time
    refused: tuple[Refused, ...] = ()
    outliers: tuple[Mapping[str, Any], ...] = ()  # node, norm, bound, action
    train_metrics: Mapping[str, float] = field(default_factory=dict)
    client_eval: Mapping[str, float] = field(default_factory=dict)
    client_eval_model: int | None = None  # the global round whose model client_eval is of
    bytes_up: int = 0  # this round's accepted replies
    bytes_down: int = 0  # this round's messages sent
    bytes_up_total: int = 0  # the run's, this round included
    bytes_down_total: int = 0

    @property
    def train_loss(self) -> float | None:
        return self.train_metrics.get(TRAIN_LOSS)

    def to_dict(self) -> dict[str, Any]:
        return {
            "round_in_link": self.round_in_link,
            "num_links": self.num_links,
            "rounds_per_link": self.rounds_per_link,
            "train_loss": self.train_loss,
            "train_metrics": dict(self.train_metrics),
            "client_eval": dict(self.client_eval),
            "client_eval_model": self.client_eval_model,
            "sent": self.sent,
            "accepted": self.accepted,
            "rejected": [{"node": r.node_id, "reason": r.reason} for r in self.rejected],
            "skipped": self.skipped,
            "lost": list(self.lost),
            "refused": [
                {"node": r.node, "replies": r.replies, "reason": r.reason} for r in self.refused
            ],
            "outliers": [dict(o) for o in self.outliers],
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "bytes_up_per_client": self.bytes_up / max(self.accepted, 1),
            "bytes_up_total": self.bytes_up_total,
            "bytes_down_total": self.bytes_down_total,
            "mb_up_total": self.bytes_up_total / MB,
            "mb_down_total": self.bytes_down_total / MB,
        }

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Replies:
        return cls(
            round_in_link=int(entry.get("round_in_link", 0)),
            num_links=int(entry.get("num_links", 1)),
            rounds_per_link=int(entry.get("rounds_per_link", 0)),
            sent=int(entry.get("sent", 0)),
            accepted=int(entry.get("accepted", 0)),
            skipped=bool(entry.get("skipped", False)),
            rejected=tuple(Rejection(r["node"], r["reason"]) for r in entry.get("rejected", ())),
            lost=tuple(entry.get("lost", ())),
            refused=tuple(
                Refused(r["node"], r["replies"], r["reason"]) for r in entry.get("refused", ())
            ),
            outliers=tuple(entry.get("outliers", ())),
            train_metrics=dict(entry.get("train_metrics") or {}),
            client_eval=dict(entry.get("client_eval") or {}),
            client_eval_model=entry.get("client_eval_model"),
            bytes_up=entry.get("bytes_up", 0),
            bytes_down=entry.get("bytes_down", 0),
            bytes_up_total=entry.get("bytes_up_total", 0),
            bytes_down_total=entry.get("bytes_down_total", 0),
        )


@dataclass(frozen=True)
class RoundRecord:
    """One committed round (module docstring); round 0 is the base model's evaluation."""

    global_round: int
    chain_index: int
    central: Mapping[str, float] = field(default_factory=dict)  # {} without central eval
    lr: float | None = None  # the clients' lr (None in round 0)
    wall_time: float | None = None  # seconds from the last commit to this one
    phases: Mapping[str, float] = field(default_factory=dict)  # seconds per part
    secure: bool = False  # a SecAgg+ step: no single reply is seen, `replies` is None
    replies: Replies | None = None

    @property
    def updates(self) -> int:
        """Client updates the round aggregated (a SecAgg+ step that was committed: 1)."""
        if self.global_round <= 0:
            return 0
        if self.secure:
            return 1
        if self.replies is None or self.replies.skipped:
            return 0
        return self.replies.accepted

    @property
    def skipped(self) -> bool:
        return self.replies is not None and self.replies.skipped

    def to_dict(self) -> dict[str, Any]:
        """metrics.json's round entry (and a rounds.jsonl line)."""
        entry: dict[str, Any] = {
            "round": self.global_round,
            "link": self.chain_index,
            "central": dict(self.central),
        }
        if self.global_round > 0:
            entry |= {"lr": self.lr, "wall_time": self.wall_time, "phases": dict(self.phases)}
        if self.secure:
            entry["secure"] = True
        if self.replies is not None:
            entry |= self.replies.to_dict()
        return entry

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> RoundRecord:
        """The record of a metrics.json / rounds.jsonl entry (keys it lacks: defaults)."""
        plain = "accepted" in entry or "sent" in entry
        return cls(
            global_round=int(entry.get("round", 0)),
            chain_index=int(entry.get("link", 0)),
            central=dict(entry.get("central") or {}),
            lr=entry.get("lr"),
            wall_time=entry.get("wall_time"),
            phases=dict(entry.get("phases") or {}),
            secure=bool(entry.get("secure", False)),
            replies=Replies.from_dict(entry) if plain else None,
        )


def run_bytes(history: Sequence[RoundRecord]) -> tuple[int, int]:
    """The run's bytes up and down after its last round that counted them (SecAgg+ steps
    count none)."""
    last = next((r.replies for r in reversed(history) if r.replies is not None), None)
    return (0, 0) if last is None else (last.bytes_up_total, last.bytes_down_total)


def run_mb(history: Sequence[RoundRecord]) -> tuple[float, float]:
    """`run_bytes` in MB (1e6 bytes: what comm-budget-mb caps)."""
    up, down = run_bytes(history)
    return up / MB, down / MB
