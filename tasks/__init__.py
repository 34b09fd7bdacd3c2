"""Data, the embedded pretrained base model, and the tasks the federated client/server run.

Names load on first use (PEP 562): `from tasks import TaskConfig` (what a run-config check
needs) loads neither torch nor datasets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from seedlora.lazy import lazy_exports

# name -> the submodule that defines it
_EXPORTS = {
    "Task": "base",
    "TaskConfig": "base",
    "CorpusSplit": "corpus",
    "corpus_info": "corpus",
    "load_corpus": "corpus",
    "split_corpus": "corpus",
    "EMBEDDED": "models",
    "load_causal_lm": "models",
    "load_seq_cls": "models",
    "load_tokenizer": "models",
    "portable_name": "models",
    "resolve_model_path": "models",
    "target_modules_for": "models",
    "TASKS": "registry",
    "build_task": "registry",
}

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


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)


if TYPE_CHECKING:
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
