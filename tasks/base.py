"""Task configuration and the interface the Flower client and server call."""

from __future__ import annotations

import collections
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from tasks.models import (
    EMBEDDED,
    load_stored,
    load_tokenizer,
    model_skeleton,
    model_type_of,
    resolve_model_path,
    target_modules_for,
    weights_fingerprint,
)

if TYPE_CHECKING:  # the config is validated without loading torch or datasets
    import datasets
    import torch
    from transformers import PreTrainedTokenizerBase

# Client datasets kept per process (train and eval of each partition, and the central set):
# a Ray actor serves whichever partitions it is given, so a cache smaller than twice the
# partitions it serves would tokenize and pack them again every round (it was 64: 32
# partitions). At the default caps a dataset is about 1 MB (256 blocks x 128 tokens x 3
# int64 columns), so 512 partitions per process cost up to ~1 GB.
DATASET_CACHE = 1024
D = TypeVar("D")

# Datasets this process tokenized, by split ("train", "eval", "central"): a node worker
# reports them, so a benchmark can check that each node tokenizes its partition once.
TOKENIZED: collections.Counter[str] = collections.Counter()


def dataset_cache(build: Callable[[TaskConfig, int | None, str], D]) -> Callable[..., D]:
    """`build(config, partition_id, which)` cached per process (DATASET_CACHE entries),
    counting in TOKENIZED what it makes."""

    @functools.lru_cache(maxsize=DATASET_CACHE)
    @functools.wraps(build)
    def cached(config: TaskConfig, partition_id: int | None, which: str) -> D:
        TOKENIZED["central" if partition_id is None else which] += 1
        return build(config, partition_id, which)

    return cached


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class TaskConfig(BaseModel):
    """What to train on and how it is split: the `task` section of the run config.

    Frozen and hashable so datasets can be cached by it. Fields also accept the kebab-case
    spelling used in Flower run configs (`model-name`). TOML has no null: `dataset = ""`
    is the stdlib corpus and a cap of 0 means no cap. `num_partitions` and `seed` are not
    run-config keys: a node's partition count comes from its node config, the seed from
    the adapter section (contract.config).
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=_kebab,
        populate_by_name=True,
        loc_by_alias=False,  # errors name the python field
    )

    task: Literal["code-lm", "code-cls", "sft"] = Field(
        "code-lm",
        description="task: causal LM, package classification or instruction fine-tuning (sft)",
    )
    model_name: str = Field(
        EMBEDDED, description="`embedded` (shipped base), a hub model id or a local dir"
    )
    dataset: str = Field(
        "",
        description='"" = shipped data (stdlib corpus; sft: tasks/assets/sft-stdlib.jsonl); else '
        "a hub dataset id, a save_to_disk dir or a .json/.jsonl/.csv/.parquet file",
    )
    text_column: str = Field("text", description="text column of a custom dataset")
    label_column: str = Field(
        "label", description="label column of a custom classification dataset"
    )
    prompt_column: str = Field("instruction", description="sft: prompt (instruction) column")
    input_column: str = Field(
        "input",
        description='sft: optional column appended to the prompt where not empty ("" = none)',
    )
    response_column: str = Field(
        "response", description="sft: response column (the loss covers only its tokens)"
    )
    messages_column: str = Field(
        "",
        description='sft: chat column (lists of {"role", "content"}; loss on assistant turns); '
        '"" = prompt/response columns',
    )
    partitioner: Literal["auto", "natural", "iid", "dirichlet"] = Field(
        "auto",
        description="flwr-datasets partitioner; auto = natural (code-lm, sft; iid for a "
        "dataset without label-column) / dirichlet (code-cls)",
    )
    dirichlet_alpha: float = Field(
        0.5, gt=0, description="Dirichlet concentration (smaller = more skewed)"
    )
    num_partitions: int = Field(8, ge=1)
    seq_len: int = Field(128, ge=8, le=4096, description="tokens per example")
    num_classes: int = Field(8, ge=2, description="code-cls: number of packages to classify")
    max_train_blocks: int = Field(
        256, ge=0, description="cap on training examples per client (0 = no cap)"
    )
    max_eval_blocks: int = Field(
        128, ge=0, description="cap on evaluation examples per client and central (0 = no cap)"
    )
    seed: int = Field(0, ge=0)  # partitioning, caps, new heads; not the corpus split

    @property
    def split(self) -> str:
        """The partitioner kind, with `auto` resolved by task."""
        if self.partitioner != "auto":
            return self.partitioner
        return "dirichlet" if self.task == "code-cls" else "natural"

    def split_of(self, columns: Sequence[str]) -> str:
        """The partitioner kind for a custom dataset with these columns: `auto` on code-lm
        and sft splits by natural ids of label-column, or IID when the data has no such
        column."""
        if self.partitioner == "auto" and self.task != "code-cls":
            return "natural" if self.label_column in columns else "iid"
        return self.split

    def required_columns(self) -> dict[str, str]:
        """Run-config key -> the column of a custom dataset the task reads (label-column
        aside: whether it is needed depends on the split, see `split_of`)."""
        if self.task != "sft":
            return {"text-column": self.text_column}
        if self.messages_column:
            return {"messages-column": self.messages_column}
        required = {"prompt-column": self.prompt_column, "response-column": self.response_column}
        if self.input_column != type(self).model_fields["input_column"].default:
            required["input-column"] = self.input_column  # a set one must exist; "" = none
        return {k: v for k, v in required.items() if v}

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TaskConfig:
        """Build from a larger config (e.g. a Flower run_config); other keys are ignored."""
        names = set(cls.model_fields) | {_kebab(n) for n in cls.model_fields}
        return cls.model_validate({k: v for k, v in values.items() if k in names})


class Task(ABC):
    """What a federated client/server needs from a task; the concrete tasks subclass it.

    Evaluation is one loop for every task: each batch adds its sums (`_eval_sums`, e.g.
    summed token loss and token count), and `_metrics` turns the totals into the metrics.
    """

    modules_to_save: tuple[str, ...] = ()  # modules trained in full (new heads)
    model_kind: str = "causal"  # what `load_model` builds: "causal" or "seq-cls"
    num_labels: int = 0  # seq-cls: the new head's size
    metric_keys: tuple[str, ...] = ("loss",)  # what `evaluate` reports besides num-examples
    sample_count = 0  # generated samples the server writes at the end of a run (`samples`)

    def __init__(self, config: TaskConfig) -> None:
        self.config = config
        # adapter target module-name patterns for the model
        self.target_modules: tuple[str, ...] = target_modules_for(model_type_of(config.model_name))

    @abstractmethod
    def load_model(self, cache: bool = True) -> torch.nn.Module:
        """Fresh pretrained base model, CPU float32; `cache=False` keeps no copy in this
        process (tasks.models.load_causal_lm)."""

    def load_stored(self) -> torch.nn.Module:
        """`load_model()` in the checkpoint's dtype, uncached (tasks.models.load_stored):
        what a client writes its float32 master file from."""
        return load_stored(
            self.config.model_name, self.model_kind, self.num_labels, self.config.seed
        )

    def load_skeleton(self) -> torch.nn.Module:
        """`load_model()`'s modules with every tensor on the meta device (no weights read):
        what a client maps its float32 master file into (client/masters.py)."""
        return model_skeleton(
            self.config.model_name, self.model_kind, self.num_labels, self.config.seed
        )

    def weights_fingerprint(self) -> str:
        """Changes when the files `load_model` reads change (tasks.models)."""
        return weights_fingerprint(self.config.model_name)

    def load_quantized(
        self,
        quantization: str,
        device: torch.device,
        dtype: torch.dtype,
        skip: Sequence[str] = (),
    ) -> torch.nn.Module:
        """The pretrained base with bitsandbytes 8bit/4bit Linear layers, on the GPU `device`
        (runtime/quantized.py); `dtype` for the layers left unquantized, `skip` the trained
        heads. Raises a ValueError naming `quantization` without CUDA or bitsandbytes."""
        from runtime.quantized import load_quantized

        return load_quantized(
            resolve_model_path(self.config.model_name),
            self.model_kind,
            quantization,
            device,
            dtype,
            num_labels=self.num_labels,
            seed=self.config.seed,
            skip=skip,
            pad_token_id=load_tokenizer(self.config.model_name).pad_token_id,
        )

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer (shared: do not modify), e.g. to ship beside exports."""
        return load_tokenizer(self.config.model_name)

    @abstractmethod
    def train_dataset(self, partition_id: int) -> datasets.Dataset:
        """This client's training examples in torch format."""

    @abstractmethod
    def eval_dataset(self, partition_id: int | None) -> datasets.Dataset:
        """This client's evaluation examples; None = the central held-out set (server)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean loss of a batch already on the model's device."""

    @abstractmethod
    def _eval_sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
        """Sums over one batch (on the model's device) that `_metrics` turns into metrics."""

    @abstractmethod
    def _metrics(self, sums: dict[str, float], num_examples: int) -> dict[str, float]:
        """The metrics from the sums over the whole dataset."""

    def evaluate(
        self,
        model: torch.nn.Module,
        dataset: datasets.Dataset,
        batch_size: int,
        device: torch.device,
    ) -> dict[str, float]:
        """Metrics over a dataset (`metric_keys` and "num-examples"), in eval mode."""
        if len(dataset) == 0:  # zeros with weight 0 (aggregated by num-examples)
            return {**dict.fromkeys(self.metric_keys, 0.0), "num-examples": 0}
        import torch
        from torch.utils.data import DataLoader

        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                for key, value in self._eval_sums(model, batch).items():
                    sums[key] = sums.get(key, 0.0) + float(value)
        model.train(was_training)
        return self._metrics(sums, len(dataset))

    def samples(self, model: torch.nn.Module, device: torch.device) -> list[dict[str, str]]:
        """Up to `sample_count` outputs of the final model on held-out inputs, for people to
        read beside the metrics (a generative task's greedy completions); none by default."""
        return []
