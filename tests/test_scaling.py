"""Defaults that do not diverge: every frozen kind and role takes the same step size, and the
default run config lowers the loss on the shipped model for each of them."""

import copy
import math

import pytest
import torch

from client.local import train
from contract.config import RunConfig
from seedlora import BLOCK_KINDS, KINDS, ASpec, adapter_layers, prepare
from seedlora.swapped import frozen_spec
from tasks import build_task

ROLES = [("seedlora", "A"), ("seedlora", "B"), ("seedcore", "A")]


@pytest.mark.parametrize("n_in", [192, 768])
def test_gain_gives_the_gaussian_rows_unit_norm(n_in):
    spec = ASpec("gaussian", 0, 0, 8, "l", n_in, 64)
    rows = (spec.dense() * spec.gain).norm(dim=1) ** 2
    assert spec.gain == pytest.approx(math.sqrt(8 / n_in))
    assert abs(float(rows.mean()) - 1) < 0.1  # E|row|^2 = n_in * (1/r) * (r/n_in) = 1
    assert spec.scaling(16.0) == pytest.approx(2.0 * spec.gain)
    for kind in ("circulant", "random-block"):
        block = ASpec(kind, 0, 0, 8, "l", n_in, 64)
        assert block.gain == 1.0 and block.scaling(16.0) == 2.0
    base = torch.nn.Linear(64, n_in)  # swapped roles: the frozen B's columns
    swapped = frozen_spec("gaussian", 0, 0, 8, "l", base)
    cols = (swapped.dense().t() * swapped.gain).norm(dim=0) ** 2
    assert abs(float(cols.mean()) - 1) < 0.1


def step_size(method: str, frozen: str, kind: str, n_in: int, n_out: int) -> float:
    """|dW|_F after 3 Adam steps at lr 1e-3 on one layer (the same data for every kind)."""
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(n_in, n_out))
    prepare(model, method, ["0"], kind=kind, seed=0, rank=8, alpha=16.0, frozen=frozen)
    layer = model.get_submodule("0")
    x, target = torch.randn(64, n_in, generator=gen), torch.randn(64, n_out, generator=gen)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        opt.step()
    return float(layer.delta_weight().norm())


@pytest.mark.parametrize(("method", "frozen"), ROLES)
@pytest.mark.parametrize(("n_in", "n_out"), [(192, 768), (768, 192)])
def test_a_step_moves_the_weight_alike_for_every_kind(method, frozen, n_in, n_out):
    """Without the gain a gaussian step was sqrt(n/r) (here 4.9 to 9.8) times a block's."""
    sizes = {kind: step_size(method, frozen, kind, n_in, n_out) for kind in KINDS}
    print(method, frozen, n_in, n_out, {k: f"{v:.3g}" for k, v in sizes.items()})
    assert max(sizes.values()) / min(sizes.values()) < 1.25, sizes


def test_a_core_step_is_a_b_only_step():
    """seedcore's sqrt(n_out / r) gives a step of R the size of a step of B."""
    for kind in KINDS:
        ratio = step_size("seedcore", "A", kind, 192, 768) / step_size(
            "seedlora", "A", kind, 192, 768
        )
        assert 0.5 < ratio < 2.0, (kind, ratio)


@pytest.fixture(scope="module")
def shipped():
    """The default config on the shipped model, with one batch (8 examples) of client 0."""
    cfg = RunConfig.from_flower({"local-steps": 3})
    task = build_task(cfg.task_config(8))
    return cfg, task, task.load_model(), task.train_dataset(0).select(range(8))


@pytest.mark.parametrize(
    "kind",  # the block kinds always had unit rows: the full loop runs them
    ["gaussian", *(pytest.param(k, marks=pytest.mark.integration) for k in BLOCK_KINDS)],
)
@pytest.mark.parametrize(("method", "frozen"), ROLES)
def test_default_config_lowers_the_loss_on_the_shipped_model(shipped, method, frozen, kind):
    """3 local steps at the default lr, alpha, rank, optimizer and clipping (the clients'
    own loop, client.local.train) lower the loss on the examples they trained on."""
    cfg, task, base, data = shipped
    a = cfg.adapter
    targets = a.targets(task.target_modules)
    model = prepare(
        copy.deepcopy(base),
        method,
        targets,
        kind=kind,
        seed=0,
        rank=a.rank,
        alpha=a.alpha,
        frozen=frozen,
    )
    assert len(list(adapter_layers(model))) == 16
    batch = data[:8]
    with torch.no_grad():
        before = float(task.loss(model, batch))
    train(model, task, data, cfg, torch.device("cpu"), data_seed=1)
    with torch.no_grad():
        after = float(task.loss(model, batch))
    print(f"{method} frozen {frozen} {kind}: loss {before:.3f} -> {after:.3f}")
    assert math.isfinite(after) and after < before - 0.05
