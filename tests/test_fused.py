"""The fused fast path gives the reference path's outputs and gradients."""

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from seedlora import KINDS, ASpec, SeedLoRALayer


def pair(kind: str, layer_type: str, bias: bool, chain_index: int, dtype=torch.float32):
    """(fused layer, reference layer) sharing one base and a non-zero B."""
    torch.manual_seed(1)
    base = nn.Linear(12, 10, bias=bias) if layer_type == "linear" else Conv1D(10, 12)
    spec = ASpec(kind, 3, chain_index, 4, "l", 12, 10)
    fused = SeedLoRALayer(base.to(dtype), spec, alpha=8.0)
    with torch.no_grad():
        fused.lora_B.normal_()
    reference = copy.deepcopy(fused)
    reference.fused = False
    return fused, reference


def run(layer: SeedLoRALayer, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    return y.detach(), x.grad, layer.lora_B.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
@pytest.mark.parametrize("chain_index", [0, 2])  # circulant at link 2: columns 8..11 (edge)
def test_fused_matches_reference(kind, layer_type, chain_index):
    fused, reference = pair(kind, layer_type, bias=True, chain_index=chain_index)
    x = torch.randn(3, 5, 12)
    for got, want in zip(run(fused, x), run(reference, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_wrapped_block_and_no_bias(kind):
    torch.manual_seed(2)
    base = nn.Linear(12, 10, bias=False)
    spec = ASpec(kind, 0, 5, 5, "w", 12, 10)
    fused = SeedLoRALayer(base, spec, alpha=10.0)
    with torch.no_grad():
        fused.lora_B.normal_()
    reference = copy.deepcopy(fused)
    reference.fused = False
    x = torch.randn(7, 12)
    for got, want in zip(run(fused, x), run(reference, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_wrapping_block_uses_a_gather():
    spec = ASpec("circulant", 0, 2, 5, "w", 12, 10)  # offset 10: columns 10, 11, 0, 1, 2
    assert not spec.contiguous()
    layer = SeedLoRALayer(nn.Linear(12, 10), spec, alpha=5.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    reference = copy.deepcopy(layer)
    reference.fused = False
    x = torch.randn(4, 12)
    assert layer._cols is not None
    for got, want in zip(run(layer, x), run(reference, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_base_keeps_float32_b_and_close_results(kind):
    fused, reference = pair(kind, "linear", bias=True, chain_index=1, dtype=torch.bfloat16)
    assert fused.lora_B.dtype == torch.float32
    x = torch.randn(6, 12, dtype=torch.bfloat16)
    got, want = run(fused, x), run(reference, x)
    assert got[2].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2, atol=3e-2)


def test_autocast_runs_in_the_autocast_dtype():
    fused, reference = pair("gaussian", "linear", bias=True, chain_index=0)
    x = torch.randn(4, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = run(fused, x), run(reference, x)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), rtol=3e-2, atol=3e-2)
