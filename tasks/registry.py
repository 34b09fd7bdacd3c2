"""Task name -> implementation, and the cached factory the client and server call."""

from __future__ import annotations

import functools

from tasks.base import Task, TaskConfig
from tasks.code_cls import CodeClsTask
from tasks.code_lm import CodeLMTask
from tasks.sft import SFTTask

TASKS: dict[str, type[Task]] = {"code-lm": CodeLMTask, "code-cls": CodeClsTask, "sft": SFTTask}


@functools.lru_cache(maxsize=8)
def build_task(config: TaskConfig) -> Task:
    """The task for `config`; cached so every round of a simulated client reuses its datasets."""
    return TASKS[config.task](config)
