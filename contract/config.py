"""The one validated configuration of a run, built from Flower's flat run config.

Flower hands apps a flat `{"dash-key": value}` dict (pyproject `[tool.flwr.app.config]`
plus `--run-config` overrides). `RunConfig.from_flower` turns it into typed values once,
at the edge; a bad value fails here with an error that names the dash key, before any
client is contacted. Server and ClientApp parse the same run config with this model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from seedlora.compress import Codec
from seedlora.methods import B_ONLY, CHAINED, Method
from seedlora.spec import Kind
from tasks import TaskConfig

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
STRATEGIES: tuple[str, ...] = get_args(Strategy)


NODE_RANKS = "node"  # client-ranks value: each node's rank from its node config
NODE_MAX_RANK = "max-rank"  # node-config key: the most rank this node trains


class RunConfigError(ValueError):
    """A run-config value is invalid; the message names the run-config key."""


def _dash(name: str) -> str:
    return name.replace("_", "-")


def F(default: Any, description: str, **constraints: Any) -> Any:  # noqa: N802
    """A field with its README description (the run-config table is generated from it)."""
    return Field(default, description=description, **constraints)


class RunConfig(BaseModel):
    """Every run-config key (dash-case in pyproject, snake_case here), with its meaning."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Task and data (see tasks.TaskConfig).
    task: Literal["code-lm", "code-cls"] = F("code-lm", "task: causal LM or package classification")
    model_name: str = F("embedded", "`embedded` (shipped base), a hub model id or a local dir")
    dataset: str = F("", '"" = stdlib corpus; else a hub dataset id or a save_to_disk dir')
    text_column: str = F("text", "text column of a custom dataset")
    label_column: str = F("label", "label column of a custom classification dataset")
    partitioner: Literal["auto", "natural", "iid", "dirichlet"] = F(
        "auto", "flwr-datasets partitioner; auto = natural (code-lm) / dirichlet (code-cls)"
    )
    dirichlet_alpha: float = F(0.5, "Dirichlet concentration (smaller = more skewed)", gt=0)
    seq_len: int = F(128, "tokens per example", ge=8)
    num_classes: int = F(8, "code-cls: number of packages to classify", ge=2)
    max_train_blocks: int = F(0, "cap on training examples per client (0 = task default)", ge=0)
    max_eval_blocks: int = F(0, "cap on evaluation examples (0 = task default)", ge=0)

    # Adapter.
    method: Method = F("seedlora", "seedlora (chains) | ffa | fedit | full (baselines)")
    a_kind: Kind = F("circulant", "frozen A: gaussian | circulant | random-block")
    rank: int = F(8, "adapter rank r", gt=0)
    alpha: float = F(16.0, "adapter scale numerator: W = W0 + (alpha/r) B A", gt=0)
    adapter_dropout: float = F(0.0, "dropout on the adapter input", ge=0, lt=1)
    seed: int = F(0, "public seed of every A (and of data order)")
    target_modules: str = F("auto", 'adapted layers: "auto", names "a,b" or "re:<regex>"')
    modules_to_save: str = F("auto", 'fully trained heads: "auto", "none" or names "a,b"')

    # Chain.
    num_links: int = F(3, "chain links (merges)", gt=0)
    rounds_per_link: int = F(3, "federated rounds per link (K)", gt=0)

    # Strategy.
    strategy: Strategy = F("fedavg", "aggregation rule (see Strategies)")
    fraction_train: float = F(1.0, "fraction of nodes sampled for training", gt=0, le=1)
    fraction_evaluate: float = F(0.5, "fraction of nodes sampled for evaluation", ge=0, le=1)
    min_available_nodes: int = F(2, "wait for this many connected nodes", ge=1)
    min_replies: int = F(1, "fewer valid replies than this: the round is skipped", ge=1)
    round_timeout: float = F(600.0, "seconds to wait for replies in a round", gt=0)
    proximal_mu: float = F(0.0, "fedprox: proximal term weight (on B)", ge=0)
    server_lr: float = F(1.0, "fedavgm: server learning rate", gt=0)
    server_momentum: float = F(0.0, "fedavgm: server momentum", ge=0, lt=1)
    eta: float = F(1e-2, "fedadam/fedyogi/fedadagrad: server learning rate", gt=0)
    eta_l: float = F(
        1e-2, "fedadam/fedyogi/fedadagrad: client learning rate (Flower's eta_l)", gt=0
    )
    beta_1: float = F(0.9, "fedadam/fedyogi: first-moment decay", ge=0, lt=1)
    beta_2: float = F(0.99, "fedadam/fedyogi: second-moment decay", ge=0, lt=1)
    tau: float = F(1e-3, "fedadam/fedyogi/fedadagrad: adaptivity", gt=0)
    trim_beta: float = F(0.2, "fedtrimmedavg: fraction cut at each end", ge=0, lt=0.5)
    num_malicious: int = F(0, "krum/multikrum: assumed malicious nodes", ge=0)
    krum_select: int = F(2, "multikrum: replies averaged", ge=1)
    max_num_examples: int = F(10_000_000, "replies claiming more examples are rejected", gt=0)
    outlier_mad: float = F(0.0, "flag updates with norm > median + k*MAD (k; 0 = off)", ge=0)
    outlier_action: Literal["flag", "drop", "clip"] = F(
        "flag", "what to do with a flagged update: log it, drop it, or clip it to the bound"
    )

    # Local training on each client.
    local_steps: int = F(10, "optimizer steps per round (0 = use local-epochs)", ge=0)
    local_epochs: float = F(1.0, "epochs per round when local-steps = 0", gt=0)
    batch_size: int = F(8, "training batch size", gt=0)
    eval_batch_size: int = F(32, "evaluation batch size", gt=0)
    lr: float = F(2e-3, "client learning rate", gt=0)
    weight_decay: float = F(0.0, "client weight decay", ge=0)
    max_grad_norm: float = F(1.0, "gradient clipping norm (0 = off)", ge=0)
    optimizer: Literal["adamw", "adam", "sgd"] = F("adamw", "client optimizer")
    device: str = F("auto", "auto (GPU if visible) | cpu | cuda | cuda:N")
    precision: Literal["fp32", "bf16", "fp16"] = F(
        "fp32",
        "bf16/fp16: frozen base in that dtype + autocast; B stays float32 (fp16: loss scaling)",
    )

    # Outputs.
    output_dir: str = F("outputs", "where run directories go (relative to the cwd)")
    run_name: str = F("", '"" = a timestamp; with resume: the latest run')
    resume: bool = F(False, "continue run-name from its last checkpoint")
    central_eval: bool = F(True, "evaluate the global model on the server every round")
    export: bool = F(True, "write the PEFT adapter and merged model at the end")
    save_client_updates: bool = F(False, "keep every accepted client B per round (audits)")

    # Beyond exact averaging (README section of that name).
    client_ranks: str = F(
        "",
        '"" = all at rank; "node" = node-config max-rank; "8,4,2" = by partition id (cycled)',
    )
    upload_codec: Codec = F(
        "float32", "client update on the wire: float32 | float16 | bfloat16 | int8"
    )
    error_feedback: bool = F(True, "compressed uploads: carry each client's rounding residual")
    frozen_factor: Literal["A", "B"] = F(
        "A", "seeded and frozen factor: A (train B) | B (swapped roles: train A)"
    )
    dp_clip: float = F(
        0.0, "client-level DP: clip each client's update to this L2 norm (0 = off)", ge=0
    )
    dp_noise_multiplier: float = F(
        1.0, "client-level DP: noise std on the mean = this * dp-clip / n", ge=0
    )
    dp_delta: float = F(1e-5, "client-level DP: delta at which epsilon is reported", gt=0, lt=1)
    secure_aggregation: bool = F(False, "SecAgg+ (legacy-API workflow): the server sees only sums")
    secagg_num_shares: int = F(3, "SecAgg+: shares of each client's secrets", ge=2)
    secagg_threshold: int = F(2, "SecAgg+: shares needed to reconstruct", ge=1)
    secagg_clipping_range: float = F(1.0, "SecAgg+: values clipped to +-this, then 22-bit", gt=0)
    secagg_max_weight: float = F(1000.0, "SecAgg+: largest num-examples (scales the weights)", gt=0)

    @model_validator(mode="after")
    def _check_device(self) -> RunConfig:
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        return self

    @model_validator(mode="after")
    def _check_client_ranks(self) -> RunConfig:
        if self.client_ranks and self.method not in B_ONLY:
            raise ValueError(f"client-ranks: needs a B-only method, not {self.method!r}")
        if self.frozen_factor != "A" and self.method not in B_ONLY:
            raise ValueError(f"frozen-factor: needs a seeded method, not {self.method!r}")
        if self.dp_clip > 0 and self.strategy not in ("fedavg", "fedprox"):
            raise ValueError(f"dp-clip: DP needs strategy fedavg or fedprox, not {self.strategy!r}")
        if self.secure_aggregation:
            plain = self.strategy == "fedavg" and self.method in B_ONLY and not self.client_ranks
            if not plain or self.upload_codec != "float32" or self.dp_clip > 0:
                raise ValueError(
                    "secure-aggregation: needs strategy fedavg, a B-only method, float32 "
                    "uploads, no client-ranks and no dp-clip (SecAgg+ runs its own rounds)"
                )
        if self.client_ranks and self.frozen_factor != "A":
            raise ValueError("client-ranks: needs frozen-factor 'A' (nested A rows)")
        if not self.client_ranks or self.client_ranks == NODE_RANKS:
            return self
        try:
            ranks = [int(r) for r in self.client_ranks.split(",")]
        except ValueError:
            ranks = []
        if not ranks or any(not 1 <= r <= self.rank for r in ranks):
            raise ValueError(
                f'client-ranks: expected "", "node" or ranks in 1..rank={self.rank} '
                f"separated by commas, got {self.client_ranks!r}"
            )
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

    def client_rank(self, partition_id: int, node_max_rank: int | None = None) -> int:
        """The rank this client trains: `rank`, or less by client-ranks / node max-rank."""
        if not self.client_ranks:
            return self.rank
        rank = self.rank
        if self.client_ranks != NODE_RANKS:
            ranks = [int(r) for r in self.client_ranks.split(",")]
            rank = ranks[partition_id % len(ranks)]
        if node_max_rank is not None:
            rank = min(rank, node_max_rank)
        if rank < 1:
            raise RunConfigError(f"node config {NODE_MAX_RANK}: must be >= 1, got {rank}")
        return rank

    @property
    def num_rounds(self) -> int:
        return self.num_links * self.rounds_per_link

    @property
    def schedule(self) -> tuple[int, int]:
        """(links, rounds per link): baselines without chains run all rounds as one link."""
        if self.method in CHAINED:
            return self.num_links, self.rounds_per_link
        return 1, self.num_rounds


def markdown_table() -> str:
    """The README's run-config table: key, default, meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for name, field in RunConfig.model_fields.items():
        default = json.dumps(field.default)
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{_dash(name)}` | `{default}` | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
