"""Merged links as a stacked side path (seedlora/sidepath.py): the arithmetic a quantized
base relies on, checked on plain float layers standing in for the quantized ones (the side
path does not care what the base is)."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from client.resident import ModelKey, ResidentModel
from seedlora import (
    adapter_layers,
    close_link,
    inject,
    links_digest,
    load_trainable_state,
    rebuild,
    record_link,
    set_chain_index,
    trainable_state,
)
from seedlora.injection import fold_aside, keep_links_aside
from seedlora.sidepath import SidePath, is_quantized
from seedlora.spec import ASpec
from tasks import TaskConfig
from tests.conftest import LLAMA_TARGETS, tiny_llama

KINDS = ("gaussian", "circulant", "random-block")
RANK, ALPHA = 4, 8.0


def _adapted(model: nn.Module, kind: str, chain_index: int = 0) -> nn.Module:
    inject(model, list(LLAMA_TARGETS), kind=kind, seed=5, rank=RANK, alpha=ALPHA,
           chain_index=chain_index)  # fmt: skip
    return model


def _links(kind: str, n: int, dtype=torch.float64) -> list:
    """n links of random B (as the server records them) for the tiny Llama."""
    model = _adapted(tiny_llama().to(dtype), kind)
    gen = torch.Generator().manual_seed(11)
    out = []
    for c in range(n):
        set_chain_index(model, c)
        for _, layer in adapter_layers(model):
            with torch.no_grad():
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
        out.append(record_link(model))
    return out


def _random_b(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in
            trainable_state(model).items()}  # fmt: skip


def _dense_and_side(kind: str, k: int, dtype=torch.float64):
    """(dense model with k links merged into W, side model with them beside W), both at
    chain index k with the same nonzero current B."""
    links = _links(kind, k, dtype)
    dense = _adapted(rebuild(tiny_llama().to(dtype), links), kind, k)
    side = _adapted(tiny_llama().to(dtype), kind, k)
    assert keep_links_aside(side) == len(list(adapter_layers(side)))
    rebuild(side, links)
    state = _random_b(dense, 3)
    load_trainable_state(dense, state)
    load_trainable_state(side, state)
    return dense, side, links


@pytest.mark.parametrize("kind", KINDS)
def test_side_path_output_equals_the_densely_merged_layer(kind):
    dense, side, _ = _dense_and_side(kind, k=3)
    for (name, d), (_, s) in zip(adapter_layers(dense), adapter_layers(side), strict=True):
        assert len(s.aside) == 3 and s.aside.rank == 3 * RANK
        assert torch.equal(s.base.weight, tiny_llama().to(torch.float64).get_submodule(name).weight)
        x = torch.randn(2, 5, d.spec.n_in, dtype=torch.float64, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        y_dense, y_side = d(x), s(x2)
        assert (y_dense - y_side).abs().max() < 1e-12, name
        # the input gradient goes through the side path too: dx += (dy B_cat) A_cat
        g = torch.randn_like(y_dense)
        y_dense.backward(g)
        y_side.backward(g)
        assert (x.grad - x2.grad).abs().max() < 1e-12, name
        merged = d.base.weight - tiny_llama().to(torch.float64).get_submodule(name).weight
        assert (s.aside.delta_weight() - merged).abs().max() < 1e-12, name


@pytest.mark.parametrize("kind", KINDS)
def test_whole_model_forward_and_only_b_gets_gradients(kind):
    dense, side, _ = _dense_and_side(kind, k=2)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    out_d = dense(input_ids=ids, labels=ids)
    out_s = side(input_ids=ids, labels=ids)
    assert (out_d.logits - out_s.logits).abs().max() < 1e-12
    out_s.loss.backward()
    grads = {n for n, p in side.named_parameters() if p.grad is not None}
    assert grads and all(n.endswith("lora_B") for n in grads)
    for _, layer in adapter_layers(side):
        assert all(not t.requires_grad for t in (layer.aside.a_cat, layer.aside.b_dense,
                                                 layer.aside.b_block) if t is not None)  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_averaging_b_over_clients_is_exact_with_a_side_path(kind):
    """mean_i W_eff(B_i) == W_eff(mean_i B_i): every client has the same base, side path
    and A, so the update is linear in B."""
    _, side, _ = _dense_and_side(kind, k=2)
    states = [_random_b(side, s) for s in (1, 2, 3)]
    weights = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64) / 8
    mean = {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) for k in states[0]}
    for name, layer in adapter_layers(side):
        eye = torch.eye(layer.spec.n_in, dtype=torch.float64)

        def w_eff(state, layer=layer, name=name, eye=eye):
            load_trainable_state(side, state)
            with torch.no_grad():
                return layer(eye).t()  # (n_out, n_in): W + side + s B A (no bias)

        each = sum(w * w_eff(s) for w, s in zip(weights, states, strict=True))
        assert (each - w_eff(mean)).abs().max() < 1e-12, name


@pytest.mark.parametrize("kind", KINDS)
def test_close_link_then_fold_is_the_float_master_bit_for_bit(kind):
    """A chain closed on a side-path model, folded at export, equals the dense master."""
    master = _adapted(tiny_llama(), kind)
    side = _adapted(tiny_llama(), kind)
    keep_links_aside(side)
    links = []
    for c in range(3):
        state = _random_b(master, 20 + c)
        load_trainable_state(master, state)
        load_trainable_state(side, state)
        links.append(close_link(master))
        side_link = close_link(side)
        assert links_digest([side_link]) == links_digest([links[-1]])
    for _, s in adapter_layers(side):
        assert len(s.aside) == 3 and not s.lora_B.any()
        assert s.aside.dtype == torch.float32
    fold_aside(side)
    for (name, m), (_, s) in zip(adapter_layers(master), adapter_layers(side), strict=True):
        assert s.aside is None
        assert torch.equal(m.base.weight, s.base.weight), name


def test_side_path_checks_shapes_and_codes_count_as_quantized():
    spec = ASpec("gaussian", 0, 0, 2, "x", 6, 4)
    path = SidePath(6, 4, torch.float64, torch.device("cpu"))
    with pytest.raises(ValueError, match="B shape"):
        path.add(spec, torch.zeros(3, 2), 1.0)
    with pytest.raises(ValueError, match="spec shape"):
        path.add(ASpec("gaussian", 0, 0, 2, "x", 5, 4), torch.zeros(4, 2), 1.0)
    codes = nn.Linear(6, 4)
    codes.weight = nn.Parameter(torch.zeros(12, 1, dtype=torch.uint8), requires_grad=False)
    assert is_quantized(codes) and not is_quantized(nn.Linear(6, 4))


def _key(links: str, **change) -> ModelKey:
    key = ModelKey(
        task=TaskConfig(), links=links, method="seedlora", kind="circulant", seed=5,
        rank=RANK, alpha=ALPHA, chain_index=0, targets=LLAMA_TARGETS, heads=(), frozen="A",
        dropout=0.0, precision="fp32", device="cpu", checkpointing=False, quantization="4bit",
    )  # fmt: skip
    return dataclasses.replace(key, **change)


def test_resident_side_path_model_reuses_its_frozen_base_across_links(tmp_path):
    """The quantized resident path on a float stand-in: W0 loaded once, links beside it,
    outputs equal to the dense master's rebuild."""
    links = _links("circulant", 3, torch.float32)
    loads = []

    def load():
        loads.append(1)
        return tiny_llama()

    resident = ResidentModel()
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1))
    first_base = None
    for k in (0, 1, 3):
        key = _key(links_digest(links[:k]), chain_index=k)
        with resident.use(key, lambda k=k: links[:k], load, tmp_path) as model:
            layer = next(layer for _, layer in adapter_layers(model))
            assert len(layer.aside) == k and layer.spec.chain_index == k
            first_base = first_base or layer.base
            assert layer.base is first_base  # the same frozen layers, never copied
            dense = _adapted(rebuild(tiny_llama(), links[:k]), "circulant", k)
            with torch.no_grad():
                got, want = model(input_ids=ids).logits, dense(input_ids=ids).logits
            assert (got - want).abs().max() < 1e-4 * want.abs().max()
    assert len(loads) == 1 and resident.frozen_loads == 1 and resident.builds == 3
    assert resident.bases.loads == 0  # no float master in side-path mode
    with (
        pytest.raises(ValueError, match="hash"),
        resident.use(_key("0" * 64, chain_index=4), lambda: links, load, tmp_path),
    ):
        pass
    # another base (quantization none -> a master) and back: W0 loaded again
    with resident.use(_key(links_digest(links), quantization="none"), lambda: links,
                      tiny_llama, tmp_path) as dense_model:  # fmt: skip
        assert next(layer for _, layer in adapter_layers(dense_model)).aside is None
    with resident.use(
        _key(links_digest(links[:1]), chain_index=1), lambda: links[:1], load, tmp_path
    ):
        assert resident.frozen_loads == 2


def test_quantization_config_errors_name_the_key():
    from contract.config import RunConfig, RunConfigError

    with pytest.raises(RunConfigError, match="quantization"):
        RunConfig.from_flower({"quantization": "4bit", "device": "cpu"})
    for bad in ({"method": "fedit"}, {"frozen-factor": "B"}, {"client-ranks": "4,2"}):
        with pytest.raises(RunConfigError, match="quantization"):
            RunConfig.from_flower({"quantization": "8bit", "device": "cuda", **bad})
    with pytest.raises(RunConfigError, match="quantization"):
        RunConfig.from_flower({"quantization": "2bit"})
    assert RunConfig.from_flower({"quantization": "4bit"}).train.quantization == "4bit"


def test_loading_a_quantized_base_without_cuda_names_the_key():
    from runtime.quantized import check_quantization

    with pytest.raises(ValueError, match="quantization '4bit'.*CUDA"):
        check_quantization("4bit", torch.device("cpu"))
    check_quantization("none", torch.device("cpu"))  # nothing to check


def test_copied_side_model_is_independent():
    _, side, _ = _dense_and_side("gaussian", k=1)
    twin = copy.deepcopy(side)
    layer = next(layer for _, layer in adapter_layers(twin))
    layer.aside.clear()
    assert len(next(layer for _, layer in adapter_layers(side)).aside) == 1


@pytest.mark.integration  # a fresh interpreter
def test_seedlora_core_imports_no_bitsandbytes():
    import subprocess
    import sys

    code = "import sys, seedlora.layer, seedlora.sidepath; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
