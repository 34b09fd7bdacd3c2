"""Tiny in-process models: a GPT-2 (Conv1D layers) and a Llama (nn.Linear layers)."""

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(cfg).eval()


# (factory, adapter targets, an untied head module to train fully)
MODELS = {
    "gpt2": (tiny_gpt2, GPT2_TARGETS, "transformer.ln_f"),
    "llama": (tiny_llama, LLAMA_TARGETS, "model.norm"),
}


@pytest.fixture(params=sorted(MODELS))
def arch(request):
    """(factory, targets, head) for each tiny architecture."""
    return MODELS[request.param]
