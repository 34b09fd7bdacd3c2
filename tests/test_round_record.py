"""RoundRecord: one committed round, written once; its JSON is metrics.json's round entry."""

import dataclasses
import json

import pytest

from contract import protocol as p
from contract.round_record import Refused, Rejection, Replies, RoundRecord, run_bytes, run_mb
from server.outcome import budget_reached
from server.state import replies_of
from simulation.local import run_local
from strategies.ledger import RoundLedger
from tests import test_app_local as app_tests

overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)

BASE_KEYS = {"round", "link", "central"}
COMMITTED_KEYS = BASE_KEYS | {"lr", "wall_time", "phases"}
PLAIN_KEYS = COMMITTED_KEYS | {
    "round_in_link",
    "num_links",
    "rounds_per_link",
    "sent",
    "accepted",
    "skipped",
    "rejected",
    "lost",
    "refused",
    "outliers",
    "train_loss",
    "train_metrics",
    "client_eval",
    "client_eval_model",
    "bytes_up",
    "bytes_down",
    "bytes_up_per_client",
    "bytes_up_total",
    "bytes_down_total",
    "mb_up_total",
    "mb_down_total",
}


def plain(global_round: int, before=(), **ledger) -> RoundRecord:
    """Round `global_round` of link 0 with a ledger of `ledger`'s fields, after `before`."""
    replies = replies_of(RoundLedger(**ledger), global_round, (1, 9), list(before))
    return RoundRecord(
        global_round, 0, {"loss": 2.0}, 1e-3, 1.5, {"configure": 0.1}, False, replies
    )


def test_records_round_trip_through_json_with_metrics_json_keys():
    base = RoundRecord(0, 0, {"loss": 3.0})
    secure = RoundRecord(2, 1, {"loss": 2.5}, lr=1e-3, wall_time=4.0, secure=True)
    ledger = {
        "sent": 3,
        "accepted": 2,
        "rejected": [Rejection(7, "stale chain index 0 (expected 1)")],
        "refused": [Refused(7, 1, "stale chain index 0 (expected 1)")],
        "lost": [9],
        "outliers": [{"node": 8, "norm": 2.0, "bound": 1.0, "action": "flag"}],
        "train_metrics": {p.TRAIN_LOSS: 2.25, p.NUM_EXAMPLES: 20},
        "eval_metrics": {"loss": 2.0},
        "eval_of": 0,
        "bytes_up": 1000,
        "bytes_down": 3000,
    }
    record = plain(1, **ledger)
    assert set(base.to_dict()) == BASE_KEYS
    assert set(secure.to_dict()) == COMMITTED_KEYS | {"secure"}
    assert set(record.to_dict()) == PLAIN_KEYS
    for r in (base, secure, record):
        assert RoundRecord.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    entry = record.to_dict()
    assert entry["train_loss"] == 2.25 and entry["bytes_up_per_client"] == 500
    assert entry["rejected"] == [{"node": 7, "reason": "stale chain index 0 (expected 1)"}]
    assert entry["refused"] == [{"node": 7, "replies": 1, "reason": entry["rejected"][0]["reason"]}]
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.global_round = 5  # type: ignore[misc]


def test_the_run_s_bytes_and_updates_come_from_the_records():
    first = plain(1, sent=2, accepted=2, bytes_up=1_000_000, bytes_down=2_000_000)
    secure = RoundRecord(2, 0, lr=1e-3, wall_time=1.0, secure=True)  # counts no bytes
    skipped = plain(3, [first, secure], sent=2, accepted=1, skipped=True, bytes_down=500_000)
    history = [RoundRecord(0, 0), first, secure, skipped]
    assert skipped.replies.bytes_up_total == 1_000_000
    assert run_bytes(history) == (1_000_000, 2_500_000) and run_mb(history) == (1.0, 2.5)
    assert run_bytes([RoundRecord(0, 0)]) == (0, 0)
    assert [r.updates for r in history] == [0, 2, 1, 0]
    assert budget_reached(history, 3.5) and not budget_reached(history, 3.6)
    assert not budget_reached(history, 0)


def test_from_dict_takes_an_entry_that_lacks_keys():
    """A checkpoint written before the link log kept bare entries in its history."""
    assert RoundRecord.from_dict({"round": 1}) == RoundRecord(1, 0)
    partial = RoundRecord.from_dict({"round": 2, "accepted": 1})
    assert partial.replies == Replies(0, 1, 0, 0, 1) and partial.updates == 1


def test_a_run_s_metrics_json_rounds_are_its_records(overrides, tmp_path):
    """Every entry of a real run's metrics.json and rounds.jsonl reads back as the record
    that wrote it; the plain rounds carry every key of the documented shape."""
    from server import report

    ov = {**overrides, "num-links": 2, "fraction-evaluate": 0.5}
    doc = run_local(ov, 2, out_dir=tmp_path).metrics
    records = report.read_rounds(tmp_path / report.ROUNDS)
    assert [r.to_dict() for r in records] == doc["rounds"]
    assert [r.global_round for r in records] == [0, 1, 2]
    assert [r.chain_index for r in records] == [0, 0, 1]
    assert set(doc["rounds"][0]) == BASE_KEYS
    assert all(set(entry) == PLAIN_KEYS for entry in doc["rounds"][1:])
    assert records[-1].replies.bytes_up_total == sum(e["bytes_up"] for e in doc["rounds"][1:])
