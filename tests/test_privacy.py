"""Client-level DP: clipping, noise on the B aggregate (still exact in weight space), epsilon."""

import math

import pytest
import torch

from contract import protocol as p
from seedlora import KINDS, ASpec, adapter_layers, mean_update, relative_error, weighted_mean
from strategies.privacy import EPSILON, epsilon
from tests import test_app_local as app_tests
from tests.test_app_local import metrics, run

overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)


@pytest.mark.parametrize("kind", KINDS)
def test_noised_b_aggregate_is_the_noised_weight_aggregate(kind):
    gen = torch.Generator().manual_seed(0)
    spec = ASpec(kind, 0, 0, 8, "l", 96, 64)
    a, s = spec.dense(), 2.0
    bs = [torch.randn(64, 8, generator=gen) for _ in range(5)]
    noise = torch.randn(64, 8, generator=gen) * 0.3
    b_bar = weighted_mean([{"b": b} for b in bs], [1.0] * 5)["b"]
    ours = s * (b_bar + noise) @ a  # what the server merges
    exact = mean_update([a] * 5, bs, [1.0] * 5, s) + s * noise.double() @ a.double()
    assert relative_error(ours, exact) <= 1e-6


def test_epsilon_grows_with_releases_and_shrinks_with_noise():
    eps = [epsilon(1.0, t, 4, 4, 1e-5) for t in (1, 4, 16)]
    assert 0 < eps[0] < eps[1] < eps[2]
    assert epsilon(2.0, 4, 4, 4, 1e-5) < eps[1] < epsilon(0.5, 4, 4, 4, 1e-5)
    assert epsilon(1.0, 0, 4, 4, 1e-5) == 0 and math.isinf(epsilon(0.0, 1, 4, 4, 1e-5))


@pytest.mark.integration
def test_clipped_noised_round_end_to_end(overrides, tmp_path):
    clip, z = 0.05, 1.0
    extra = {"dp-clip": clip, "dp-noise-multiplier": z, "a-kind": "gaussian"}
    server, grid = run(overrides, tmp_path, **extra)
    replies = [r.content[p.ARRAYS].to_torch_state_dict() for r in grid.replies]  # as clipped
    norms = [math.sqrt(sum(float(v.double().norm()) ** 2 for v in r.values())) for r in replies]
    assert max(norms) <= clip * (1 + 1e-5), norms  # B started at 0: the state is the update
    link = server.state.links[0]
    noise = []
    for name, layer in adapter_layers(server.model):
        mean = sum(r[f"{name}.lora_B"].double() for r in replies) / len(replies)
        noise.append((link.factors[name].double() - mean).flatten())
        spec = ASpec("gaussian", 0, 0, 4, name, layer.spec.n_in, layer.spec.n_out)
        got = layer.base.weight.double() - server.task.load_model().get_submodule(name).weight
        a = spec.dense().double()
        expected = spec.scaling(8.0) * link.factors[name].double() @ a  # noised B, through A
        assert relative_error(got.T.double(), expected) <= 1e-6
    std = float(torch.cat(noise).std())
    print(f"DP noise std {std:.4g} (expected {z * clip / 3:.4g})")
    assert abs(std / (z * clip / 3) - 1) < 0.15
    eps = metrics(tmp_path)["rounds"][1]["train_metrics"][EPSILON]
    assert eps == pytest.approx(epsilon(z, 1, 3, 3, 1e-5))


@pytest.mark.integration
def test_epsilon_accumulates_over_links(overrides, tmp_path):
    extra = {"dp-clip": 1.0, "dp-noise-multiplier": 2.0, "num-links": 2, "rounds-per-link": 1}
    run(overrides, tmp_path, **extra)
    eps = [r["train_metrics"][EPSILON] for r in metrics(tmp_path)["rounds"][1:]]
    assert eps == pytest.approx([epsilon(2.0, t, 3, 3, 1e-5) for t in (1, 2)])


def test_dp_needs_a_linear_strategy():
    from contract.config import RunConfig, RunConfigError

    with pytest.raises(RunConfigError, match="dp-clip"):
        RunConfig.from_flower({"dp-clip": 1.0, "strategy": "fedmedian"})
