"""sft: instruction fine-tuning of a causal LM, the loss on response tokens only.

Rows (prompt/response columns or a chat column, tasks/chat.py) come from the shipped
instruction set (`dataset = ""`: tasks/assets/sft-stdlib.jsonl, tasks/sft_data.py) or any
dataset tasks/sources.py loads, and are split across clients by the flwr-datasets
partitioners like every custom dataset (auto: natural by `label-column` when the data has
it, else IID).

Each example is one conversation, cut to `seq-len` tokens from the right and padded to
`seq-len` (fixed length, no packing): labels are -100 on the prompt and on padding, so the
mean loss is over response tokens,

    loss = - sum_{t in response} log p(x_t | x_<t) / |response tokens|,

and perplexity is exp(loss) on the held-out rows. Fixed length rather than dynamic padding
keeps one tensor shape for every batch, so the clients' loop, the central evaluation and
GPU memory per step need nothing task-specific; choose `seq-len` near the data's long
rows (the shipped set: 87% of rows fit 128 tokens). Packing several conversations into a
block would waste no padding but lets attention cross examples. A row whose prompt
fills `seq-len` keeps no response token and is dropped.

At the end of a run the server writes a few greedy completions of held-out prompts
(`samples`, beside metrics.json as samples.jsonl).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch

from tasks.base import TaskConfig, dataset_cache
from tasks.chat import ASSISTANT, conversation, encode_masked, has_template, prompt_text
from tasks.code_lm import COLUMNS, CodeLMTask
from tasks.models import load_tokenizer
from tasks.partitioning import cap, client_rows
from tasks.sft_data import with_source
from tasks.sources import custom_pools, load_rows

if TYPE_CHECKING:
    from collections.abc import Sequence

SAMPLE_COUNT = 4  # held-out prompts completed at the end of a run
SAMPLE_TOKENS = 48  # greedy tokens generated per prompt


def examples_dataset(
    ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], seq_len: int, pad_id: int
) -> datasets.Dataset:
    """Torch-format examples padded to `seq_len` on the right; rows without a trained
    label are dropped."""
    keep = [i for i, lab in enumerate(labels) if any(v != -100 for v in lab[1:])]
    n = len(keep)
    input_ids = np.full((n, seq_len), pad_id, np.int64)
    mask = np.zeros((n, seq_len), np.int64)
    targets = np.full((n, seq_len), -100, np.int64)
    for row, i in enumerate(keep):
        length = len(ids[i])
        input_ids[row, :length] = ids[i]
        mask[row, :length] = 1
        targets[row, :length] = labels[i]
    seq = datasets.Sequence(datasets.Value("int64"))
    features = datasets.Features(dict.fromkeys(COLUMNS, seq))
    rows = {"input_ids": input_ids, "attention_mask": mask, "labels": targets}
    return datasets.Dataset.from_dict(rows, features=features).with_format("torch")


@dataset_cache
def sft_dataset(config: TaskConfig, partition_id: int | None, which: str) -> datasets.Dataset:
    """Capped client (or central, partition_id=None) examples of `which` ("train", "eval");
    `config.dataset` already names the data (SFTTask resolves "")."""
    part, limit, rng_key = client_rows(
        config, custom_pools, config.label_column, partition_id, which
    )
    part = cap(part, limit, rng_key)
    tok = load_tokenizer(config.model_name)
    talks = [conversation(row, config) for row in part]
    ids, labels = encode_masked(tok, talks, config.seq_len)
    return examples_dataset(ids, labels, config.seq_len, tok.pad_token_id)


class SFTTask(CodeLMTask):
    """Causal LM fine-tuning on responses; metrics: response loss and perplexity. The
    loss and evaluation sums are code-lm's: both skip labels of -100."""

    sample_count = SAMPLE_COUNT

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(with_source(config))

    def train_dataset(self, partition_id: int) -> datasets.Dataset:
        return sft_dataset(self.config, partition_id, "train")

    def eval_dataset(self, partition_id: int | None) -> datasets.Dataset:
        return sft_dataset(self.config, partition_id, "eval")

    def _prompt_room(self, model: torch.nn.Module) -> int:
        """Prompt tokens kept (the last ones) so that prompt + generated tokens fit both
        `seq-len` and the model's positions."""
        config = model.config
        positions = getattr(config, "n_positions", None) or config.max_position_embeddings
        return max(1, min(self.config.seq_len, positions) - SAMPLE_TOKENS)

    def samples(self, model: torch.nn.Module, device: torch.device) -> list[dict[str, str]]:
        """Greedy completions of the first held-out prompts: prompt, reference, generated."""
        from transformers import GenerationConfig

        tok = load_tokenizer(self.config.model_name)
        generation = GenerationConfig(
            max_new_tokens=SAMPLE_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        _, evals = load_rows(self.config.dataset)
        out = []
        for row in evals.select(range(min(self.sample_count, len(evals)))):
            talk = conversation(row, self.config)
            if not any(m["role"] == ASSISTANT for m in talk):
                continue
            prompt = prompt_text(tok, talk)
            ids = tok(prompt, add_special_tokens=not has_template(tok))["input_ids"]
            ids = ids[-self._prompt_room(model) :]
            x = torch.tensor([ids], device=device)
            with torch.no_grad():
                y = model.generate(
                    x, attention_mask=torch.ones_like(x), generation_config=generation
                )
            reference = [m for m in talk if m["role"] == ASSISTANT][-1]["content"]
            text = tok.decode(y[0, len(ids) :], skip_special_tokens=True)
            out.append({"prompt": prompt, "reference": reference, "generated": text})
        return out
