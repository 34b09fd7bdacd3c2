"""Seeded node sampling: with fraction-train < 1 a run is reproducible from its seed,
whatever the node ids and whatever Python's global RNG did before."""

import random

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg

from client.compose import build_client_app
from contract import protocol as p
from contract.config import AdapterConfig, StrategyConfig
from contract.link_spec import LinkSpec
from simulation.local import LocalGrid, run_local
from strategies.chain import LinkContext, LinkStrategy
from strategies.privacy import NOISE_SEED_ENV, noise_seed, seeded_numpy
from strategies.sampling import NodeOrder
from tests import test_app_local as app_tests

overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)
APP = build_client_app({})  # answers the partition query without building any model


def grid_with_ids(num_nodes: int, ids_seed: int) -> LocalGrid:
    """A LocalGrid whose node ids are random (as the SuperLink draws them), listed in a
    random order; node k still holds partition k."""
    grid = LocalGrid(APP, num_nodes)
    rng = random.Random(ids_seed)
    ids = rng.sample(range(10**6, 10**7), num_nodes)
    old = list(grid.apps)
    order = rng.sample(range(num_nodes), num_nodes)
    grid.apps = {ids[i]: APP for i in order}
    grid.contexts = {ids[i]: grid.contexts[old[i]] for i in order}
    for i in order:
        grid.contexts[ids[i]].node_id = ids[i]
    return grid


def sampled_partitions(grid: LocalGrid, seed: int, rounds: int = 4) -> list[list[int]]:
    """The partitions each round's configure_train picks, with fraction-train 0.5."""
    checks = StrategyConfig(fraction_train=0.5, fraction_evaluate=0.0)
    spec = LinkSpec.of(AdapterConfig(seed=seed), ["l"], [])
    ctx = LinkContext(7, spec, [], 0, {}, checks, node_order=NodeOrder())
    link = LinkStrategy(FedAvg(fraction_train=0.5, min_available_nodes=1), ctx)
    arrays = ArrayRecord({"l.lora_B": Array(np.zeros((2, 2), np.float32))})
    picked = []
    for server_round in range(1, rounds + 1):
        random.seed()  # whatever the process did before: fresh entropy
        sent = link.configure_train(server_round, arrays, ConfigRecord(), grid)
        partition = {n: int(c.node_config["partition-id"]) for n, c in grid.contexts.items()}
        picked.append(sorted(partition[m.metadata.dst_node_id] for m in sent))
    return picked


def test_sampling_follows_the_seed_not_the_node_ids_nor_the_global_rng():
    first = sampled_partitions(grid_with_ids(10, ids_seed=1), seed=0)
    assert all(len(r) == 5 for r in first)
    assert sampled_partitions(grid_with_ids(10, ids_seed=2), seed=0) == first
    assert sampled_partitions(grid_with_ids(10, ids_seed=1), seed=3) != first
    assert len({tuple(r) for r in first}) > 1  # rounds differ from each other


def test_sampling_leaves_the_global_rng_alone():
    random.seed(5)
    expected = [random.random() for _ in range(3)]
    random.seed(5)
    checks = StrategyConfig(fraction_train=0.5)
    spec = LinkSpec.of(AdapterConfig(), ["l"], [])
    ctx = LinkContext(7, spec, [], 0, {}, checks, node_order=NodeOrder())
    link = LinkStrategy(FedAvg(fraction_train=0.5, min_available_nodes=1), ctx)
    arrays = ArrayRecord({"l.lora_B": Array(np.zeros((2, 2), np.float32))})
    link.configure_train(1, arrays, ConfigRecord(), grid_with_ids(6, ids_seed=0))
    assert [random.random() for _ in range(3)] == expected


def sampled_run(ov: dict) -> tuple[dict, dict[int, list[int]]]:
    """metrics.json of a run of `ov` over 4 nodes, and the partitions of each global
    round's train messages."""
    app, rounds = build_client_app(ov), {}

    def client(msg, context):
        if msg.metadata.message_type.startswith("train"):
            global_round = int(msg.content[p.CONFIG][p.GLOBAL_ROUND])
            rounds.setdefault(global_round, []).append(int(context.node_config["partition-id"]))
        return app(msg, context)

    metrics = run_local(ov, 4, client_app=client).metrics
    return metrics, {r: sorted(v) for r, v in rounds.items()}


@pytest.mark.integration  # federated rounds in process
@pytest.mark.parametrize("dp", [False, True])
def test_two_runs_with_one_seed_are_identical(overrides, dp, monkeypatch):
    """fraction-train 0.5 over 4 nodes, 2 links x 1 round (and client-level DP with the
    server's secret noise seed): the same seed gives the same links digest, even after
    the global RNGs moved; another seed samples other partitions."""
    extra = {"fraction-train": 0.5, "num-links": 2, "rounds-per-link": 1, "min-replies": 1}
    if dp:
        extra |= {"dp-clip": 0.05, "dp-noise-multiplier": 1.0}
        monkeypatch.setenv(NOISE_SEED_ENV, "8675309")
    ov = {**overrides, **extra}
    runs = []
    for disturb in (1, 2):
        random.seed(disturb)
        np.random.seed(disturb)
        runs.append(sampled_run(ov))
    digests = [metrics["links_digest"] for metrics, _ in runs]
    assert digests[0] == digests[1]
    sampled = runs[0][1]
    assert sampled == runs[1][1]
    assert all(len(v) == 2 for v in sampled.values()) and len(sampled) == 2
    if not dp:
        other = sampled_run({**ov, "seed": 1})[1]
        assert other != sampled


def test_dp_noise_is_seeded_only_by_the_servers_secret(monkeypatch):
    """Flower's noise (numpy's global RNG) is reproducible under the secret, unseeded
    without it, and the global stream is restored; a bad secret names the variable."""
    from flwr.supercore.differential_privacy import add_gaussian_noise_inplace

    from contract.config import RunConfigError

    def noise(secret: int, release: int) -> np.ndarray:
        arrays = [np.zeros(8, np.float32)]
        with seeded_numpy(secret, release):
            add_gaussian_noise_inplace(arrays, 1.0)
        return arrays[0]

    np.random.seed(3)
    expected = np.random.random(3)
    np.random.seed(3)
    first = noise(7, 1)
    assert np.array_equal(np.random.random(3), expected)
    assert np.array_equal(noise(7, 1), first)
    assert not np.array_equal(noise(7, 2), first) and not np.array_equal(noise(8, 1), first)
    monkeypatch.delenv(NOISE_SEED_ENV, raising=False)
    assert noise_seed() is None  # default: Flower's unseeded draw, never the public seed
    monkeypatch.setenv(NOISE_SEED_ENV, " 42 ")
    assert noise_seed() == 42
    monkeypatch.setenv(NOISE_SEED_ENV, "forty-two")
    with pytest.raises(RunConfigError, match=NOISE_SEED_ENV):
        noise_seed()
