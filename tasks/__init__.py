"""Data, the embedded pretrained base model, and the tasks the federated client/server run."""

from tasks.base import Task, TaskConfig
from tasks.corpus import CorpusSplit, corpus_info, load_corpus, split_corpus
from tasks.models import (
    EMBEDDED,
    load_causal_lm,
    load_seq_cls,
    load_tokenizer,
    portable_name,
    resolve_model_path,
    target_modules_for,
)
from tasks.registry import TASKS, build_task

__all__ = [
    "EMBEDDED",
    "TASKS",
    "CorpusSplit",
    "Task",
    "TaskConfig",
    "build_task",
    "corpus_info",
    "load_causal_lm",
    "load_corpus",
    "load_seq_cls",
    "load_tokenizer",
    "portable_name",
    "resolve_model_path",
    "split_corpus",
    "target_modules_for",
]
