"""The core as a library: the README's example runs, round_average / close_link do what
the Flower path does, and prepare("ffa") honours or refuses a kind."""

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from seedlora import (
    KINDS,
    adapter_layers,
    close_link,
    inject,
    load_trainable_state,
    mean_update,
    prepare,
    relative_error,
    round_average,
    trainable_state,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first python block of the README section on the core alone."""
    section = README.read_text().split("## The core alone, without Flower", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "no python block in the README's core-alone section"
    return match.group(1)


def test_the_readme_example_runs():
    namespace: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)  # noqa: S102
    server, links = namespace["server"], namespace["links"]
    assert [link.chain_index for link in links] == [0, 1]
    layers = dict(adapter_layers(server))
    assert {layer.spec.chain_index for layer in layers.values()} == {2}
    assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in layers.values())
    pristine = namespace["pretrained"]()
    moved = [
        float((layer.base.weight - pristine.get_submodule(n).weight).detach().abs().max())
        for n, layer in layers.items()
    ]
    assert min(moved) > 1e-4  # both links trained something and were merged


@pytest.mark.parametrize("kind", KINDS)
def test_a_round_and_a_link_close_merge_the_mean_update(kind):
    """close_link after round_average merges exactly the clients' weighted mean update."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16))
    inject(model, ["0"], kind=kind, seed=3, rank=4, alpha=8.0)
    layer = model.get_submodule("0")
    w0 = layer.base.weight.detach().clone()
    states = [{"0.lora_B": torch.randn(16, 4, generator=gen)} for _ in range(5)]
    weights = [3.0, 1.0, 4.0, 1.0, 5.0]
    load_trainable_state(model, round_average(states, weights))
    a = layer.spec.dense()
    link = close_link(model)
    exact = mean_update([a] * 5, [s["0.lora_B"] for s in states], weights, layer.scaling)
    assert relative_error(layer.base.weight - w0, exact) <= 1e-6
    assert link.chain_index == 0 and layer.spec.chain_index == 1
    assert torch.count_nonzero(layer.lora_B) == 0
    assert trainable_state(model)["0.lora_B"].abs().sum() == 0
    with pytest.raises(ValueError, match="no client states"):
        round_average([], [])


def test_prepare_ffa_honours_gaussian_and_refuses_other_kinds():
    def model():
        return nn.Sequential(nn.Linear(12, 10))

    for kind in (None, "gaussian"):
        ffa = prepare(model(), "ffa", ["0"], kind=kind, seed=0, rank=4, alpha=8.0)
        assert ffa.get_submodule("0").spec.kind == "gaussian"
    for kind in ("circulant", "random-block"):
        with pytest.raises(ValueError, match=f"a-kind: ffa .* got '{kind}'"):
            prepare(model(), "ffa", ["0"], kind=kind, seed=0, rank=4, alpha=8.0)
        chained = prepare(model(), "seedlora", ["0"], kind=kind, seed=0, rank=4, alpha=8.0)
        assert chained.get_submodule("0").spec.kind == kind


def test_the_run_config_gives_ffa_its_gaussian_a():
    from contract.config import RunConfig

    assert RunConfig.from_flower({"method": "ffa"}).adapter.kind == "gaussian"
    cfg = RunConfig.from_flower({"a-kind": "random-block"})
    assert cfg.adapter.kind == "random-block"
