"""Small models and text datasets made on the spot, for tests, benchmarks and smoke runs.

Nothing is downloaded: the models are randomly initialised from configs written here (a
GPT-2 with Conv1D layers, a Llama with nn.Linear layers, a Qwen2 of any shape with the
embedded model's tokenizer) and the text is the running interpreter's own stdlib source.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

GPT2_TARGETS = ("c_attn", "c_proj", "c_fc")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# stdlib modules whose source makes the text datasets.
SOURCE_MODULES = (
    "json", "inspect", "os", "argparse", "typing", "collections", "dataclasses", "pathlib",
    "logging", "subprocess", "threading", "tarfile", "zipfile", "difflib", "pydoc", "doctest",
    "ast", "email.message", "http.client", "urllib.request", "unittest.case", "shutil",
    "tempfile", "textwrap", "string", "functools", "enum", "socket", "ssl", "smtplib",
)  # fmt: skip


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


def save_tiny_lm(directory: str | Path, seed: int = 0) -> str | Path:
    """A tiny GPT-2 with a small byte-level BPE tokenizer, saved like a hub model."""
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


def save_random_lm(
    directory: Path, shape: Mapping[str, Any], max_positions: int = 512, dtype: str = "bfloat16"
) -> dict[str, Any]:
    """A randomly initialised Qwen2 of `shape` (Qwen2Config fields) with the embedded model's
    tokenizer, saved in `dtype` (kept if already there); its vocabulary and parameter count."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tasks.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("embedded"))
    cfg = Qwen2Config(
        vocab_size=len(tok),
        max_position_embeddings=max_positions,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        **shape,
    )
    if not (directory / "config.json").exists():
        torch.manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(getattr(torch, dtype))  # no float32 copy: 27 GB at 7B
        try:
            Qwen2ForCausalLM(cfg).save_pretrained(directory)
        finally:
            torch.set_default_dtype(default)
        tok.save_pretrained(directory)
    with torch.device("meta"):
        params = sum(p.numel() for p in Qwen2ForCausalLM(cfg).parameters())
    return {"vocab_size": len(tok), "params": params}


def save_text_dataset(
    directory: Path,
    min_rows: int = 0,
    min_chars: int = 0,
    chunk: int = 500,
    modules: Sequence[str] = SOURCE_MODULES,
) -> Path:
    """A save_to_disk text dataset of stdlib source cut into `chunk`-character rows: at least
    `min_rows` rows and `min_chars` characters (kept if already there)."""
    import datasets

    if (directory / "dataset_info.json").exists():
        return directory
    sources = [inspect.getsource(importlib.import_module(m)) for m in modules]
    texts: list[str] = []
    offset = 0
    while len(texts) < min_rows or len(texts) * chunk < min_chars:
        before = len(texts)  # shift the cut points if more rows are needed
        for source in sources:
            texts += [source[i : i + chunk] for i in range(offset, len(source) - chunk, chunk)]
        offset += chunk // 3 + 1
        if len(texts) == before:
            raise ValueError(f"{modules}: too little source for {min_rows} rows of {chunk}")
    rows = max(min_rows, -(-min_chars // chunk), 2)
    datasets.Dataset.from_dict({"text": texts[:rows]}).save_to_disk(str(directory))
    return directory
