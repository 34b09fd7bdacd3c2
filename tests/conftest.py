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


def save_tiny_lm(directory, seed: int = 0):
    """A tiny GPT-2 with a small byte-level BPE tokenizer, saved like a hub model."""
    from pathlib import Path

    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    text = [Path(__file__).read_text(), Path(torch.__file__).read_text()] * 4
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    torch.manual_seed(seed)
    eos = tok.eos_token_id
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(cfg).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny-lm")))


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    """A small `datasets` text dataset saved with save_to_disk (the local-dataset path)."""
    import inspect
    import json as json_module

    import datasets

    texts = []
    for module in (json_module, inspect, os, pytest):
        source = inspect.getsource(module)
        texts += [source[i : i + 1500] for i in range(0, min(len(source), 30_000), 1500)]
    directory = tmp_path_factory.mktemp("tiny-text")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(directory))
    return str(directory)


@pytest.fixture(scope="session", autouse=True)
def private_link_cache(tmp_path_factory):
    """Keep the clients' link cache out of the user's home during tests."""
    os.environ["SEEDLORA_CACHE"] = str(tmp_path_factory.mktemp("link-cache"))
