"""Swapped roles: seeded frozen B, trained A; exact averaging, merges, chains and export."""

import copy

import pytest
import torch
from peft import PeftModel
from transformers.pytorch_utils import Conv1D

from seedlora import (
    KINDS,
    Link,
    adapter_layers,
    export_peft,
    inject,
    links_digest,
    mean_update,
    merge_adapters,
    rebuild,
    record_link,
    relative_error,
    set_chain_index,
    weighted_mean,
)
from seedlora.swapped import SwappedLoRALayer, frozen_spec
from tests import test_app_local as app_tests
from tests.test_app_local import run

overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)
IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def randomize_a(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_mean_of_a_with_a_shared_b_is_the_mean_update(kind):
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(96, 64)
    b = frozen_spec(kind, 0, 1, 8, "l", base).dense().t()  # n_out x r
    assert b.shape == (64, 8)
    a_list = [torch.randn(8, 96, generator=gen) for _ in range(6)]
    weights = [float(w) for w in torch.randint(1, 50, (6,), generator=gen)]
    exact = mean_update(a_list, [b] * 6, weights, 2.0)
    a_bar = weighted_mean([{"a": a} for a in a_list], weights)["a"]
    err = relative_error(2.0 * b @ a_bar, exact)
    print(f"{kind}: swapped-roles relative error {err:.2e}")
    assert err <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_forward_merge_and_rebuild_agree(arch, kind):
    factory, targets, _ = arch
    model = factory().double()
    inject(model, targets, kind=kind, seed=1, rank=4, alpha=8.0, frozen="B")
    layers = dict(adapter_layers(model))
    assert all(isinstance(m, SwappedLoRALayer) for m in layers.values())
    assert all(n.endswith("lora_A") for n, p in model.named_parameters() if p.requires_grad)
    randomize_a(model)
    out = model(IDS).logits
    assert relative_error(out, factory().double()(IDS).logits) > 1e-3  # A moved the output
    deltas = {n: m.delta_weight() for n, m in layers.items()}
    link = record_link(model)
    assert link.frozen == "B" and link.header()["frozen"] == "B"
    merged = copy.deepcopy(model)
    merge_adapters(merged)
    assert relative_error(merged(IDS).logits, out) <= 1e-6  # merge (in float32) == forward
    pristine = factory().double()
    for name, layer in adapter_layers(merged):
        w = layer.base.weight - pristine.get_submodule(name).weight
        w = w.T if isinstance(layer.base, Conv1D) else w  # Conv1D stores W transposed
        assert relative_error(w, deltas[name]) <= 1e-6
    rebuilt = rebuild(factory().double(), [link])
    for name, layer in adapter_layers(merged):
        assert torch.equal(rebuilt.get_submodule(name).weight, layer.base.weight)
    set_chain_index(merged, 1)  # the next link: a new B, A back to zero
    assert all(m.spec.chain_index == 1 and not m.lora_A.any() for _, m in adapter_layers(merged))
    plain = Link(link.alpha, link.specs, link.factors)  # same numbers, default role
    assert links_digest([plain]) != links_digest([link])
    assert Link.from_header(link.header(), link.factors).frozen == "B"


def test_export_peft_of_swapped_links(tmp_path):
    from testing.tiny import GPT2_TARGETS, tiny_gpt2

    model = tiny_gpt2()
    inject(model, GPT2_TARGETS, kind="gaussian", seed=2, rank=4, alpha=8.0, frozen="B")
    links = []
    for c in range(2):
        randomize_a(model, seed=c)
        links.append(record_link(model))
        merge_adapters(model)
        set_chain_index(model, c + 1)
    export_peft(tiny_gpt2(), links, tmp_path / "adapter")
    peft = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "adapter")
    err = relative_error(peft(IDS).logits, model(IDS).logits)
    print(f"swapped PEFT export: logits relative error {err:.2e}")
    assert err <= 1e-5


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["gaussian", "circulant"])
def test_swapped_end_to_end_is_exact(overrides, tmp_path, kind):
    server, grid = run(overrides, tmp_path, **{"frozen-factor": "B", "a-kind": kind})
    pristine = server.task.load_model()
    replies = [r.content for r in grid.replies]
    weights = [r["metrics"]["num-examples"] for r in replies]
    errors = []
    for name, layer in adapter_layers(server.model):
        assert isinstance(layer, SwappedLoRALayer)
        b = frozen_spec(kind, 0, 0, 4, name, layer.base).dense().t()
        a_list = [torch.from_numpy(r["arrays"][f"{name}.lora_A"].numpy()) for r in replies]
        expected = mean_update(a_list, [b] * len(a_list), weights, layer.scaling)
        got = layer.base.weight.double() - pristine.get_submodule(name).weight.double()
        errors.append(relative_error(got.T, expected))
    print(f"swapped {kind}: end-to-end max relative error {max(errors):.2e}")
    assert max(errors) <= 1e-6 and len(errors) == 8
    assert server.state.links[0].frozen == "B"


def test_bad_frozen_factor_names_the_key():
    from contract.config import RunConfig, RunConfigError

    with pytest.raises(RunConfigError, match="'frozen-factor'"):
        RunConfig.from_flower({"frozen-factor": "C"})
    with pytest.raises(RunConfigError, match="frozen-factor"):
        RunConfig.from_flower({"frozen-factor": "B", "method": "fedit"})
    with pytest.raises(RunConfigError, match="client-ranks"):
        RunConfig.from_flower({"frozen-factor": "B", "client-ranks": "2"})


@pytest.mark.parametrize("kind", KINDS)
def test_rank_is_bounded_by_n_out_only_when_a_is_trained(kind):
    """Swapped roles freeze B (n_out x r): a Linear(1, 100) takes r = 10, a Linear(100, 1)
    does not."""
    wide = torch.nn.Sequential(torch.nn.Linear(1, 100))
    inject(wide, ["0"], kind=kind, seed=0, rank=10, alpha=20.0, frozen="B")
    layer = wide.get_submodule("0")
    assert isinstance(layer, SwappedLoRALayer) and layer.lora_A.shape == (10, 1)
    with torch.no_grad():
        layer.lora_A.normal_()
    x = torch.randn(3, 1)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T)
    narrow = torch.nn.Sequential(torch.nn.Linear(100, 1))
    with pytest.raises(ValueError, match="rank: 10 exceeds"):
        inject(narrow, ["0"], kind=kind, seed=0, rank=10, alpha=20.0, frozen="B")


@pytest.mark.parametrize("layer_cls", ["swapped", "core"])
def test_block_rows_follow_the_module_to_another_device(layer_cls):
    """A block B scatters into rows held as an index tensor: it must move with the module
    (it was a plain attribute, left on the CPU by `.to("cuda")`, and index_add failed)."""
    from seedlora.core import CoreLoRALayer
    from seedlora.spec import ASpec

    base = torch.nn.Linear(24, 32)
    if layer_cls == "swapped":
        layer = SwappedLoRALayer(base, frozen_spec("circulant", 0, 0, 4, "l", base), 8.0)
    else:
        layer = CoreLoRALayer(base, ASpec("circulant", 0, 0, 4, "l", 24, 32), 8.0)
    assert layer.rows is not None and layer.rows.device.type == "cpu"
    layer.to("meta")
    assert layer.rows.device.type == "meta"
    assert "rows" not in layer.state_dict()  # derived from the seed, never saved or sent
