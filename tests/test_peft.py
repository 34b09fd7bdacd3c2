"""Cross-check against PEFT, and export to PEFT / merged HF formats."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from seedlora import (
    KINDS,
    adapter_layers,
    export_merged,
    export_peft,
    inject,
    record_link,
    relative_error,
    trainable_state,
)
from tests.test_exactness_and_chains import run_chain

IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def randomize_b(model, seed: int = 3) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_same_output_and_merge_as_peft(arch, kind):
    factory, targets, _ = arch
    ours = factory().double()  # float64, so the check sees the math, not float32 rounding
    inject(ours, targets, kind=kind, seed=1, chain_index=2, rank=4, alpha=7)
    randomize_b(ours)
    assert relative_error(ours(IDS).logits, factory().double()(IDS).logits) > 1e-3
    conv = "c_attn" in targets
    peft = get_peft_model(
        factory().double(),
        LoraConfig(r=4, lora_alpha=7, target_modules=list(targets), fan_in_fan_out=conv),
    )
    with torch.no_grad():
        for name, layer in adapter_layers(ours):
            module = peft.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(layer.spec.dense() * layer.spec.gain)
            module.lora_B["default"].weight.copy_(layer.lora_B)
    err = relative_error(ours(IDS).logits, peft(IDS).logits)
    print(f"{kind}: forward vs PEFT {err:.2e}")
    assert err <= 1e-6
    merged = peft.merge_and_unload()
    for name, layer in adapter_layers(ours):
        layer.merge()
        assert relative_error(layer.base.weight, merged.get_submodule(name).weight) <= 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_export_peft_and_merged_give_same_logits(arch, kind, tmp_path):
    factory, targets, head = arch
    server, links = run_chain(factory, targets, kind, links=2)
    randomize_b(server, seed=9)  # the current, unmerged link
    params = dict(server.named_parameters())
    params[f"{head}.weight"].requires_grad_(True)
    with torch.no_grad():
        params[f"{head}.weight"].mul_(1.5)
    heads = {k: v for k, v in trainable_state(server).items() if k.startswith(head)}
    expected = server(IDS).logits

    pristine = factory()
    before = copy.deepcopy(pristine.state_dict())
    export_peft(pristine, [*links, record_link(server)], tmp_path / "peft", heads=heads)
    assert all(torch.equal(before[k], v) for k, v in pristine.state_dict().items())
    loaded = PeftModel.from_pretrained(factory(), tmp_path / "peft").eval()
    assert loaded.peft_config["default"].r == 4 * 3
    err = relative_error(loaded(IDS).logits, expected)
    print(f"{kind}: PEFT export logits {err:.2e}")
    assert err <= 1e-5

    export_merged(server, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert relative_error(plain(IDS).logits, expected) <= 1e-5
    assert not any("lora" in k for k in plain.state_dict())


def test_export_rejects_empty_chain(arch, tmp_path):
    factory, targets, _ = arch
    model = factory()
    inject(model, targets, kind="gaussian", seed=0, rank=4, alpha=8)
    with pytest.raises(ValueError, match="nothing to export"):
        export_peft(factory(), [record_link(model)], tmp_path / "x")
    assert not (tmp_path / "x").exists()
