"""`base-kernels = "liger"`: Liger's instance patches on the frozen base, nothing global.

On the CPU a stand-in for liger-kernel's table of patch functions checks what
`runtime.kernels.use_liger` asks of it (norms and MLP on, RoPE and the fused loss off) and
that it undoes the module-level swaps; on a CUDA machine with liger-kernel the real
kernels must give the torch model's loss and gradients.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from contract.config import RunConfig, RunConfigError
from runtime.kernels import use_liger
from testing.tiny import tiny_gpt2, tiny_llama

TABLE = "liger_kernel.transformers.monkey_patch"


def _fake_liger(monkeypatch: pytest.MonkeyPatch, calls: list[dict]) -> None:
    """A liger-kernel whose llama patch records its arguments and, as the real one does,
    swaps a class in transformers' llama module and patches the instance."""
    import transformers.models.llama.modeling_llama as llama

    def apply(model, rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True):
        calls.append(
            dict(rope=rope, rms_norm=rms_norm, swiglu=swiglu, flce=fused_linear_cross_entropy)
        )
        llama.LlamaRMSNorm = object  # the module-level class swap
        model.model.norm.patched = True

    fake = types.ModuleType(TABLE)
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply}
    monkeypatch.setitem(sys.modules, TABLE, fake)


def test_use_liger_patches_the_instance_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.models.llama.modeling_llama as llama

    calls: list[dict] = []
    _fake_liger(monkeypatch, calls)
    norm_class = llama.LlamaRMSNorm
    model = use_liger(tiny_llama())
    assert calls == [dict(rope=False, rms_norm=True, swiglu=True, flce=False)]
    assert model.model.norm.patched
    assert llama.LlamaRMSNorm is norm_class  # the module-level swap was undone


def test_use_liger_names_the_key_for_an_unsupported_model(monkeypatch) -> None:
    _fake_liger(monkeypatch, [])
    with pytest.raises(ValueError, match=r"base-kernels: .*'gpt2'.*llama"):
        use_liger(tiny_gpt2())


def test_use_liger_names_the_key_when_liger_is_missing(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, TABLE, None)  # import of it raises ImportError
    with pytest.raises(ImportError, match=r"base-kernels: .*\[liger\]"):
        use_liger(tiny_llama())


def test_liger_on_the_cpu_is_refused_naming_the_key() -> None:
    with pytest.raises(RunConfigError, match="base-kernels"):
        RunConfig.from_flower({"base-kernels": "liger", "device": "cpu"})
    assert RunConfig.from_flower({"base-kernels": "liger"}).train.base_kernels == "liger"


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's Triton kernels need CUDA")
def test_liger_kernels_give_the_torch_loss_and_gradients() -> None:
    pytest.importorskip("liger_kernel")
    ids = torch.randint(97, (2, 16), generator=torch.Generator().manual_seed(0)).cuda()
    fused = use_liger(tiny_llama().cuda().train())
    plain = tiny_llama().cuda().train()
    assert "forward" in vars(fused.model.norm) and "forward" in vars(fused.model.layers[0].mlp)
    assert "forward" not in vars(plain.model.norm)  # the second model built is plain again
    loss, grads = _loss_and_grads(plain, ids)
    loss_l, grads_l = _loss_and_grads(fused, ids)
    assert loss_l == pytest.approx(loss, rel=1e-5)
    assert len(grads) == len(grads_l)
    for g, gl in zip(grads, grads_l, strict=True):
        torch.testing.assert_close(gl, g, rtol=1e-4, atol=1e-5)
