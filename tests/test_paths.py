"""The forward paths of a SeedLoRALayer (seedlora/paths.py): each gives the reference path's
output and gradients, `choose_path` picks the documented one for each state of the layer,
and the forward has one code path: `self.path(self, x)`."""

import ast
import copy
import inspect
import textwrap

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from seedlora import KINDS, ASpec, SeedLoRALayer, inject
from seedlora.grouped import group_siblings, ungroup
from seedlora.injection import adapter_layers
from seedlora.paths import Fused, Grouped, Reference, WithSidePath, choose_path
from testing.tiny import LLAMA_TARGETS, tiny_llama

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def layer_for(
    kind: str,
    layer_type: str = "linear",
    chain_index: int = 2,
    rank: int = 5,
    dtype: torch.dtype = torch.float32,
    dropout: float = 0.0,
) -> SeedLoRALayer:
    """A layer with a non-zero B; rank 5 at link 2 makes the circulant block wrap."""
    torch.manual_seed(1)
    base = nn.Linear(12, 10) if layer_type == "linear" else Conv1D(10, 12)
    spec = ASpec(kind, 3, chain_index, rank, "l", 12, 10)
    layer = SeedLoRALayer(base.to(dtype), spec, alpha=8.0, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def run(path, layer: SeedLoRALayer, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(y, dx, dB) of `path(layer, x)` under a fixed linear loss."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = path(layer, x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    return y.detach(), x.grad, layer.lora_B.grad.clone()


def assert_same(got, want, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_gives_the_reference_output_and_grads(kind, layer_type, dtype):
    layer = layer_for(kind, layer_type, dtype=dtype)
    x = torch.randn(3, 5, 12, dtype=dtype)
    got, want = run(Fused(), layer, x), run(Reference(), layer, x)
    assert_same(got, want, dtype)
    assert got[0].abs().sum() > 0 and got[2].abs().sum() > 0


def adapted_llama(kind: str, chain_index: int) -> nn.Module:
    """A tiny Llama, every projection adapted with a non-zero B, siblings grouped."""
    model = tiny_llama()
    inject(model, list(LLAMA_TARGETS), kind=kind, seed=5, rank=4, alpha=8.0,
           chain_index=chain_index)  # fmt: skip
    torch.manual_seed(3)
    for _, layer in adapter_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(std=0.5)
    group_siblings(model)
    return model.train()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chain_index", [0, 5])  # circulant at link 5: a wrapping block
def test_grouped_path_gives_each_member_the_reference_output_and_grads(kind, chain_index):
    attn = adapted_llama(kind, chain_index).model.layers[0].self_attn
    x = torch.randn(2, 7, 24)
    for member in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert member.path == Grouped()
        assert_same(run(Grouped(), member, x), run(Reference(), member, x), torch.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inner", [Reference(), Fused()])
def test_side_path_adds_the_merged_links_like_a_dense_merge(kind, inner):
    """WithSidePath(p) on links kept aside == the reference path on the links merged."""
    side = layer_for(kind)
    dense = copy.deepcopy(side)
    side.keep_links_aside()
    for layer in (side, dense):
        torch.manual_seed(4)
        for _ in range(2):  # two links, then a fresh B
            with torch.no_grad():
                layer.lora_B.normal_()
            layer.merge()
        with torch.no_grad():
            layer.lora_B.normal_()
    assert len(side.aside) == 2 and dense.aside is None
    x = torch.randn(4, 12)
    assert_same(run(WithSidePath(inner), side, x), run(Reference(), dense, x), torch.float32)


def test_an_empty_side_path_adds_nothing():
    layer = layer_for("gaussian")
    x = torch.randn(4, 12)
    want = run(Fused(), layer, x)
    layer.keep_links_aside()
    assert layer.path == WithSidePath(Fused())
    for g, w in zip(run(layer.path, layer, x), want, strict=True):
        assert torch.equal(g, w)


def test_autocast_runs_the_fused_path_in_the_autocast_dtype():
    layer = layer_for("gaussian")
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = run(Fused(), layer, x), run(Reference(), layer, x)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert_same(got, want, torch.bfloat16)


def test_choose_path_follows_the_layer_state():
    layer = layer_for("circulant", dropout=0.5)
    assert layer.train().path == Reference()  # adapter dropout in training
    assert layer.eval().path == Fused()  # dropout inactive
    layer.fused = False
    assert layer.path == Reference()
    layer.fused = True
    assert layer.path == Fused()
    layer.base.weight.requires_grad_(True)  # a trainable base needs its gradient
    layer.refresh_path()
    assert layer.path == Reference()
    layer.base.weight.requires_grad_(False)
    layer.refresh_path()
    layer.keep_links_aside()
    assert layer.path == WithSidePath(Fused())
    layer.fused = False
    assert layer.path == WithSidePath(Reference())
    layer.fused = True
    layer.fold()
    assert layer.aside is None and layer.path == Fused()
    assert choose_path(layer) == layer.path
    assert copy.deepcopy(layer).path == Fused()


def test_a_quantized_base_takes_the_reference_path_with_its_side_path():
    """A weight of codes (bitsandbytes stores int8/uint8) cannot go into a fused node."""
    base = nn.Linear(12, 10)
    base.weight = nn.Parameter(torch.zeros(10, 12, dtype=torch.int8), requires_grad=False)
    layer = SeedLoRALayer(base, ASpec("circulant", 0, 0, 4, "q", 12, 10), alpha=8.0)
    assert layer.aside is not None
    assert layer.path == WithSidePath(Reference())


def test_a_group_takes_one_node_only_while_every_member_can_fuse():
    model = adapted_llama("gaussian", 0)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    members = (attn.q_proj, attn.k_proj, attn.v_proj)
    assert all(m.path == Grouped() for m in members)
    assert attn.o_proj.path == Fused()  # no sibling
    attn.k_proj.fused = False  # one member out: the others fall back to their own node
    assert [m.path for m in members] == [Fused(), Reference(), Fused()]
    attn.k_proj.fused = True
    assert all(m.path == Grouped() for m in members)
    mlp.gate_proj.dropout = nn.Dropout(0.1)  # dropout in one member: active in training
    model.train()
    assert [mlp.gate_proj.path, mlp.up_proj.path] == [Reference(), Fused()]
    model.eval()
    assert [mlp.gate_proj.path, mlp.up_proj.path] == [Grouped(), Grouped()]
    ungroup(model)
    assert all(m.path == Fused() for m in members)


def test_the_forward_is_one_call_of_the_chosen_path():
    """Whatever the state (training with dropout, grouped, side path), forward returns what
    `layer.path` returns: no branch of its own."""
    source = textwrap.dedent(inspect.getsource(SeedLoRALayer.forward))
    body = ast.parse(source).body[0].body
    body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    assert len(body) == 1 and isinstance(body[0], ast.Return)
    assert ast.unparse(body[0].value) == "self.path(self, x)"

    model = adapted_llama("random-block", 1)
    layer = model.model.layers[0].self_attn.q_proj
    layer.dropout = nn.Dropout(0.5)
    layer.keep_links_aside()
    sentinel = torch.zeros(1)
    calls = []
    for mode in (True, False):
        layer.train(mode)
        layer.path = lambda module, x: calls.append((module, x)) or sentinel
        x = torch.randn(2, 24)
        assert layer(x) is sentinel
        assert calls[-1][0] is layer and calls[-1][1] is x
    assert len(calls) == 2
