"""Reply checks: every kind of bad reply is rejected with a reason naming it, through the
reply pipeline (strategies/replies.py) and LinkStrategy, with the round numbers it uses."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from contract import protocol as p
from strategies.outliers import OutlierScreen
from strategies.rejections import (
    BadArrays,
    BadMetrics,
    ClientErrorReply,
    ForeignReply,
    ReplyRejected,
)
from strategies.replies import train_pipeline
from strategies.uploads import Unpack
from strategies.validation import Expectation, check_arrays, check_envelope

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


def check(message: Message) -> Message:
    """The two checks of a float32 train reply, in the pipeline's order."""
    return check_arrays(check_envelope(message, EXP), EXP)


def pipeline(mad: float = 0.0, action: str = "flag"):
    """The train pipeline of a round that sent zeros (float32 uploads, one rank)."""
    zeros = {"l.lora_B": np.zeros(SHAPE, np.float32)}
    return train_pipeline(EXP, Unpack(zeros, "float32", False), OutlierScreen(mad, action, zeros))


def test_good_reply_passes():
    good = reply()
    assert check(good) is good


GOOD_ECHO = {p.RUN_ID: 11, p.CHAIN_INDEX: 1, p.LINKS_DIGEST: "d" * 64}
BAD = {  # reason fragment -> (the fault, the rejection it raises)
    "client error": ({"error": "boom"}, ClientErrorReply),
    "stale chain index": ({"echo": {**GOOD_ECHO, p.CHAIN_INDEX: 0}}, ForeignReply),
    "foreign links digest": ({"echo": {**GOOD_ECHO, p.LINKS_DIGEST: "e" * 64}}, ForeignReply),
    "foreign run id": ({"echo": {**GOOD_ECHO, p.RUN_ID: 12}}, ForeignReply),
    "NaN or Inf": ({"arrays": {"l.lora_B": np.full(SHAPE, np.nan, np.float32)}}, BadArrays),
    "float64": ({"arrays": {"l.lora_B": np.ones(SHAPE, np.float64)}}, BadArrays),
    "(expected float32[6, 2])": (
        {"arrays": {"l.lora_B": np.ones((2, 6), np.float32)}},
        BadArrays,
    ),
    "missing ['l.lora_B']": ({"arrays": {"x": np.ones(SHAPE, np.float32)}}, BadArrays),
    "extra ['x']": (
        {"arrays": {"l.lora_B": np.ones(SHAPE, np.float32), "x": np.ones(1, np.float32)}},
        BadArrays,
    ),
    "num-examples 0": ({"metrics": {p.NUM_EXAMPLES: 0}}, BadMetrics),
    "num-examples -5": ({"metrics": {p.NUM_EXAMPLES: -5}}, BadMetrics),
    "num-examples 1000000": ({"metrics": {p.NUM_EXAMPLES: 1_000_000}}, BadMetrics),
    "not a finite number": ({"metrics": {p.TRAIN_LOSS: 1.0}}, BadMetrics),
    "'train-loss' is not finite": (
        {"metrics": {p.NUM_EXAMPLES: 3, p.TRAIN_LOSS: float("inf")}},
        BadMetrics,
    ),
}


@pytest.mark.parametrize("expected", sorted(BAD))
def test_bad_reply_rejected_with_reason(expected):
    fault, kind = BAD[expected]
    with pytest.raises(ReplyRejected) as caught:
        check(reply(**fault))
    assert type(caught.value) is kind and expected in caught.value.reason, caught.value


def test_pipeline_sorts_by_partition_and_reports_nodes():
    replies = [reply(node=5, partition=2), reply(node=6, error="x"), reply(node=7, partition=0)]
    verdict = pipeline()(replies)
    assert [m.metadata.src_node_id for m in verdict.accepted] == [7, 5]
    assert [(r.node_id, r.reason) for r in verdict.rejected] == [(6, "client error: x")]
    assert verdict.checked == [7, 5] and verdict.rejected_nodes == [6]
    assert verdict.outliers == []


@pytest.mark.parametrize("action", ["flag", "drop", "clip"])
def test_the_screen_flags_drops_or_clips_the_outlier(action):
    """The MAD screen over the round's checked replies: node 9 sent 50x the others."""
    replies = [reply(node=n, partition=n) for n in (3, 4, 5, 6)]
    replies.append(
        reply(node=9, partition=9, arrays={"l.lora_B": np.full(SHAPE, 50.0, np.float32)})
    )
    verdict = pipeline(mad=3.0, action=action)(replies)
    assert [o["node"] for o in verdict.outliers] == [9] and verdict.outliers[0]["action"] == action
    bound = verdict.outliers[0]["bound"]
    assert verdict.checked == [3, 4, 5, 6, 9]  # a screened-out node still holds every link
    kept = {
        m.metadata.src_node_id: m.content[p.ARRAYS]["l.lora_B"].numpy() for m in verdict.accepted
    }
    assert sorted(kept) == ([3, 4, 5, 6] if action == "drop" else [3, 4, 5, 6, 9])
    if action != "drop":
        norm = float(np.linalg.norm(kept[9].astype(np.float64)))
        assert norm == pytest.approx(bound if action == "clip" else 50.0 * np.sqrt(12))


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


def link_strategy(nodes: frozenset[int] = frozenset(), inner=None, **checks):
    """A LinkStrategy on link 1 that sent zeros to `nodes`: what a real round's checks run in
    (`inner` defaults to FedAvg; `checks` are strategy-section fields)."""
    from flwr.serverapp.strategy import FedAvg

    from contract.config import StrategyConfig
    from strategies.chain import LinkContext, LinkStrategy, SentRound

    ctx = LinkContext(
        run_id=11,
        chain_index=1,
        links=[],
        link_config={},
        round_offset=0,
        rounds_done=0,
        node_links={},
        checks=StrategyConfig(max_num_examples=1000, **checks),
    )
    link = LinkStrategy(inner or FedAvg(), ctx)
    link.digest = "d" * 64
    link.sent = SentRound(EXP.arrays, {"l.lora_B": np.zeros(SHAPE, np.float32)}, nodes)
    return link


def test_every_bad_reply_is_logged_with_node_and_reason_and_never_averaged(caplog):
    """Through LinkStrategy, the path a real round takes: one log line per bad reply."""
    import logging

    link = link_strategy()
    bad = {name: reply(node=100 + i, **BAD[name][0]) for i, name in enumerate(sorted(BAD))}
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

    link = link_strategy(frozenset({42, 99}))
    good = reply(node=99)
    unavailable = reply(node=1, error="Node Unavailable")
    with caplog.at_level(logging.INFO, logger="flwr"):
        link.aggregate_train(1, [good, unavailable])
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    expected = "SuperLink answered for a lost node: client error: Node Unavailable"
    assert any(level == logging.INFO and expected in x for level, x in lines), lines
    assert any(level == logging.WARNING and "no reply from node(s) 42" in x for level, x in lines)
    assert not any("reply from node 1:" in x for _, x in lines), lines
    ledger = link.ledgers[1]
    assert ledger.lost == [42] and ledger.accepted == 1
    assert ledger.rejected == []  # the lost node is named once, as lost, not as node 1 too


def test_a_superlink_error_without_a_lost_node_stays_a_rejection():
    """Every sampled node replied (here 99), yet node 1 answered too: that one is listed."""
    link = link_strategy(frozenset({99}))
    link.aggregate_train(1, [reply(node=99), reply(node=1, error="odd")])
    assert [(r.node_id, r.reason) for r in link.ledgers[1].rejected] == [(1, "client error: odd")]


def test_the_inner_strategy_sees_the_link_round_and_clients_the_global_round():
    """A resumed link: 10 global rounds before this start(), 2 of them in this link. Flower's
    round 1 of the start() call is link round 3 (every hook of the inner strategy) and global
    round 11 (on the wire, in the ledger); node 102 sent a bad reply and gets every link."""
    import torch
    from flwr.serverapp.strategy import FedAvg

    from seedlora import ASpec, Link
    from simulation.local import LocalGrid
    from strategies.chain import LinkContext, LinkStrategy

    hooks = ["configure_train", "aggregate_train", "configure_evaluate", "aggregate_evaluate"]
    rounds: dict[str, int] = {}  # hook -> the round number the inner strategy got

    def recorded(hook: str):
        def method(self, server_round, *args):
            rounds[hook] = server_round
            return getattr(FedAvg, hook)(self, server_round, *args)

        return method

    recorder = type("Recorder", (FedAvg,), {hook: recorded(hook) for hook in hooks})

    links = [Link(2.0, (ASpec("circulant", 0, 0, 2, "l", 4, 6),), {"l": torch.ones(6, 2)})]
    node_links = {101: 1, 102: 1}
    ctx = LinkContext(11, 1, links, {p.RANK: 2}, 10, 2, node_links)
    inner = recorder(min_available_nodes=2, min_train_nodes=2, min_evaluate_nodes=2)
    link = LinkStrategy(inner, ctx)
    grid = LocalGrid(None, 2)
    arrays = ArrayRecord({"l.lora_B": Array(np.zeros(SHAPE, np.float32))})
    sent = list(link.configure_train(1, arrays, ConfigRecord(), grid))
    configs = [m.content[p.CONFIG] for m in sent]
    assert [c[p.SERVER_ROUND] for c in configs] == [11, 11]
    assert all(c[p.CHAIN_INDEX] == 1 and c[p.RANK] == 2 for c in configs)
    assert [m.content[p.LINKS][p.LINKS_START] for m in sent] == [1, 1]  # they hold link 0
    echo = {**GOOD_ECHO, p.LINKS_DIGEST: link.digest}
    good, stale = reply(node=101, echo=echo), reply(node=102, echo={**echo, p.CHAIN_INDEX: 0})
    new, _ = link.aggregate_train(1, [good, stale])
    assert new is not None and node_links == {101: 1, 102: 0}
    sent = list(link.configure_evaluate(1, new, ConfigRecord(), grid))
    starts = {m.metadata.dst_node_id: m.content[p.LINKS][p.LINKS_START] for m in sent}
    assert starts == {101: 1, 102: 0}  # the rejected node is sent every link again
    link.aggregate_evaluate(1, [reply(node=101, echo=echo), reply(node=102, echo=echo)])
    assert rounds == dict.fromkeys(hooks, 3)
    assert list(link.ledgers) == [11] and link.ledgers[11].accepted == 1
    assert link.ledgers[11].eval_metrics and node_links == {101: 1, 102: 1}


def test_a_reply_on_another_a_is_a_foreign_a():
    """With the server's A digest in the expectation, the echo must carry the same one."""
    from dataclasses import replace

    from strategies.rejections import ForeignA

    exp = replace(EXP, a_digest="exact-v2:" + "a" * 64)
    same = reply(echo={**GOOD_ECHO, p.A_DIGEST: "exact-v2:" + "a" * 64})
    assert check_envelope(same, exp) is same
    other = {**GOOD_ECHO, p.A_DIGEST: "exact-v2:" + "b" * 64}  # the same rule, another A
    for echo, got in [(GOOD_ECHO, "missing"), (other, "b" * 12)]:
        with pytest.raises(ForeignA) as caught:
            check_envelope(reply(echo=echo), exp)
        assert caught.value.reason.startswith(f"A digest {got} differs from the server's aaaa")
        assert "under the same A rule 'exact-v2'" in caught.value.reason
    # a node on another seedlora: no rule in its digest (before the record) or another one
    for echo_digest, rule in [("a" * 64, "torch-v1"), ("exact-v3:" + "a" * 64, "exact-v3")]:
        with pytest.raises(
            ForeignA,
            match=f"A rule '{rule}' of the client differs from the "
            "server's 'exact-v2'.*one seedlora version",
        ):
            check_envelope(reply(echo={**GOOD_ECHO, p.A_DIGEST: echo_digest}), exp)
    assert check_envelope(reply(), EXP)  # no digest expected (fedit, full): not checked


def test_fedtrimmedavg_says_when_it_trims_nothing(caplog):
    """trim-beta 0.2 over 4 replies cuts int(0.8) = 0 at each end: warned once per link;
    over 5 replies it cuts one at each end: no warning."""
    import logging

    from flwr.serverapp.strategy import FedTrimmedAvg

    def round_of(link, n, server_round):
        replies = [
            reply(node=20 + i, partition=i, arrays={"l.lora_B": np.full(SHAPE, i, np.float32)})
            for i in range(n)
        ]
        return link.aggregate_train(server_round, replies)[0]["l.lora_B"].numpy()

    few = link_strategy(inner=FedTrimmedAvg(beta=0.2), name="fedtrimmedavg", trim_beta=0.2)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert np.allclose(round_of(few, 4, 1), 1.5)  # the plain mean of 0..3
        round_of(few, 4, 2)
    warned = [r.getMessage() for r in caplog.records if "trims nothing" in r.getMessage()]
    assert len(warned) == 1 and "trim-beta 0.2 x 4 replies < 1" in warned[0], warned
    assert "needs >= 5 replies" in warned[0]
    caplog.clear()
    enough = link_strategy(inner=FedTrimmedAvg(beta=0.2), name="fedtrimmedavg", trim_beta=0.2)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        assert np.allclose(round_of(enough, 5, 1), 2.0)  # 1, 2, 3 kept
    assert not any("trims nothing" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("rule", ["krum", "multikrum"])
def test_krum_says_when_a_round_keeps_a_single_client(caplog, rule):
    import logging

    from flwr.serverapp.strategy import Krum, MultiKrum

    inner = Krum() if rule == "krum" else MultiKrum(num_nodes_to_select=1)
    link = link_strategy(inner=inner, name=rule, krum_select=1)
    values = {30: 1.0, 31: 1.1, 32: 9.0, 33: 0.9}
    replies = [
        reply(node=n, partition=n, arrays={"l.lora_B": np.full(SHAPE, v, np.float32)})
        for n, v in values.items()
    ]
    with caplog.at_level(logging.WARNING, logger="flwr"):
        arrays, _ = link.aggregate_train(1, replies)
    kept = float(arrays["l.lora_B"].numpy()[0, 0])
    node = next(n for n, v in values.items() if np.float32(v) == np.float32(kept))
    lines = [r.getMessage() for r in caplog.records if "kept a single client" in r.getMessage()]
    assert lines == [
        f"round 1: {rule} kept a single client's update (node {node}) and dropped 3: with "
        "non-IID clients a round then trains on one client's data (docs/running.md#strategies)"
    ]
    caplog.clear()
    several = link_strategy(inner=MultiKrum(num_nodes_to_select=2), name="multikrum")
    with caplog.at_level(logging.WARNING, logger="flwr"):
        several.aggregate_train(1, replies)
    assert not any("kept a single client" in r.getMessage() for r in caplog.records)
