"""strategies/state.py against Flower itself: every strategy of the registry keeps the state
the adapter expects under the names it expects (this fails if Flower renames them), and
a save -> load into a fresh strategy continues exactly as the original would (a resume)."""

import copy

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAdam, FedAvgM

from contract import protocol as p
from contract.config import RunConfig
from simulation.local import LocalGrid
from strategies.chain import as_float32
from strategies.registry import BUILDERS, build_strategy
from strategies.state import load_state, save_state

FEDOPT = {"current_arrays", "m_t", "v_t"}
STATEFUL = {  # registry name -> what the adapter must find after one aggregate
    "fedadam": FEDOPT,
    "fedyogi": FEDOPT,
    "fedadagrad": FEDOPT,
    "fedavgm": {"current_arrays", "momentum_vector"},
}
SHAPES = {"l.lora_B": (6, 2), "head.bias": (3,)}
NODES = 4


def build(name: str):
    cfg = RunConfig.from_flower({"strategy": name, "server-momentum": 0.9, "server-lr": 0.5})
    return build_strategy(cfg.strategy)


def one_round(strategy, arrays: ArrayRecord, server_round: int, seed: int) -> ArrayRecord:
    """configure_train, one reply per sampled node (the update depends on the node and the
    seed only), aggregate_train in node order; the float32 state LinkStrategy keeps."""
    grid = LocalGrid(None, NODES)
    messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    replies = []
    for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
        node = msg.metadata.dst_node_id
        rng = np.random.default_rng(1000 * seed + node)
        trained = {
            k: Array((a.numpy() + rng.normal(0, 0.1, a.shape)).astype(np.float32))
            for k, a in arrays.items()
        }
        content = {p.ARRAYS: ArrayRecord(trained), p.METRICS: MetricRecord({p.NUM_EXAMPLES: node})}
        replies.append(Message(RecordDict(content), reply_to=msg))
    new, _ = strategy.aggregate_train(server_round, replies)
    return as_float32(new)


def same(a: ArrayRecord, b: ArrayRecord) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


ZERO = ArrayRecord({k: Array(np.zeros(s, np.float32)) for k, s in SHAPES.items()})


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_state_is_found_and_a_fresh_strategy_continues_exactly(name):
    original = build(name)
    assert save_state(original) == {}  # nothing before the first round
    after_1 = one_round(original, ZERO, 1, seed=1)
    state = copy.deepcopy(save_state(original))  # what a checkpoint holds
    assert set(state) == STATEFUL.get(name, set()), name
    assert all(v is not None for v in state.values())
    after_2 = one_round(original, after_1, 2, seed=2)
    resumed = build(name)
    load_state(resumed, state)
    assert same(one_round(resumed, after_1, 2, seed=2), after_2), name
    if name in STATEFUL:  # the state matters: without it round 2 comes out otherwise
        assert not same(one_round(build(name), after_1, 2, seed=2), after_2), name


def test_a_dp_wrapper_keeps_the_state_of_the_strategy_it_wraps():
    inner = FedAvgM(min_available_nodes=NODES, server_momentum=0.9)
    private = DifferentialPrivacyServerSideFixedClipping(inner, 0.0, 10.0, NODES)
    after_1 = one_round(private, ZERO, 1, seed=1)
    state = save_state(private)
    assert set(state) == STATEFUL["fedavgm"]
    fresh = DifferentialPrivacyServerSideFixedClipping(
        FedAvgM(min_available_nodes=NODES, server_momentum=0.9), 0.0, 10.0, NODES
    )
    load_state(fresh, copy.deepcopy(state))
    assert fresh.strategy.momentum_vector is not None
    assert same(one_round(fresh, after_1, 2, seed=2), one_round(private, after_1, 2, seed=2))


def test_a_renamed_attribute_is_an_error_not_a_silent_fresh_start():
    class Renamed(FedAdam):  # what a Flower release that renamed m_t would look like
        def __init__(self):
            super().__init__()
            self.first_moment = None
            del self.m_t

    with pytest.raises(AttributeError, match="m_t"):
        save_state(Renamed())
    with pytest.raises(AttributeError, match="m_t"):
        load_state(Renamed(), {"m_t": {}})
    load_state(build("fedavg"), {"current_arrays": ZERO})  # another family's key: ignored
