"""Task configuration and the interface the Flower client and server call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol, runtime_checkable

import datasets
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.models import EMBEDDED, model_type_of, target_modules_for


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class TaskConfig(BaseModel):
    """What to train on and how it is split; frozen and hashable so datasets can be cached by it.

    Fields also accept the kebab-case spelling used in Flower run configs (`model-name`).
    TOML has no null, so `dataset=""` and caps of 0 mean None (the stdlib corpus / no cap).
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=_kebab,
        populate_by_name=True,
        loc_by_alias=False,  # errors name the python field
    )

    task: Literal["code-lm", "code-cls"] = "code-lm"
    model_name: str = EMBEDDED
    dataset: str | None = None  # None: stdlib corpus; else a hub dataset id or save_to_disk dir
    text_column: str = "text"
    label_column: str = "label"
    partitioner: Literal["natural", "iid", "dirichlet"] = "natural"  # code-cls: dirichlet
    dirichlet_alpha: float = Field(0.5, gt=0)
    num_partitions: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=8, le=4096)
    num_classes: int = Field(8, ge=2)
    max_train_blocks: int | None = Field(256, ge=1)  # per client, after partitioning
    max_eval_blocks: int | None = Field(128, ge=1)  # per client and for the central set
    seed: int = Field(0, ge=0)  # partitioning, caps, new heads; not the corpus split

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        is_cls = isinstance(data, Mapping) and data.get("task") == "code-cls"
        if is_cls and "partitioner" not in data:
            data = {**data, "partitioner": "dirichlet"}
        return data

    @field_validator("dataset", mode="before")
    @classmethod
    def _empty_dataset(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("max_train_blocks", "max_eval_blocks", mode="before")
    @classmethod
    def _zero_cap(cls, v: Any) -> Any:
        return None if v == 0 else v

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TaskConfig:
        """Build from a larger config (e.g. a Flower run_config); other keys are ignored."""
        names = set(cls.model_fields) | {_kebab(n) for n in cls.model_fields}
        return cls.model_validate({k: v for k, v in values.items() if k in names})


@runtime_checkable
class Task(Protocol):
    """What a federated client/server needs from a task."""

    config: TaskConfig
    target_modules: tuple[str, ...]  # adapter target module-name patterns for the model
    modules_to_save: tuple[str, ...]  # modules trained in full (new heads)

    def load_model(self) -> torch.nn.Module:
        """Fresh pretrained base model, CPU float32."""
        ...

    def train_dataset(self, partition_id: int) -> datasets.Dataset:
        """This client's training examples in torch format."""
        ...

    def eval_dataset(self, partition_id: int | None) -> datasets.Dataset:
        """This client's evaluation examples; None = the central held-out set (server)."""
        ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss of a batch already on the model's device."""
        ...

    def evaluate(
        self,
        model: torch.nn.Module,
        dataset: datasets.Dataset,
        batch_size: int,
        device: torch.device,
    ) -> dict[str, float]:
        """Metrics over a dataset: "loss", "ppl" or "accuracy", and "num-examples"."""
        ...


class BaseTask:
    """Shared plumbing of the concrete tasks."""

    modules_to_save: tuple[str, ...] = ()

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        self.target_modules = target_modules_for(model_type_of(config.model_name))

    def _loader(self, dataset: datasets.Dataset, batch_size: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def empty_metrics(keys: tuple[str, ...]) -> dict[str, float]:
    """Metrics of an empty evaluation set: zeros with weight 0 (aggregate by num-examples)."""
    return {**dict.fromkeys(keys, 0.0), "num-examples": 0}
