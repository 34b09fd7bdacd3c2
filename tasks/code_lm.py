"""code-lm: causal language modelling of held-out stdlib packages, non-IID by package.

Rows are fixed-length token blocks (labels = input_ids). Blocks never cross packages, so a natural
split by package (or by a deterministic group of packages) gives each client its own code. A
custom dataset is split by rows first and each client's rows are then packed into blocks.
"""

from __future__ import annotations

import functools
import math
import warnings

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from tasks.base import Task, TaskConfig, dataset_cache
from tasks.blocks import encode, pack
from tasks.corpus import split_corpus
from tasks.models import EMBEDDED, embedded_seen_packages, load_causal_lm, load_tokenizer
from tasks.partitioning import GROUP, assign_groups, cap, client_rows
from tasks.sources import pools_of

COLUMNS = ["input_ids", "attention_mask", "labels"]


def blocks_dataset(blocks: np.ndarray, packages: list[str] | None = None) -> datasets.Dataset:
    """Torch-format LM examples from a (n, seq_len) array; `package` kept as a plain column."""
    ids = datasets.Sequence(datasets.Value("int64"))
    features = datasets.Features({c: ids for c in COLUMNS} | {"package": datasets.Value("string")})
    rows = {"input_ids": blocks, "attention_mask": np.ones_like(blocks), "labels": blocks}
    rows["package"] = packages if packages is not None else [""] * len(blocks)
    ds = datasets.Dataset.from_dict(rows, features=features)
    return ds.with_format("torch", columns=COLUMNS, output_all_columns=False)


@functools.lru_cache(maxsize=4)
def federated_token_ids(model_name: str) -> dict[str, list[int]]:
    """Token ids of every held-out file by path (one batched call, shared by both tasks)."""
    split = split_corpus()
    if model_name == EMBEDDED and (seen := embedded_seen_packages() & set(split.federated)):
        warnings.warn(  # another Python version has other stdlib packages, hence another split
            f"the embedded model was pretrained on held-out packages {sorted(seen)}; "
            "held-out metrics are optimistic (rebuild it with `python -m tasks.pretrain`)",
            stacklevel=2,
        )
    files = [f for p in split.federated for f in split.files(p)]
    ids = encode(load_tokenizer(model_name), [f.text for f in files])
    return {f.path: i for f, i in zip(files, ids, strict=True)}


def _stdlib_pools(config: TaskConfig) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """Block pools of the held-out packages' train and eval files, with package/group columns."""
    split = split_corpus()
    tok = load_tokenizer(config.model_name)
    pkgs = split.federated
    ids = federated_token_ids(config.model_name)
    blocks = {
        (p, w): pack([ids[f.path] for f in split.files(p, w)], config.seq_len, tok.eos_token_id)
        for w in ("train", "eval")
        for p in pkgs
    }
    live = {p: len(blocks[p, "train"]) for p in pkgs if len(blocks[p, "train"])}
    natural_by = "package" if len(live) == config.num_partitions else GROUP
    groups = dict.fromkeys(pkgs, -1)
    if config.split == "natural" and natural_by == GROUP:
        has_eval = {p for p in live if len(blocks[p, "eval"])}
        groups |= assign_groups(live, config.num_partitions, first=has_eval)
    pools = []
    for which in ("train", "eval"):
        parts = [np.zeros((0, config.seq_len), np.int64)] + [blocks[p, which] for p in pkgs]
        names = [p for p in pkgs for _ in range(len(blocks[p, which]))]
        rows = {"input_ids": np.concatenate(parts), "package": names}
        rows[GROUP] = [groups[p] for p in names]
        pools.append(datasets.Dataset.from_dict(rows))
    return pools[0], pools[1], natural_by


@dataset_cache
def lm_dataset(config: TaskConfig, partition_id: int | None, which: str) -> datasets.Dataset:
    """Capped client (or central, partition_id=None) dataset of `which` in {"train", "eval"}."""
    part, limit, rng_key = client_rows(
        config, pools_of(config, _stdlib_pools), "package", partition_id, which
    )
    if not config.dataset:
        part = cap(part, limit, rng_key)
        blocks = part.with_format("numpy")[:]["input_ids"].reshape(-1, config.seq_len)
        return blocks_dataset(blocks.astype(np.int64), list(part["package"]))
    tok = load_tokenizer(config.model_name)
    texts = [str(t) for t in part[config.text_column]]
    blocks = pack(encode(tok, texts), config.seq_len, tok.eos_token_id)
    return cap(blocks_dataset(blocks), limit, rng_key)


class CodeLMTask(Task):
    """Causal LM fine-tuning; metric: perplexity = exp(mean token loss)."""

    metric_keys = ("loss", "ppl")

    modules_to_save: tuple[str, ...] = ()

    def load_model(self, cache: bool = True) -> torch.nn.Module:
        return load_causal_lm(self.config.model_name, cache)[0]

    def train_dataset(self, partition_id: int) -> datasets.Dataset:
        return lm_dataset(self.config, partition_id, "train")

    def eval_dataset(self, partition_id: int | None) -> datasets.Dataset:
        return lm_dataset(self.config, partition_id, "eval")

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            labels=batch["labels"],
        )
        return out.loss

    def _eval_sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        mask = batch.get("attention_mask")
        logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
        labels = batch["labels"][:, 1:]
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=-100,
            reduction="sum",
        )
        return {"loss": loss, "tokens": (labels != -100).sum()}

    def _metrics(self, sums: dict[str, float], num_examples: int) -> dict[str, float]:
        loss = sums["loss"] / max(sums["tokens"], 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "num-examples": num_examples}
