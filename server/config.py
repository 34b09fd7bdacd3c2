"""The one validated configuration of a run, built from Flower's flat run config.

Flower hands apps a flat `{"dash-key": value}` dict (pyproject `[tool.flwr.app.config]`
plus `--run-config` overrides). `RunConfig.from_flower` turns it into typed values once,
at the edge; a bad value fails here with an error that names the dash key, before any
client is contacted. Server and ClientApp parse the same run config with this model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from seedlora.spec import Kind
from tasks import TaskConfig

STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
)
Strategy = Literal[
    "fedavg",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
    "multikrum",
]


class RunConfigError(ValueError):
    """A run-config value is invalid; the message names the run-config key."""


def _dash(name: str) -> str:
    return name.replace("_", "-")


class RunConfig(BaseModel):
    """Every run-config key (dash-case in pyproject, snake_case here), with its meaning."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Task and data (see tasks.TaskConfig).
    task: Literal["code-lm", "code-cls"] = "code-lm"
    model_name: str = "embedded"
    dataset: str = ""  # "" = the standard-library corpus
    text_column: str = "text"
    label_column: str = "label"
    partitioner: Literal["auto", "natural", "iid", "dirichlet"] = "auto"  # auto: task default
    dirichlet_alpha: float = Field(0.5, gt=0)
    seq_len: int = Field(128, ge=8)
    num_classes: int = Field(8, ge=2)
    max_train_blocks: int = Field(0, ge=0)  # 0 = task default
    max_eval_blocks: int = Field(0, ge=0)  # 0 = task default

    # Adapter.
    a_kind: Kind = "circulant"
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    adapter_dropout: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    target_modules: str = "auto"  # comma-separated names, "re:<regex>", or "auto"
    modules_to_save: str = "auto"  # comma-separated names, "none", or "auto"

    # Chain.
    num_links: int = Field(3, gt=0)
    rounds_per_link: int = Field(3, gt=0)

    # Strategy.
    strategy: Strategy = "fedavg"
    fraction_train: float = Field(1.0, gt=0, le=1)
    fraction_evaluate: float = Field(0.5, ge=0, le=1)
    min_available_nodes: int = Field(2, ge=1)
    min_replies: int = Field(1, ge=1)
    round_timeout: float = Field(600.0, gt=0)
    proximal_mu: float = Field(0.0, ge=0)
    server_lr: float = Field(1.0, gt=0)
    server_momentum: float = Field(0.0, ge=0, lt=1)
    eta: float = Field(1e-2, gt=0)
    eta_l: float = Field(1e-2, gt=0)
    beta_1: float = Field(0.9, ge=0, lt=1)
    beta_2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    trim_beta: float = Field(0.2, ge=0, lt=0.5)
    num_malicious: int = Field(0, ge=0)
    krum_select: int = Field(2, ge=1)
    max_num_examples: int = Field(10_000_000, gt=0)

    # Local training on each client.
    local_steps: int = Field(10, ge=0)  # 0 = use local-epochs
    local_epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(8, gt=0)
    eval_batch_size: int = Field(32, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)  # 0 = no clipping
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    # Outputs.
    output_dir: str = "outputs"
    run_name: str = ""  # "" = a timestamp; resume picks the latest run with a checkpoint
    resume: bool = False
    central_eval: bool = True
    export: bool = True
    save_client_updates: bool = False  # write accepted client B's per round (audits, tests)

    @model_validator(mode="after")
    def _check_device(self) -> RunConfig:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's dash-case run config; errors name the offending key."""
        fields = {_dash(n): n for n in cls.model_fields}
        unknown = sorted(k for k in run_config if k not in fields)
        if unknown:
            raise RunConfigError(f"unknown run-config key(s): {', '.join(unknown)}")
        try:
            return cls(**{fields[k]: v for k, v in run_config.items()})
        except ValidationError as err:
            lines = [
                f"run-config key '{_dash(str(e['loc'][0]))}': {e['msg']} (got {e['input']!r})"
                if e["loc"]
                else e["msg"].removeprefix("Value error, ")
                for e in err.errors()
            ]
            raise RunConfigError("; ".join(lines)) from None

    def to_flower(self) -> dict[str, Any]:
        """The dash-case run config (what pyproject's [tool.flwr.app.config] holds)."""
        return {_dash(k): v for k, v in self.model_dump().items()}

    def task_config(self, num_partitions: int = 1) -> TaskConfig:
        """The task/data part, for `tasks.build_task`."""
        return TaskConfig(
            task=self.task,
            model_name=self.model_name,
            dataset=self.dataset or None,
            text_column=self.text_column,
            label_column=self.label_column,
            dirichlet_alpha=self.dirichlet_alpha,
            num_partitions=num_partitions,
            seq_len=self.seq_len,
            num_classes=self.num_classes,
            seed=self.seed,
            **({"partitioner": self.partitioner} if self.partitioner != "auto" else {}),
            **({"max_train_blocks": self.max_train_blocks} if self.max_train_blocks else {}),
            **({"max_eval_blocks": self.max_eval_blocks} if self.max_eval_blocks else {}),
        )

    def targets(self, default: Sequence[str]) -> str | list[str]:
        """Adapter target patterns: the task's default, a regex ("re:..."), or a name list."""
        if self.target_modules == "auto":
            return list(default)
        if self.target_modules.startswith("re:"):
            return self.target_modules[3:]
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    def heads(self, default: Sequence[str]) -> list[str]:
        """Fully trained modules (PEFT's modules_to_save): the task's default or a list."""
        if self.modules_to_save == "auto":
            return list(default)
        if self.modules_to_save == "none":
            return []
        return [t.strip() for t in self.modules_to_save.split(",") if t.strip()]

    @property
    def num_rounds(self) -> int:
        return self.num_links * self.rounds_per_link
