"""The one validated configuration of a run, in sections, built from Flower's flat run config.

Flower hands apps a flat `{"dash-key": value}` dict (pyproject `[tool.flwr.app.config]`
plus `--run-config` overrides). `RunConfig.from_flower` turns it into typed values once,
at the edge; a bad value fails here with an error that names the dash key, before any
client is contacted. The keys stay flat for users (`rank=4`); inside, each layer takes
only its section:

    task      tasks.TaskConfig    model, data, split        (tasks/)
    adapter   AdapterConfig       method, A kind, r, alpha   (seedlora/ via the apps)
    chain     ChainConfig         links x rounds per link    (server/)
    strategy  StrategyConfig      aggregation rule, checks   (strategies/)
    train     TrainConfig         each client's local work   (client/)
    upload    UploadConfig        what goes on the wire      (client/, strategies/)
    privacy   PrivacyConfig       client-level DP            (strategies/)
    secagg    SecAggConfig        SecAgg+                    (server/, client/)
    output    OutputConfig        run folder, eval, exports  (server/)

The section models are the one source of truth: validation comes from their fields, and
`python -m contract.tables --write` writes pyproject's defaults and `python docs/generate.py`
the README table from them (tests keep them in sync). A new key is one field in one
section, then those two commands.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from seedlora.names import (
    B_ONLY,
    CHAINED,
    Codec,
    KindSetting,
    Method,
    method_kind,
    valid_device_name,
)
from tasks.base import TaskConfig

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


def F(default: Any, description: str, *, key: str | None = None, **constraints: Any) -> Any:  # noqa: N802
    """A run-config field: its README description and, when it differs from the field name
    in dash case, its key."""
    extra = {"key": key} if key else None
    return Field(default, description=description, json_schema_extra=extra, **constraints)


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AdapterConfig(Section):
    method: Method = F("seedlora", "seedlora | seedcore (chains) | ffa | fedit | full (baselines)")
    a_kind: KindSetting = F(
        "auto",
        "frozen factors: auto (seedlora: circulant; seedcore, ffa: gaussian) | gaussian | "
        "circulant | random-block (ffa: always gaussian)",
    )
    rank: int = F(8, "adapter rank r", gt=0)
    alpha: float = F(
        16.0, "adapter scale numerator: W = W0 + (alpha/r) B A (gaussian: x sqrt(r/n))", gt=0
    )
    adapter_dropout: float = F(0.0, "dropout on the adapter input", ge=0, lt=1)
    seed: int = F(
        0, "public seed of every A (and of data order, partitioning, node sampling)", ge=0
    )
    target_modules: str = F("auto", 'adapted layers: "auto", names "a,b" or "re:<regex>"')
    modules_to_save: str = F("auto", 'fully trained heads: "auto", "none" or names "a,b"')
    frozen_factor: Literal["A", "B"] = F(
        "A", "seeded and frozen factor: A (train B) | B (swapped roles: train A)"
    )

    @property
    def kind(self) -> str:
        """The frozen factor's kind the method uses: a-kind, the method's own for "auto",
        gaussian for ffa (FFA-LoRA's one fixed gaussian A; seedlora.names.method_kind)."""
        return method_kind(self.method, None if self.method == "ffa" else self.a_kind)

    def targets(self, default: Sequence[str]) -> str | list[str]:
        """Adapter target patterns: the task's default, a regex ("re:..."), or a name list."""
        if self.target_modules == "auto":
            return list(default)
        if self.target_modules.startswith("re:"):
            return self.target_modules[3:]
        return _names(self.target_modules)

    def heads(self, default: Sequence[str]) -> list[str]:
        """Fully trained modules (PEFT's modules_to_save): the task's default or a list."""
        if self.modules_to_save == "auto":
            return list(default)
        return [] if self.modules_to_save == "none" else _names(self.modules_to_save)


class ChainConfig(Section):
    num_links: int = F(3, "chain links (merges)", gt=0)
    rounds_per_link: int = F(3, "federated rounds per link (K)", gt=0)
    comm_budget_mb: float = F(
        0.0,
        "stop after the round whose cumulative MB up + down reaches this (0 = off); "
        "the open link is merged",
        ge=0,
    )


class StrategyConfig(Section):
    name: Strategy = F("fedavg", "aggregation rule (docs/running.md, Strategies)", key="strategy")
    fraction_train: float = F(1.0, "fraction of nodes sampled for training", gt=0, le=1)
    fraction_evaluate: float = F(0.5, "fraction of nodes sampled for evaluation", ge=0, le=1)
    client_eval: Literal["with-train", "separate"] = F(
        "with-train",
        "with-train: each train message also evaluates the model it brings (one message a "
        "round; metrics of the previous round's model; the last round evaluates apart) | "
        "separate: an evaluate message after each round's aggregate",
    )
    min_available_nodes: int = F(2, "wait for this many connected nodes", ge=1)
    min_replies: int = F(1, "fewer valid replies than this: the round is skipped", ge=1)
    round_timeout: float = F(600.0, "seconds to wait for replies in a round", gt=0)
    proximal_mu: float = F(0.0, "fedprox: proximal term weight (on B)", ge=0)
    server_lr: float = F(1.0, "fedavgm: server learning rate", gt=0)
    server_momentum: float = F(0.0, "fedavgm: server momentum", ge=0, lt=1)
    eta: float = F(1e-2, "fedadam/fedyogi/fedadagrad: server learning rate", gt=0)
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


class TrainConfig(Section):
    local_steps: int = F(10, "optimizer steps per round (0 = use local-epochs)", ge=0)
    local_epochs: float = F(1.0, "epochs per round when local-steps = 0", gt=0)
    batch_size: int = F(8, "training batch size", gt=0)
    eval_batch_size: int = F(32, "evaluation batch size", gt=0)
    lr: float = F(1e-2, "client learning rate (the peak, with a schedule)", gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = F(
        "constant", "client lr over the run's global rounds, set by the server each round"
    )
    lr_min: float = F(0.0, "cosine/linear: the lr of the last round", ge=0)
    warmup_rounds: int = F(0, "rounds of linear warmup to lr before the schedule", ge=0)
    grad_accum_steps: int = F(
        1, "micro-batches averaged per optimizer step (effective batch: batch-size x this)", ge=1
    )
    weight_decay: float = F(0.0, "client weight decay", ge=0)
    max_grad_norm: float = F(1.0, "gradient clipping norm (0 = off)", ge=0)
    optimizer: Literal["adamw", "adam", "sgd"] = F("adamw", "client optimizer")
    device: str = F("auto", "auto (GPU if visible) | cpu | cuda | cuda:N")
    precision: Literal["fp32", "bf16", "fp16"] = F(
        "fp32",
        "bf16/fp16: frozen base in that dtype + autocast; B stays float32 (fp16: loss scaling)",
    )
    gradient_checkpointing: bool = F(
        False, "recompute activations in backward (Hugging Face, non-reentrant): less memory"
    )
    quantization: Literal["none", "8bit", "4bit"] = F(
        "none",
        "clients' frozen base: none | 8bit | 4bit (bitsandbytes, CUDA, nf4; links as side path)",
    )
    step_mode: Literal["eager", "grouped", "graphed"] = F(
        "grouped",
        "eager (a node per adapter) | grouped (q/k/v, gate/up share one A x and one node) | "
        "graphed (grouped, and on CUDA each round's steps replay one captured CUDA graph when "
        "batches keep one shape, grad-accum-steps = 1, no FedProx, not fp16, adam/adamw)",
    )
    base_kernels: Literal["torch", "liger"] = F(
        "torch",
        "frozen base's RMSNorm and SwiGLU MLP: torch | liger (liger-kernel's Triton kernels; "
        "CUDA, the [liger] extra, Llama/Qwen/Mistral-style models)",
    )

    @model_validator(mode="after")
    def _check_device(self) -> TrainConfig:
        if not valid_device_name(self.device):
            raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.lr_min > self.lr:
            raise ValueError(f"lr-min: must not exceed lr={self.lr:g}, got {self.lr_min:g}")
        if self.step_mode == "graphed" and self.device == "cpu":
            raise ValueError(
                "step-mode: 'graphed' captures CUDA graphs, but device is 'cpu'; "
                "set step-mode='grouped' or device='auto'/'cuda'"
            )
        if self.base_kernels == "liger" and self.device == "cpu":
            raise ValueError(
                "base-kernels: 'liger' runs Triton kernels on a CUDA GPU, but device is "
                "'cpu'; set base-kernels='torch' or device='auto'/'cuda'"
            )
        if self.quantization != "none" and self.device == "cpu":
            raise ValueError(
                f"quantization: {self.quantization!r} needs a CUDA GPU (bitsandbytes), "
                "but device is 'cpu'; set quantization='none' or device='auto'/'cuda'"
            )
        return self


class UploadConfig(Section):
    client_ranks: str = F(
        "",
        '"" = all at rank; "node" = node-config max-rank; "8,4,2" = by partition id (cycled)',
    )
    upload_codec: Codec = F(
        "float32", "client update on the wire: float32 | float16 | bfloat16 | int8"
    )
    error_feedback: bool = F(True, "compressed uploads: carry each client's rounding residual")

    def client_rank(self, rank: int, partition_id: int, node_max_rank: int | None = None) -> int:
        """The rank this client trains: `rank`, or less by client-ranks / node max-rank."""
        if not self.client_ranks:
            return rank
        if self.client_ranks != NODE_RANKS:
            ranks = [int(r) for r in self.client_ranks.split(",")]
            rank = ranks[partition_id % len(ranks)]
        if node_max_rank is not None:
            rank = min(rank, node_max_rank)
        if rank < 1:
            raise RunConfigError(f"node config {NODE_MAX_RANK}: must be >= 1, got {rank}")
        return rank


class PrivacyConfig(Section):
    dp_clip: float = F(
        0.0, "client-level DP: clip each client's update to this L2 norm (0 = off)", ge=0
    )
    dp_noise_multiplier: float = F(
        1.0, "client-level DP: noise std on the mean = this * dp-clip / n", ge=0
    )
    dp_delta: float = F(1e-5, "client-level DP: delta at which epsilon is reported", gt=0, lt=1)


class SecAggConfig(Section):
    secure_aggregation: bool = F(False, "SecAgg+ (legacy-API workflow): the server sees only sums")
    secagg_num_shares: int = F(3, "SecAgg+: shares of each client's secrets", ge=2)
    secagg_threshold: int = F(2, "SecAgg+: shares needed to reconstruct", ge=1)
    secagg_clipping_range: float = F(1.0, "SecAgg+: values clipped to +-this, then 22-bit", gt=0)
    secagg_max_weight: float = F(1000.0, "SecAgg+: largest num-examples (scales the weights)", gt=0)


class OutputConfig(Section):
    output_dir: str = F("outputs", "where run directories go (relative to the cwd)")
    run_name: str = F(
        "", '"" = a new folder (timestamp + random suffix); with resume: the latest run'
    )
    resume: bool = F(False, "continue run-name from its last checkpoint")
    central_eval: bool = F(True, "evaluate the global model on the server every round")
    central_eval_max: int = F(
        0, "central evaluation on a fixed seeded subset of this many examples (0 = all)", ge=0
    )
    central_eval_split: Literal["all", "validation", "test"] = F(
        "all",
        "central evaluation on: all | validation (a fixed seeded half of the held-out set, "
        "for choosing hyper-parameters) | test (the other half, for reporting)",
    )
    server_device: str = F(
        "auto", "central evaluation on: auto (first GPU if visible) | cpu | cuda | cuda:N"
    )
    export: bool = F(True, "write the PEFT adapter and merged model at the end")
    save_client_updates: bool = F(False, "keep every accepted client B per round (audits)")
    tensorboard: bool = F(
        True, "per-round scalars as TensorBoard events in the run's tb/ (if installed)"
    )

    @model_validator(mode="after")
    def _check_server_device(self) -> OutputConfig:
        if not valid_device_name(self.server_device):
            raise ValueError(
                f"server-device: expected auto, cpu, cuda or cuda:N, got {self.server_device!r}"
            )
        return self


# tasks.TaskConfig fields that are not run-config keys: a node's partition count comes from
# its node config, and the seed from the adapter section.
TASK_NOT_KEYS = frozenset({"num_partitions", "seed"})


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _key(name: str, info: Any) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return str(extra.get("key") or name.replace("_", "-"))


class RunConfig(BaseModel):
    """Every run-config key, in sections; flat keys (dash or snake case) are accepted too."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task: TaskConfig = Field(default_factory=TaskConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    chain: ChainConfig = Field(default_factory=ChainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    upload: UploadConfig = Field(default_factory=UploadConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = Field(default_factory=SecAggConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="before")
    @classmethod
    def _route_flat_keys(cls, data: Any) -> Any:
        """`RunConfig(rank=4)` / `{"rank": 4}`: put each flat key into its section."""
        if not isinstance(data, Mapping):
            return data
        sections: dict[str, Any] = {}
        flat = {}
        for name, value in data.items():
            if name in cls.model_fields and isinstance(value, Mapping | BaseModel):
                sections[name] = value
            else:
                flat[name] = value
        index = key_index()
        for name, value in flat.items():
            pos = index.get(name) or index.get(name.replace("_", "-"))
            if pos is None:
                raise ValueError(f"unknown run-config key {name!r}")
            section = sections.setdefault(pos[0], {})
            if isinstance(section, BaseModel):
                section = sections[pos[0]] = section.model_dump()
            section[pos[1]] = value
        return sections

    @model_validator(mode="after")
    def _check_combinations(self) -> RunConfig:
        a, up, st = self.adapter, self.upload, self.strategy
        if up.client_ranks and a.method not in B_ONLY:
            raise ValueError(f"client-ranks: needs a B-only method, not {a.method!r}")
        if a.frozen_factor != "A" and a.method not in B_ONLY:
            raise ValueError(f"frozen-factor: needs seedlora or ffa, not {a.method!r}")
        if self.privacy.dp_clip > 0 and st.name not in ("fedavg", "fedprox"):
            raise ValueError(f"dp-clip: DP needs strategy fedavg or fedprox, not {st.name!r}")
        if self.secagg.secure_aggregation:
            plain = st.name == "fedavg" and a.method in B_ONLY and not up.client_ranks
            if not plain or up.upload_codec != "float32" or self.privacy.dp_clip > 0:
                raise ValueError(
                    "secure-aggregation: needs strategy fedavg, a B-only method, float32 "
                    "uploads, no client-ranks and no dp-clip (SecAgg+ runs its own rounds)"
                )
        if self.train.warmup_rounds >= self.num_rounds:
            raise ValueError(
                f"warmup-rounds: must be less than the run's {self.num_rounds} rounds "
                f"(num-links x rounds-per-link), got {self.train.warmup_rounds}"
            )
        if self.chain.comm_budget_mb > 0 and self.secagg.secure_aggregation:
            raise ValueError(
                "comm-budget-mb: needs per-round byte counts, which SecAgg+ (one step per "
                "link) does not give"
            )
        if up.client_ranks and a.frozen_factor != "A":
            raise ValueError("client-ranks: needs frozen-factor 'A' (nested A rows)")
        quantized = self.train.quantization != "none"
        if quantized and (a.method not in B_ONLY or a.frozen_factor != "A" or up.client_ranks):
            raise ValueError(
                f"quantization: {self.train.quantization!r} needs a B-only method (seedlora, "
                "ffa) with frozen-factor 'A' and no client-ranks (links stay beside the base)"
            )
        if up.client_ranks in ("", NODE_RANKS):
            return self
        try:
            ranks = [int(r) for r in up.client_ranks.split(",")]
        except ValueError:
            ranks = []
        if not ranks or any(not 1 <= r <= a.rank for r in ranks):
            raise ValueError(
                f'client-ranks: expected "", "node" or ranks in 1..rank={a.rank} '
                f"separated by commas, got {up.client_ranks!r}"
            )
        return self

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's dash-case run config; errors name the offending key."""
        index = key_index()
        unknown = sorted(k for k in run_config if k not in index)
        if unknown:
            raise RunConfigError("; ".join(unknown_key(k, index) for k in unknown))
        try:
            return cls.model_validate(dict(run_config))
        except ValidationError as err:
            raise RunConfigError("; ".join(_error_line(e) for e in err.errors())) from None

    def to_flower(self) -> dict[str, Any]:
        """The flat dash-case run config (what pyproject's [tool.flwr.app.config] holds)."""
        return {
            key: _toml_value(getattr(getattr(self, section), field))
            for key, (section, field) in key_index().items()
        }

    def task_config(self, num_partitions: int = 1) -> TaskConfig:
        """The task section for a node holding one of `num_partitions` partitions."""
        return self.task.model_copy(
            update={"num_partitions": num_partitions, "seed": self.adapter.seed}
        )

    def client_rank(self, partition_id: int, node_max_rank: int | None = None) -> int:
        """The rank this client trains (see UploadConfig.client_rank)."""
        return self.upload.client_rank(self.adapter.rank, partition_id, node_max_rank)

    @property
    def num_rounds(self) -> int:
        return self.chain.num_links * self.chain.rounds_per_link

    @property
    def schedule(self) -> tuple[int, int]:
        """(links, rounds per link): baselines without chains run all rounds as one link."""
        if self.adapter.method in CHAINED:
            return self.chain.num_links, self.chain.rounds_per_link
        return 1, self.num_rounds


def _sections() -> Iterator[tuple[str, type[BaseModel]]]:
    for name, info in RunConfig.model_fields.items():
        yield name, info.annotation  # type: ignore[misc]


def key_index() -> dict[str, tuple[str, str]]:
    """Run-config key -> (section, field), in README order."""
    index: dict[str, tuple[str, str]] = {}
    for section, model in _sections():
        for name, info in model.model_fields.items():
            if model is TaskConfig and name in TASK_NOT_KEYS:
                continue
            key = _key(name, info)
            if key in index:
                raise AssertionError(f"run-config key {key!r} is in two sections")
            index[key] = (section, name)
    return index


def unknown_key(key: str, known: Iterable[str]) -> str:
    """`unknown run-config key 'rnak' (did you mean 'rank'?)`."""
    close = difflib.get_close_matches(key.replace("_", "-"), list(known), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown run-config key {key!r}{hint}"


def _toml_value(value: Any) -> Any:
    return "" if value is None else value


def section_field(section: str, name: str) -> Any:
    """The pydantic FieldInfo of `name` in `section`."""
    return dict(_sections())[section].model_fields[name]


def _error_line(error: Mapping[str, Any]) -> str:
    loc = error["loc"]
    if len(loc) >= 2:
        key = _key(str(loc[1]), section_field(str(loc[0]), str(loc[1])))
        return f"run-config key '{key}': {error['msg']} (got {error['input']!r})"
    return str(error["msg"]).removeprefix("Value error, ")
