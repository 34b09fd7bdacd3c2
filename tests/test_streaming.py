"""Streaming aggregation: train replies checked and added up as they arrive.

The sum is exact, so a round's aggregate is the same bit for bit whatever order its
replies arrive in; a streamed round matches Flower's own average of every reply within
float32 rounding; rejected replies are never added; the robust rules still get every
reply; and the streaming path holds no reply past its turn."""

import gc
import itertools
import time
import weakref
from fractions import Fraction

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from contract import protocol as p
from contract.config import AdapterConfig, StrategyConfig
from contract.link_spec import LinkSpec
from contract.round_record import Refused, RoundRecord
from seedlora.exactsum import ExactSum
from server.rounds import train_exchange
from server.state import replies_of
from simulation.local import LocalGrid
from strategies import exchange
from strategies.chain import LinkContext, LinkStrategy
from strategies.intake import StreamedMean, buffering_reason
from strategies.registry import EXACT_IN_WEIGHT_SPACE, build_strategy

SHAPES = {"l.lora_B": (6, 2), "head.bias": (3,)}
DIGEST = "d" * 64


@pytest.fixture(autouse=True)
def identity():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 11, 0, 0


def wide_float32(rng, shape) -> np.ndarray:
    """float32 values over 60 decades, both signs: where a float64 running sum rounds."""
    size = int(np.prod(shape))
    return (
        (rng.normal(size=size) * 10.0 ** rng.integers(-30, 30, size))
        .astype(np.float32)
        .reshape(shape)
    )


def test_the_exact_sum_is_the_same_in_every_order_and_exact():
    rng = np.random.default_rng(1)
    values = [wide_float32(rng, (40,)) for _ in range(6)]
    weights = [3, 1000, 7, 1, 123_456, 2]
    totals = set()
    for order in itertools.permutations(range(6)):
        acc = ExactSum((40,))
        for i in order:
            acc.add(values[i], weights[i])
        totals.add(acc.total().tobytes())
    assert len(totals) == 1  # 720 orders, one result
    exact = [
        sum(Fraction(float(v[j])) * w for v, w in zip(values, weights, strict=True))
        for j in range(40)
    ]
    got = np.frombuffer(totals.pop())
    assert all(
        abs(Fraction(float(g)) - e) <= abs(e) * Fraction(2) ** -52
        for g, e in zip(got, exact, strict=True)
    )
    # a float64 running sum of the same terms does depend on the order (what the bins avoid)
    forward = sum(v.astype(np.float64) * w for v, w in zip(values, weights, strict=True))
    backward = sum(
        v.astype(np.float64) * w for v, w in reversed(list(zip(values, weights, strict=True)))
    )
    assert not np.array_equal(forward, backward)


def test_the_exact_sum_keeps_a_few_bins_however_many_terms():
    rng = np.random.default_rng(2)
    acc = ExactSum((500,))
    for n in range(200):
        acc.add(rng.normal(0, 0.01, 500).astype(np.float32), 1 + n % 37)
    assert acc.terms == 200 and 1 <= len(acc.bins) <= 4  # B-like values: a handful
    assert all(b.shape == (500,) and b.dtype == np.float64 for b in acc.bins.values())


# --- replies and a LinkStrategy --------------------------------------------------------
def reply(node, arrays, n, loss=1.0, partition=None, echo=None) -> Message:
    sent = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    content = {
        p.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
        p.METRICS: MetricRecord({p.NUM_EXAMPLES: n, p.TRAIN_LOSS: loss}),
        p.ECHO: ConfigRecord(
            echo
            or {
                p.RUN_ID: 11,
                p.CHAIN_INDEX: 1,
                p.LINKS_DIGEST: DIGEST,
                p.PARTITION_ID: node if partition is None else partition,
            }
        ),
    }
    return Message(RecordDict(content), reply_to=sent)


def client_states(count: int, seed: int = 0) -> list[tuple[int, dict, int, float]]:
    """(node, state, num-examples, loss) of `count` clients: float32, varied weights."""
    rng = np.random.default_rng(seed)
    return [
        (
            200 + i,
            {k: rng.normal(0, 0.05, s).astype(np.float32) for k, s in SHAPES.items()},
            int(rng.integers(1, 900)),
            float(rng.uniform(1, 3)),
        )
        for i in range(count)
    ]


def fresh_link(name: str = "fedavg", inner=None, **checks) -> LinkStrategy:
    """A LinkStrategy on link 1 around `inner` (default: the registry's `name`)."""
    section = StrategyConfig(name=name, max_num_examples=1000, server_momentum=0.9, **checks)
    spec = LinkSpec.of(AdapterConfig(), ["l"], [], chain_index=1)
    ctx = LinkContext(11, spec, [], 0, {}, section)
    return LinkStrategy(inner or build_strategy(section), ctx)


def link(name: str = "fedavg", inner=None, **checks) -> LinkStrategy:
    """`fresh_link` whose round sent zeros (what the checks expect)."""
    from strategies.chain import SentRound

    strategy = fresh_link(name, inner, **checks)
    strategy.digest = DIGEST
    zeros = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    record = ArrayRecord({k: Array(v) for k, v in zeros.items()})
    strategy.sent = SentRound(p.arrays_signature(record), zeros, frozenset())
    # the inner strategy's own configure_train: FedAvgM / FedOpt keep the sent state
    strategy.inner.configure_train(1, record, ConfigRecord(), LocalGrid(None, 3))
    return strategy


def aggregate(strategy: LinkStrategy, clients, order) -> tuple[dict, dict]:
    arrays, metrics = strategy.aggregate_train(
        1, [reply(clients[i][0], clients[i][1], clients[i][2], clients[i][3]) for i in order]
    )
    return {k: a.numpy() for k, a in arrays.items()}, dict(metrics)


STREAMED = sorted(EXACT_IN_WEIGHT_SPACE)


@pytest.mark.parametrize("name", STREAMED)
def test_a_streamed_round_is_the_same_in_any_arrival_order(name):
    clients = client_states(7)
    results = []
    rng = np.random.default_rng(3)
    orders = [list(range(7)), list(range(7))[::-1]] + [list(rng.permutation(7)) for _ in range(4)]
    for order in orders:
        strategy = link(name)
        assert strategy.buffering is None  # this rule streams
        arrays, metrics = aggregate(strategy, clients, order)
        results.append(({k: v.tobytes() for k, v in arrays.items()}, metrics))
    assert all(r == results[0] for r in results[1:])


@pytest.mark.parametrize("name", STREAMED)
def test_a_streamed_round_equals_flowers_average_of_every_reply(name):
    """The same two rounds streamed and buffered (the inner strategy given every reply,
    as before): the server optimizer sees the same average within float32 rounding."""
    clients = [client_states(5, seed=1), client_states(5, seed=2)]
    streamed, buffered = link(name), link(name)
    buffered.buffering = "every reply, as before streaming"
    for server_round, round_clients in enumerate(clients, start=1):
        got = []
        for strategy in (streamed, buffered):
            replies = [reply(n, s, w, loss) for n, s, w, loss in round_clients]
            arrays, metrics = strategy.aggregate_train(server_round, replies)
            got.append(({k: a.numpy() for k, a in arrays.items()}, dict(metrics)))
        (a_s, m_s), (a_b, m_b) = got
        for key in SHAPES:
            np.testing.assert_allclose(a_s[key], a_b[key], rtol=1e-5, atol=1e-7)
        assert m_s.keys() == m_b.keys() and m_s[p.TRAIN_LOSS] == pytest.approx(m_b[p.TRAIN_LOSS])


def test_the_streamed_mean_is_the_weighted_mean_and_weighs_the_metrics():
    clients = client_states(4)
    arrays, metrics = aggregate(link(), clients, range(4))
    total = sum(c[2] for c in clients)
    for key in SHAPES:
        want = sum(c[2] * c[1][key].astype(np.float64) for c in clients) / total
        np.testing.assert_allclose(arrays[key], want, rtol=1e-6)
        assert arrays[key].dtype == np.float32
    assert metrics[p.TRAIN_LOSS] == pytest.approx(sum(c[2] * c[3] for c in clients) / total)


def test_rejected_replies_are_never_added():
    clients = client_states(3)
    good = [reply(n, s, w, loss) for n, s, w, loss in clients]
    nan = {k: np.full(s, np.nan, np.float32) for k, s in SHAPES.items()}
    huge = {k: np.full(s, 1e6, np.float32) for k, s in SHAPES.items()}
    bad = [
        reply(300, nan, 10),  # not finite
        reply(301, huge, 10, echo={p.RUN_ID: 11, p.CHAIN_INDEX: 0, p.LINKS_DIGEST: DIGEST}),
        reply(302, huge, 5000),  # num-examples past max-num-examples
    ]
    strategy = link()
    intake = strategy.open_train(1)
    for message in [bad[0], good[0], bad[1], good[1], bad[2], good[2]]:
        intake.add(message)
    assert intake.stream.count == 3 and intake.stream.weight == sum(c[2] for c in clients)
    arrays, _ = strategy.close_train(1, intake)
    clean, _ = aggregate(link(), clients, range(3))
    assert all(np.array_equal(arrays[k].numpy(), clean[k]) for k in SHAPES)
    ledger = strategy.ledgers[1]
    assert ledger.accepted == 3 and [r.node_id for r in ledger.rejected] == [300, 301, 302]


ROBUST = {  # rule -> (registry name, strategy-section fields)
    "fedmedian": ("fedmedian", {}),
    "fedtrimmedavg": ("fedtrimmedavg", {"trim_beta": 0.2}),
    "krum": ("krum", {}),
    "multikrum": ("multikrum", {"krum_select": 2}),
    "outlier-mad": ("fedavg", {"outlier_mad": 3.0}),
}


@pytest.mark.parametrize("rule", sorted(ROBUST))
def test_rules_that_need_every_reply_still_get_every_reply(rule):
    name, checks = ROBUST[rule]
    strategy = link(name, **checks)
    seen = []
    original = strategy.inner.aggregate_train

    def recording(server_round, replies):
        replies = list(replies)
        seen.append(sorted(m.metadata.src_node_id for m in replies))
        return original(server_round, replies)

    strategy.inner.aggregate_train = recording
    assert strategy.buffering is not None
    clients = client_states(6)
    aggregate(strategy, clients, range(6))
    assert seen == [[c[0] for c in clients]]


def test_dp_buffers_and_a_custom_metric_rule_buffers():
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    dp = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 1.0, 3)
    assert "DP" in buffering_reason(StrategyConfig(), dp)
    custom = FedAvg(train_metrics_aggr_fn=lambda records, key: MetricRecord())
    assert "metrics" in buffering_reason(StrategyConfig(), custom)
    assert buffering_reason(StrategyConfig(), FedAvg()) is None


def test_replies_with_other_metric_keys_fail_as_flower_fails():
    from flwr.serverapp.exception import InconsistentMessageReplies

    stream = StreamedMean(p.NUM_EXAMPLES)
    a, b = client_states(2)
    stream.add(reply(a[0], a[1], a[2]))
    other = reply(b[0], b[1], b[2])
    other.content[p.METRICS]["extra"] = 1.0
    stream.add(other)
    with pytest.raises(InconsistentMessageReplies, match="same keys"):
        stream.as_reply()


# --- the exchange: push, pull, one reply at a time ----------------------------------------
def fake_clients(grid: LocalGrid, states: dict[int, dict], weights: dict[int, int], alive=None):
    """Every node of `grid` answers with its fixed state; `alive`, when given, gets after
    each reply the number of earlier replies still in memory."""
    made: list[weakref.ref] = []

    def app(msg: Message, context) -> Message:
        node = msg.metadata.dst_node_id
        if alive is not None:
            gc.collect()
            alive.append(sum(r() is not None for r in made))
        config = msg.content[p.CONFIG]
        chain_index = LinkSpec.from_wire(config[p.LINK_SPEC]).chain_index
        echo = p.echo_record(chain_index, config[p.LINKS_DIGEST], 11, node - 101)
        content = {
            p.ARRAYS: ArrayRecord({k: Array(v) for k, v in states[node].items()}),
            p.METRICS: MetricRecord({p.NUM_EXAMPLES: weights[node], p.TRAIN_LOSS: 1.0}),
            p.ECHO: echo,
        }
        out = Message(RecordDict(content), reply_to=msg)
        made.append(weakref.ref(out))
        return out

    grid.apps = dict.fromkeys(grid.apps, app)


def exchange_round(strategy: LinkStrategy, nodes: int, arrival=None, alive=None, seed=0):
    grid = LocalGrid(None, nodes)
    grid.keep_replies = False
    clients = client_states(nodes, seed)
    states = {101 + i: c[1] for i, c in enumerate(clients)}
    fake_clients(grid, states, {101 + i: c[2] for i, c in enumerate(clients)}, alive)
    grid.arrival = arrival
    zeros = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})
    strategy.ctx.a_digest = ""
    messages = strategy.configure_train(1, zeros, ConfigRecord(), grid)
    arrays, measured = train_exchange(grid, strategy, 1, messages, timeout=30)
    return {k: a.numpy().tobytes() for k, a in arrays.items()}, measured


def test_a_round_through_the_grid_is_the_same_in_any_arrival_order():
    """push, pull one reply at a time in a permuted order, add up: one result."""
    rng = np.random.default_rng(5)
    results = set()
    for k in range(4):
        perm = rng.permutation(64)

        def arrival(ids, perm=perm):
            return sorted(ids, key=lambda i: perm[hash(i) % 64])

        arrays, measured = exchange_round(fresh_link(), 6, arrival=arrival if k else None)
        results.add(tuple(sorted(arrays.items())))
        assert measured.closing >= 0 and measured.intake > 0
    assert len(results) == 1


def test_the_streaming_path_holds_no_reply_past_its_turn(frozen_heap):
    """While the clients of a round answer one after the other, a streamed round keeps at
    most the reply it just added (the loop's variable); a buffered one (fedmedian) keeps
    every accepted reply until the round's last."""
    alive: list[int] = []
    exchange_round(fresh_link(), 8, alive=alive)
    assert len(alive) == 8 and max(alive) <= 1, alive
    alive.clear()
    exchange_round(fresh_link("fedmedian"), 8, alive=alive)
    assert alive == list(range(8)), alive  # the list grows: what streaming avoids


class Slow:
    """A grid whose replies come one per pull, after `silent` empty pulls each time."""

    def __init__(self, count: int, silent: int = 0, lost: int = 0):
        self.pulls, self.silent, self.count, self.lost = 0, silent, count, lost
        self.due: list[str] = []

    def push_messages(self, messages):
        self.due = [f"m{i}" for i in range(len(list(messages)))]
        return [*self.due, None]  # one message the grid could not push (HttpGrid: None)

    def pull_messages(self, ids):
        self.pulls += 1
        answerable = self.due[: len(self.due) - self.lost]
        if self.pulls % (self.silent + 1) or not answerable:
            return []
        msg_id = answerable[0]
        self.due.remove(msg_id)
        out = Message(RecordDict(), dst_node_id=1, message_type="train")
        out.metadata.__dict__["_reply_to_message_id"] = msg_id
        return [out]


def test_replies_come_as_they_arrive_and_the_wait_ends_at_the_timeout():
    grid = Slow(3, silent=1)
    began = time.monotonic()
    got = [m.metadata.reply_to_message_id for m in exchange.replies(grid, [1, 2, 3], 10)]
    assert got == ["m0", "m1", "m2"] and time.monotonic() - began < 5  # not the 10 s timeout
    grid = Slow(3, lost=1)  # m2 never answers
    began = time.monotonic()
    got = [m.metadata.reply_to_message_id for m in exchange.replies(grid, [1, 2, 3], 0.3)]
    assert got == ["m0", "m1"] and 0.3 <= time.monotonic() - began < 5
    assert grid.pulls >= 4  # polled while it waited, a pull every POLL_S


# --- nodes whose every reply in a link is rejected ---------------------------------------
def test_a_node_whose_every_reply_in_the_link_is_rejected_is_named():
    from server import report

    strategy = link()
    clients = client_states(2)
    stale = {p.RUN_ID: 11, p.CHAIN_INDEX: 0, p.LINKS_DIGEST: DIGEST}
    flaky_bad = reply(401, clients[0][1], 10, echo=stale)
    history = []
    for round_in_link in (1, 2):
        replies = [reply(n, s, w) for n, s, w, _ in clients]
        replies.append(reply(400, clients[0][1], 10, echo=stale))  # always stale
        replies.append(flaky_bad if round_in_link == 1 else reply(401, clients[1][1], 10))
        strategy.aggregate_train(round_in_link, replies)
        ledger = strategy.ledgers[round_in_link]
        history.append(RoundRecord(round_in_link, 1, replies=replies_of(ledger, 1, (2, 2), [])))
    reason = "stale chain index 0 (expected 1)"
    assert strategy.ledgers[1].refused == [Refused(400, 1, reason), Refused(401, 1, reason)]
    assert strategy.ledgers[2].refused == [Refused(400, 2, reason)]
    assert report.refused_nodes(history) == [
        {"link": 1, "node": 400, "replies": 2, "reason": reason}
    ]
    text = report.refused_text(strategy.ledgers[2].refused)
    assert text == f"every reply of the link rejected: node 400 (2 replies: {reason})"


@pytest.mark.integration  # two in-process runs of two rounds
def test_a_run_is_the_same_whatever_order_its_replies_arrive_in(tiny_lm_dir, tiny_text_dir):
    """The whole app in process, clients answering in push order or in reverse: every
    round's train loss and central evaluation agree bit for bit."""
    from simulation.local import make_grid, run_local

    overrides = {
        "model-name": tiny_lm_dir,
        "dataset": tiny_text_dir,
        "partitioner": "iid",
        "rounds-per-link": 2,
        "num-links": 1,
        "local-steps": 2,
        "seq-len": 32,
        "max-train-blocks": 16,
        "max-eval-blocks": 8,
        "rank": 4,
        "fraction-evaluate": 0.0,
        "export": False,
    }
    runs = []
    for arrival in (None, lambda ids: ids[::-1]):
        grid = make_grid(overrides, 3)
        grid.arrival = arrival
        doc = run_local(overrides, 3, grid=grid, fresh_cache=True).metrics
        runs.append([(r.get("train_loss"), r["central"]) for r in doc["rounds"]])
    assert runs[0] == runs[1] and len(runs[0]) == 3
