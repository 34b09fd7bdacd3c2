"""code-cls: which held-out package does a code snippet come from (label-skewed clients).

The K largest held-out packages that have evaluation files are the classes, so every class is
scored on files no client trained on. Snippets are seq_len-token chunks; the classification head
is new and trained in full (modules_to_save).
"""

from __future__ import annotations

import functools
from collections import Counter

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from tasks.base import Task, TaskConfig, dataset_cache
from tasks.blocks import pack
from tasks.code_lm import federated_token_ids
from tasks.corpus import split_corpus
from tasks.models import load_seq_cls, load_tokenizer
from tasks.partitioning import (
    GROUP,
    assign_groups,
    cap,
    client_rows,
    stratified_cap,
)
from tasks.sources import label_ids, label_names, load_rows, pools_of, require_column

COLUMNS = ["input_ids", "attention_mask", "labels"]
_HEAD_NAMES = ("score", "classifier", "classification_head")


def class_packages(config: TaskConfig) -> tuple[str, ...]:
    """The K largest held-out packages with evaluation files, sorted by name (= label id)."""
    split = split_corpus()
    sizes = {
        p: sum(len(f.text) for f in split.files(p, "train"))
        for p in split.federated
        if split.files(p, "eval")
    }
    if config.num_classes > len(sizes):
        raise ValueError(
            f"run-config key 'num-classes': {config.num_classes}, but only {len(sizes)} "
            "held-out packages have evaluation files"
        )
    largest = sorted(sizes, key=lambda p: (-sizes[p], p))[: config.num_classes]
    return tuple(sorted(largest))


def snippets_dataset(
    ids: np.ndarray, mask: np.ndarray, labels: list[int], packages: list[str] | None = None
) -> datasets.Dataset:
    """Torch-format classification examples; `package` kept as a plain column."""
    seq = datasets.Sequence(datasets.Value("int64"))
    features = datasets.Features(
        {
            "input_ids": seq,
            "attention_mask": seq,
            "labels": datasets.Value("int64"),
            "package": datasets.Value("string"),
        }
    )
    rows = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    rows["package"] = packages if packages is not None else [""] * len(labels)
    ds = datasets.Dataset.from_dict(rows, features=features)
    return ds.with_format("torch", columns=COLUMNS, output_all_columns=False)


def _stdlib_pools(config: TaskConfig) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    split = split_corpus()
    tok = load_tokenizer(config.model_name)
    classes = class_packages(config)
    ids = federated_token_ids(config.model_name)
    pools = []
    for which in ("train", "eval"):
        parts: list[np.ndarray] = [np.zeros((0, config.seq_len), np.int64)]
        labels: list[int] = []
        for label, pkg in enumerate(classes):
            texts = [ids[f.path] for f in split.files(pkg, which)]
            parts.append(pack(texts, config.seq_len, tok.eos_token_id))
            labels += [label] * len(parts[-1])
        pools.append({"input_ids": np.concatenate(parts), "label": labels})
    natural_by = "label"
    if config.split == "natural" and config.num_classes != config.num_partitions:
        groups = assign_groups(Counter(pools[0]["label"]), config.num_partitions)
        for pool in pools:
            pool[GROUP] = [groups[lab] for lab in pool["label"]]
        natural_by = GROUP
    train, evals = (datasets.Dataset.from_dict(p) for p in pools)
    return train, evals, natural_by


@functools.lru_cache(maxsize=8)
def class_names(config: TaskConfig) -> tuple[str, ...]:
    """Names of the classes, in label-id order."""
    if not config.dataset:
        return class_packages(config)
    train, evals = load_rows(config.dataset)
    require_column(train, config.label_column, "label-column", " (code-cls predicts it)")
    return tuple(label_names(train, evals, config.label_column))


@dataset_cache
def cls_dataset(config: TaskConfig, partition_id: int | None, which: str) -> datasets.Dataset:
    """Capped client (or central, partition_id=None) dataset of `which` in {"train", "eval"}."""
    part, limit, rng_key = client_rows(
        config, pools_of(config, _stdlib_pools), "label", partition_id, which
    )
    if which == "train":
        part = cap(part, limit, rng_key)
    else:  # evaluation keeps every class represented
        label_column = "label" if not config.dataset else config.label_column
        part = stratified_cap(part, limit, label_column, rng_key)
    if not config.dataset:
        ids = part.with_format("numpy")[:]["input_ids"].reshape(-1, config.seq_len).astype(np.int64)
        names = class_names(config)
        labels = [int(v) for v in part["label"]]
        return snippets_dataset(ids, np.ones_like(ids), labels, [names[v] for v in labels])
    tok = load_tokenizer(config.model_name)
    enc = tok(
        [str(t) for t in part[config.text_column]],
        truncation=True,
        max_length=config.seq_len,
        padding="max_length",
        add_special_tokens=False,
    )
    ids = np.asarray(enc["input_ids"], dtype=np.int64).reshape(-1, config.seq_len)
    mask = np.asarray(enc["attention_mask"], dtype=np.int64).reshape(-1, config.seq_len)
    labels = label_ids(part, config.label_column, list(class_names(config)))
    return snippets_dataset(ids, mask, labels)


class CodeClsTask(Task):
    """Sequence classification with a new, fully trained head; metric: accuracy."""

    metric_keys = ("loss", "accuracy")
    model_kind = "seq-cls"

    def __init__(self, config: TaskConfig) -> None:
        super().__init__(config)
        self.num_labels = len(class_names(config))
        model = self.load_model()
        heads = tuple(
            n for n in _HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)
        )
        if not heads:
            raise ValueError(
                f"no classification head among {_HEAD_NAMES} in {type(model).__name__}"
            )
        self.modules_to_save = heads[:1]

    def load_model(self, cache: bool = True) -> torch.nn.Module:
        name, labels, seed = self.config.model_name, self.num_labels, self.config.seed
        return load_seq_cls(name, labels, seed, cache)[0]

    def train_dataset(self, partition_id: int) -> datasets.Dataset:
        return cls_dataset(self.config, partition_id, "train")

    def eval_dataset(self, partition_id: int | None) -> datasets.Dataset:
        return cls_dataset(self.config, partition_id, "eval")

    def _logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch.get("attention_mask")
        return model(input_ids=batch["input_ids"], attention_mask=mask).logits.float()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch), batch["labels"])

    def _eval_sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        logits = self._logits(model, batch)
        return {
            "loss": F.cross_entropy(logits, batch["labels"], reduction="sum"),
            "correct": (logits.argmax(-1) == batch["labels"]).sum(),
        }

    def _metrics(self, sums: dict[str, float], num_examples: int) -> dict[str, float]:
        n = num_examples
        return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n, "num-examples": n}
