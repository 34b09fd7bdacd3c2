"""Quantized frozen bases on a GPU (bitsandbytes 8bit / 4bit nf4): a tiny Llama saved here,
loaded through the product path (runtime.quantized.load_quantized, transformers'
BitsAndBytesConfig), adapted B-only, with merged links beside the base."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from seedlora import adapter_layers, inject, load_trainable_state, trainable_state
from seedlora.chain import Link, apply_link
from seedlora.sidepath import is_quantized

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bitsandbytes 8bit/4bit layers need a CUDA GPU"
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


def _load(path: str, quantization: str):
    pytest.importorskip("bitsandbytes")
    from runtime.quantized import load_quantized

    return load_quantized(
        path, "causal", quantization, torch.device("cuda"), torch.bfloat16, pad_token_id=0
    )


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_base_trains_only_b_and_averages_exactly(llama_dir, quantization):
    model = _load(llama_dir, quantization)
    inject(model, TARGETS, kind="circulant", seed=1, rank=4, alpha=8.0)
    layers = list(adapter_layers(model))
    assert len(layers) == 14
    assert all(is_quantized(layer.base) and layer.aside is not None for _, layer in layers)
    # one merged link beside the base: it changes the output by exactly the side path
    _, first = layers[0]
    gen = torch.Generator().manual_seed(0)
    factors = {layer.spec.layer: torch.randn(layer.lora_B.shape, generator=gen)
               for _, layer in layers}  # fmt: skip
    x = torch.randn(3, first.spec.n_in, device="cuda")
    with torch.no_grad():
        before = first(x)
        apply_link(model, Link(8.0, tuple(m.spec for _, m in layers), factors))
        after = first(x)
        assert len(first.aside) == 1
        side = first.aside(x)
    assert torch.allclose(after - before, side, atol=1e-5 * side.abs().max().item())

    ids = torch.randint(1, 128, (2, 16), device="cuda")
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n in trainable_state(model)} and all("lora_B" in n for n in grads)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in grads)

    # averaging B is averaging the update: mean_i y(B_i) == y(mean_i B_i), float32 input
    model.eval()
    states = [{k: torch.randn_like(v) for k, v in trainable_state(model).items()} for _ in "abc"]
    mean = {k: sum(s[k] for s in states) / 3 for k in states[0]}
    outs = []
    with torch.no_grad():
        for state in [*states, mean]:
            load_trainable_state(model, state)
            outs.append(first(x))
    averaged = sum(outs[:3]) / 3
    assert (averaged - outs[3]).abs().max() <= 1e-5 * outs[3].abs().max()


def test_quantized_weights_take_less_memory_than_bf16(llama_dir):
    dense = LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).cuda()
    sizes = {"bf16": _bytes(dense)}
    for q in ("8bit", "4bit"):
        sizes[q] = _bytes(_load(llama_dir, q))
    assert sizes["4bit"] < sizes["8bit"] < sizes["bf16"], sizes
