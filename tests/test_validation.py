"""Reply checks: every kind of bad reply is rejected with a reason naming it."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from contract import protocol as p
from strategies.validation import Expectation, check_reply, split_replies

SHAPE = (6, 2)
EXP = Expectation(
    run_id=11,
    chain_index=1,
    links_digest="d" * 64,
    arrays={"l.lora_B": (SHAPE, "float32")},
    max_num_examples=1000,
)


@pytest.fixture(autouse=True)
def identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 11, 0, 0


def reply(node=3, partition=0, arrays=None, metrics=None, echo=None, error=None) -> Message:
    sent = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    if error:
        msg = Message(Error(code=1, reason=error), reply_to=sent)
    else:
        records = {
            p.ARRAYS: ArrayRecord(
                {
                    k: Array(v)
                    for k, v in (arrays or {"l.lora_B": np.ones(SHAPE, np.float32)}).items()
                }
            ),
            p.METRICS: MetricRecord(metrics or {p.NUM_EXAMPLES: 10, p.TRAIN_LOSS: 1.0}),
            p.ECHO: ConfigRecord(
                echo
                or {
                    p.RUN_ID: 11,
                    p.CHAIN_INDEX: 1,
                    p.LINKS_DIGEST: "d" * 64,
                    p.PARTITION_ID: partition,
                }
            ),
        }
        msg = Message(RecordDict(records), reply_to=sent)
    return msg


def test_good_reply_passes():
    assert check_reply(reply(), EXP) is None


GOOD_ECHO = {p.RUN_ID: 11, p.CHAIN_INDEX: 1, p.LINKS_DIGEST: "d" * 64}
BAD = {
    "client error": {"error": "boom"},
    "stale chain index": {"echo": {**GOOD_ECHO, p.CHAIN_INDEX: 0}},
    "foreign links digest": {"echo": {**GOOD_ECHO, p.LINKS_DIGEST: "e" * 64}},
    "foreign run id": {"echo": {**GOOD_ECHO, p.RUN_ID: 12}},
    "NaN or Inf": {"arrays": {"l.lora_B": np.full(SHAPE, np.nan, np.float32)}},
    "float64": {"arrays": {"l.lora_B": np.ones(SHAPE, np.float64)}},
    "(expected float32[6, 2])": {"arrays": {"l.lora_B": np.ones((2, 6), np.float32)}},
    "missing ['l.lora_B']": {"arrays": {"x": np.ones(SHAPE, np.float32)}},
    "extra ['x']": {
        "arrays": {"l.lora_B": np.ones(SHAPE, np.float32), "x": np.ones(1, np.float32)}
    },
    "num-examples 0": {"metrics": {p.NUM_EXAMPLES: 0}},
    "num-examples -5": {"metrics": {p.NUM_EXAMPLES: -5}},
    "num-examples 1000000": {"metrics": {p.NUM_EXAMPLES: 1_000_000}},
    "not a finite number": {"metrics": {p.TRAIN_LOSS: 1.0}},
    "'train-loss' is not finite": {"metrics": {p.NUM_EXAMPLES: 3, p.TRAIN_LOSS: float("inf")}},
}


@pytest.mark.parametrize("expected", sorted(BAD))
def test_bad_reply_rejected_with_reason(expected):
    reason = check_reply(reply(**BAD[expected]), EXP)
    assert reason is not None and expected in reason, reason


def test_split_sorts_by_partition_and_reports_nodes():
    replies = [reply(node=5, partition=2), reply(node=6, error="x"), reply(node=7, partition=0)]
    valid, rejected = split_replies(replies, EXP)
    assert [m.metadata.src_node_id for m in valid] == [7, 5]
    assert [(r.node_id, r.reason) for r in rejected] == [(6, "client error: x")]


def test_mad_threshold_and_clip():
    from strategies import outliers

    assert outliers.threshold([1.0, 2.0], 3.0) is None  # too few to judge
    bound = outliers.threshold([1.0, 1.1, 0.9, 1.05, 50.0], 3.0)
    assert 1.1 < bound < 2.0
    ref = {"b": np.zeros(4, np.float32)}
    state = {"b": np.full(4, 2.0, np.float32)}
    assert outliers.update_norm(state, ref) == pytest.approx(4.0)
    clipped = outliers.clipped(state, ref, 0.25)
    assert outliers.update_norm(clipped, ref) == pytest.approx(1.0)
    assert clipped["b"].dtype == np.float32


def link_strategy():
    """A LinkStrategy on link 1 that sent zeros: what a real round's checks run in."""
    from flwr.serverapp.strategy import FedAvg

    from strategies.chain import LinkContext, LinkStrategy

    ctx = LinkContext(
        run_id=11,
        chain_index=1,
        links=[],
        link_config={},
        round_offset=0,
        rounds_done=0,
        min_replies=1,
        max_num_examples=1000,
        node_links={},
    )
    link = LinkStrategy(FedAvg(), ctx)
    link.digest = "d" * 64
    link.expected_arrays = EXP.arrays
    link.sent_arrays = {"l.lora_B": np.zeros(SHAPE, np.float32)}
    return link


def test_every_bad_reply_is_logged_with_node_and_reason_and_never_averaged(caplog):
    """Through LinkStrategy, the path a real round takes: one log line per bad reply."""
    import logging

    link = link_strategy()
    bad = {name: reply(node=100 + i, **BAD[name]) for i, name in enumerate(sorted(BAD))}
    good = reply(node=99, arrays={"l.lora_B": np.full(SHAPE, 2.0, np.float32)})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = link.aggregate_train(1, [good, *bad.values()])
    for i, name in enumerate(sorted(BAD)):
        line = next(r.getMessage() for r in caplog.records if f"node {100 + i}:" in r.getMessage())
        assert "rejected" in line and name in line, line
    assert link.ledgers[1].accepted == 1 and len(link.ledgers[1].rejected) == len(BAD)
    assert np.array_equal(arrays["l.lora_B"].numpy(), np.full(SHAPE, 2.0, np.float32))


def test_a_superlink_error_for_a_lost_node_names_the_node_not_the_superlink(caplog):
    """Flower answers for an unreachable node with an error from node 1 (the SuperLink)."""
    import logging

    link = link_strategy()
    link.sent_nodes = {42, 99}
    good = reply(node=99)
    unavailable = reply(node=1, error="Node Unavailable")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        link.aggregate_train(1, [good, unavailable])
    lines = [r.getMessage() for r in caplog.records]
    expected = "SuperLink's error for a lost node: client error: Node Unavailable"
    assert any(expected in x for x in lines), lines
    assert any("no reply from node(s) 42" in x for x in lines), lines
    assert not any("reply from node 1:" in x for x in lines), lines
    assert link.ledgers[1].lost == [42] and link.ledgers[1].accepted == 1
