"""The B-only layer and injection: math, state, merge, error cases."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from seedlora import (
    KINDS,
    ASpec,
    SeedLoRALayer,
    adapter_layers,
    inject,
    load_trainable_state,
    merge_adapters,
    trainable_state,
)


def make_base(kind_of_layer: str, n_in: int = 12, n_out: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(n_in, n_out) if kind_of_layer == "linear" else Conv1D(n_out, n_in)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_forward_matches_dense_formula_and_merge(kind, layer_type):
    base = make_base(layer_type)
    spec = ASpec(kind, 3, 5, 4, "l", 12, 10)  # circulant offset 20 mod 12 = 8: wraps
    layer = SeedLoRALayer(base, spec, alpha=8.0)
    assert torch.count_nonzero(layer.lora_B) == 0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 12)
    expected = base(x) + spec.scaling(8.0) * x @ spec.dense().T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    out = layer(x)
    layer.merge()
    assert torch.count_nonzero(layer.lora_B) == 0
    torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)


def test_a_is_never_a_parameter_nor_saved():
    layer = SeedLoRALayer(make_base("linear"), ASpec("gaussian", 0, 0, 4, "l", 12, 10), 8.0)
    assert [n for n, _ in layer.named_parameters() if "lora" in n] == ["lora_B"]
    assert "lora_A" not in layer.state_dict()
    assert layer.lora_A is not None and not layer.lora_A.requires_grad
    block = SeedLoRALayer(make_base("linear"), ASpec("circulant", 0, 0, 4, "l", 12, 10), 8.0)
    assert block.lora_A is None  # no dense A for block kinds


def test_only_b_gets_gradients():
    layer = SeedLoRALayer(make_base("conv1d"), ASpec("random-block", 0, 0, 4, "l", 12, 10), 8.0)
    layer(torch.randn(2, 12)).sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
    assert layer.base.weight.grad is None


def test_dropout_only_in_training():
    layer = SeedLoRALayer(make_base("linear"), ASpec("gaussian", 0, 0, 4, "l", 12, 10), 8.0, 0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(64, 12)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError, match="shape"):
        SeedLoRALayer(make_base("linear"), ASpec("gaussian", 0, 0, 4, "l", 10, 12), 8.0)


def test_inject_by_list_and_regex(arch):
    factory, targets, _ = arch
    model = factory()
    names = inject(model, targets, kind="gaussian", seed=0, rank=4, alpha=8)
    assert names and all(isinstance(model.get_submodule(n), SeedLoRALayer) for n in names)
    assert all(p.requires_grad == n.endswith("lora_B") for n, p in model.named_parameters())
    model2 = factory()
    names2 = inject(model2, r".*\.0\..*", kind="circulant", seed=0, rank=4, alpha=8)
    assert names2 and all(".0." in n for n in names2) and len(names2) < len(names)


def test_inject_nothing_matched_is_an_error(arch):
    factory, targets, _ = arch
    with pytest.raises(ValueError, match="target-modules"):
        inject(factory(), ["nope"], kind="gaussian", seed=0, rank=4, alpha=8)
    with pytest.raises(ValueError, match="modules-to-save"):
        inject(
            factory(), targets, kind="gaussian", seed=0, rank=4, alpha=8, modules_to_save=["nope"]
        )


def test_trainable_state_roundtrip_and_errors(arch):
    factory, targets, head = arch
    model = factory()
    inject(model, targets, kind="gaussian", seed=0, rank=4, alpha=8, modules_to_save=[head])
    state = trainable_state(model)
    assert any(k.endswith("lora_B") for k in state) and f"{head}.weight" in state
    new = {k: torch.randn_like(v) for k, v in state.items()}
    load_trainable_state(model, new)
    assert all(torch.equal(trainable_state(model)[k], new[k]) for k in new)
    with pytest.raises(KeyError, match="missing"):
        load_trainable_state(model, dict(list(new.items())[1:]))
    with pytest.raises(KeyError, match="extra"):
        load_trainable_state(model, {**new, "bogus": torch.zeros(1)})
    first = next(iter(new))
    with pytest.raises(ValueError, match="shape"):
        load_trainable_state(model, {**new, first: torch.zeros(3, 3)})


def test_merge_adapters_keeps_the_function(arch):
    factory, targets, _ = arch
    model = factory()
    inject(model, targets, kind="circulant", seed=0, rank=4, alpha=8)
    for _, layer in adapter_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
    ids = torch.randint(0, 97, (2, 9))
    before = model(ids).logits
    merge_adapters(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_rank_is_bounded_by_n_in_only_when_b_is_trained(kind):
    """A (r x n_in) is frozen, B (n_out x r) trained: a Linear(100, 1) takes r = 10; a
    Linear(1, 100) does not (its A would need 10 independent columns out of 1)."""
    narrow = nn.Sequential(nn.Linear(100, 1))
    inject(narrow, ["0"], kind=kind, seed=0, rank=10, alpha=20.0)
    layer = narrow.get_submodule("0")
    assert layer.lora_B.shape == (1, 10)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 100)
    torch.testing.assert_close(layer(x), layer.base(x) + x @ layer.delta_weight().T)
    with pytest.raises(ValueError, match="rank: 10 exceeds"):
        inject(nn.Sequential(nn.Linear(1, 100)), ["0"], kind=kind, seed=0, rank=10, alpha=20.0)


def test_float64_merge_is_exact_in_float64():
    """A float64 base merges (alpha/r) B A in float64 (no float32 detour)."""
    for kind in KINDS:
        for base in (nn.Linear(48, 40).double(), Conv1D(40, 48).double()):
            layer = SeedLoRALayer(base, ASpec(kind, 0, 1, 8, "l", 48, 40), alpha=16.0)
            assert layer.lora_B.dtype == torch.float64
            with torch.no_grad():
                layer.lora_B.copy_(torch.randn(40, 8, dtype=torch.float64, generator=GEN))
            w0 = base.weight.detach().clone()
            delta = layer.spec.scaling(16.0) * layer.lora_B.detach() @ layer.spec.dense().double()
            expected = w0 + (delta.T if isinstance(base, Conv1D) else delta)
            layer.merge()
            err = float((base.weight - expected).abs().max())
            assert base.weight.dtype == torch.float64 and err <= 1e-15, (kind, err)


GEN = torch.Generator().manual_seed(11)
