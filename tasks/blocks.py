"""Tokenisation and packing of texts into fixed-length token blocks (pretraining and tasks)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from transformers import PreTrainedTokenizerBase


def encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens, batched through the Rust tokenizer."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    out = tokenizer(list(texts), add_special_tokens=False, verbose=False)
    return [list(ids) for ids in out["input_ids"]]


def pack(token_lists: Sequence[Sequence[int]], seq_len: int, eos_id: int) -> np.ndarray:
    """Concatenate texts (each followed by eos) and cut into `seq_len` blocks; drop the tail."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = np.array([eos_id], dtype=np.int64)
    parts = [a for ids in token_lists for a in (np.asarray(ids, dtype=np.int64), eos)]
    flat = np.concatenate(parts) if parts else eos[:0]
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)
