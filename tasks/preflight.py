"""Cheap checks of a task config against its model and data, without loading either.

The launcher runs them before it starts anything, and the ServerApp before round 1, so a
wrong path, layer name or column fails in seconds with the run-config key to fix. They
read only small files: the checkpoint's safetensors headers (parameter names and shapes),
the `save_to_disk` folder's JSON (column names), the stdlib corpus's package sizes. What
they cannot see cheaply (a hub model or dataset that is not on disk) is left to the run.
Every error is a `ValueError` whose message starts with the run-config key.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

from tasks.base import TaskConfig
from tasks.corpus import split_corpus
from tasks.datafiles import file_columns
from tasks.models import resolve_model_path, target_modules_for
from tasks.sft_data import with_source

_HEADER_LIMIT = 100_000_000  # bytes; a safetensors header is far smaller
# transformers' models built of `pytorch_utils.Conv1D` (weight stored n_in x n_out), and
# the names their Conv1D layers have (their other layers, e.g. `lm_head`, are nn.Linear).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_LAYERS = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})


def model_dir(name: str) -> Path | None:
    """The local folder of `model-name`, None for a hub id (checked by the run itself)."""
    path = Path(resolve_model_path(name))  # raises for a path that does not exist
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file():
        raise ValueError(f"model-name {name!r}: {path} has no config.json (not a model folder)")
    return path


def default_targets(folder: Path) -> tuple[str, ...]:
    """The task's default target patterns (`target-modules = "auto"`), from config.json."""
    model_type = json.loads((folder / "config.json").read_text()).get("model_type", "")
    return target_modules_for(str(model_type))


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the JSON header that opens a safetensors file."""
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        if size > _HEADER_LIMIT:
            raise ValueError(f"{path}: not a safetensors file")
        header = json.loads(handle.read(size))
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def parameter_names(folder: Path) -> list[str] | None:
    """Parameter names from the checkpoint's header or index; None when it has neither
    (a pytorch_model.bin: reading it would load it)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if single.is_file():
        return list(_safetensors_shapes(single))
    return None


def weight_shapes(folder: Path) -> dict[str, list[int]] | None:
    """Every tensor's shape, from the headers of the checkpoint's safetensors files (the
    shards its index names); None when one is missing or it has none."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [folder / shard for shard in shards]
    else:
        files = [folder / "model.safetensors"]
    if not all(f.is_file() for f in files):
        return None
    return {name: shape for f in files for name, shape in _safetensors_shapes(f).items()}


def _is_embedding(module: str) -> bool:
    """An embedding table: 2-D like a layer's weight, but no layer an adapter can wrap."""
    last = module.rsplit(".", 1)[-1]
    return last in ("wte", "wpe") or "embed" in last


def layer_shapes(folder: Path) -> dict[str, tuple[int, int]] | None:
    """`(n_in, n_out)` of every module with a 2-D weight but embeddings, from the
    checkpoint's headers and config.json; None when not readable cheaply (no safetensors,
    or a checkpoint saved quantized, whose stored shapes are packed).

    An `nn.Linear` stores its weight (n_out, n_in); GPT-2-style models' `Conv1D` layers
    (`CONV1D_MODEL_TYPES`, layers named `CONV1D_LAYERS`) store it (n_in, n_out)."""
    config = json.loads((folder / "config.json").read_text())
    shapes = weight_shapes(folder)
    if shapes is None or "quantization_config" in config:
        return None
    conv1d = config.get("model_type") in CONV1D_MODEL_TYPES
    layers: dict[str, tuple[int, int]] = {}
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        if module == name or len(shape) != 2 or _is_embedding(module):
            continue
        first, second = shape
        flipped = conv1d and module.rsplit(".", 1)[-1] in CONV1D_LAYERS
        layers[module] = (first, second) if flipped else (second, first)
    return layers


def module_names(parameters: Sequence[str]) -> list[str]:
    """Modules that own a weight, as `model.named_modules()` names them (the names of a
    bare base checkpoint may lack the head model's prefix; suffix matching copes)."""
    return sorted({p.rsplit(".", 1)[0] for p in parameters if p.endswith(".weight")})


def _targeted(name: str, targets: str | Sequence[str]) -> bool:
    """PEFT's rule, as seedlora.injection applies it: a regex matches the whole name, a list
    entry the name or its last dotted parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None or any(
            re.fullmatch(targets, prefix + name) for prefix in ("model.", "transformer.")
        )
    return any(name == t or name.endswith("." + t) for t in targets)


def check_targets(modules: Sequence[str], targets: str | Sequence[str]) -> None:
    """`target-modules` must name at least one module of the checkpoint."""
    if not any(_targeted(m, targets) for m in modules):
        shown = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in modules})[:12])
        raise ValueError(
            f"target-modules: {targets!r} matches no layer of the model (layer names end in: "
            f"{shown})"
        )


def dataset_columns(dataset: str) -> list[str] | None:
    """Columns of the training split of a `save_to_disk` folder or a data file (what
    tasks.sources trains on); None for a hub id."""
    folder = Path(dataset).expanduser()
    if folder.is_file():
        return file_columns(folder, dataset)
    if not folder.exists():
        if dataset.startswith(("/", ".", "~")) or dataset.count("/") > 1 or Path(dataset).suffix:
            raise ValueError(
                f"dataset {dataset!r}: no such file or directory ({folder.absolute()})"
            )
        return None  # a hub dataset id
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        folder = folder / ("train" if "train" in splits else sorted(splits)[0])
    info = folder / "dataset_info.json"
    if not info.is_file():
        raise ValueError(
            f"dataset {dataset!r}: not a datasets save_to_disk folder (no {info.name})"
        )
    return list(json.loads(info.read_text()).get("features", {}))


def check_columns(config: TaskConfig, columns: Sequence[str]) -> None:
    """The columns the task reads (text-column; sft: prompt-column and response-column, or
    messages-column); label-column when the task or the partitioner needs it."""
    listing = ", ".join(columns)
    for key, column in config.required_columns().items():
        if column not in columns:
            raise ValueError(
                f"{key}: {column!r} is not a column of dataset {config.dataset!r} "
                f"(columns: {listing})"
            )
    split = config.split_of(columns)
    if config.label_column not in columns and (config.task == "code-cls" or split != "iid"):
        why = "code-cls predicts it" if config.task == "code-cls" else f"partitioner {split!r}"
        raise ValueError(
            f"label-column: {config.label_column!r} is not a column of dataset "
            f"{config.dataset!r} ({why}; columns: {listing})"
        )


def _vocab_max_len(tokenizer_json: dict) -> int:
    vocab = tokenizer_json.get("model", {}).get("vocab", {})
    pieces = vocab if isinstance(vocab, dict) else [v[0] for v in vocab]
    return max((len(p) for p in pieces), default=1) or 1


def _stdlib_lm_ids(config: TaskConfig) -> int:
    """Held-out packages with at least one training block at seq-len: the natural ids of
    code-lm on the stdlib corpus (tasks.code_lm._stdlib_pools keeps exactly these).

    A package surely has a block when even the longest vocabulary entry per token leaves it
    seq-len tokens; only the others (a few small modules) are tokenized."""
    from tokenizers import Tokenizer

    split = split_corpus()
    folder = Path(resolve_model_path(config.model_name))
    path = folder / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path)) if path.is_file() else None
    longest = _vocab_max_len(json.loads(path.read_text())) if tokenizer else 1
    live = 0
    for package in split.federated:
        texts = [f.text for f in split.files(package, "train")]
        if not texts:
            continue
        surely = sum(math.ceil(len(t) / longest) for t in texts) + len(texts)
        if surely >= config.seq_len:
            live += 1
            continue
        if tokenizer is None:  # no fast tokenizer file: count with the task's own
            from tasks.blocks import encode
            from tasks.models import load_tokenizer

            lengths = [len(ids) for ids in encode(load_tokenizer(config.model_name), texts)]
        else:
            lengths = [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        live += sum(lengths) + len(texts) >= config.seq_len
    return live


def natural_ids(config: TaskConfig) -> int | None:
    """How many natural ids the config's split has, i.e. the most partitions (clients) it
    can serve; None when the split is not by natural ids (iid, dirichlet)."""
    config = with_source(config)
    if config.dataset:
        columns = dataset_columns(config.dataset)
        if columns is None or config.split_of(columns) != "natural":
            return None
        if config.label_column not in columns:
            return None  # check_columns names the column
        from tasks.sources import load_rows

        train, _ = load_rows(config.dataset)
        return len({str(v) for v in train[config.label_column]})
    if config.split != "natural":
        return None
    if config.task == "code-cls":
        return config.num_classes
    return _stdlib_lm_ids(config)


def check_partitions(config: TaskConfig, count: int, what: str) -> None:
    """`count` partitions (nodes) must not exceed the natural ids of the split."""
    limit = natural_ids(config)
    if limit is not None and count > limit:
        if config.dataset:
            source, ids = f"dataset {config.dataset!r}", f"values of {config.label_column!r}"
        else:
            ids = "held-out packages" if config.task == "code-lm" else "classes"
            source = f"the {config.task} corpus"
        raise ValueError(
            f"{what}: {count} clients, but partitioner {config.partitioner!r} splits {source} "
            f"by natural ids and it has only {limit} ({ids}); use at most {limit} clients, or "
            "partitioner='iid'"
        )


def check_task(
    config: TaskConfig, targets: Callable[[Sequence[str]], str | Sequence[str]] | None
) -> dict[str, tuple[int, int]] | None:
    """The model folder, its layers (`targets` turns the model's default patterns into the
    adapter's, e.g. `AdapterConfig.targets`; None skips the check), and the data columns.

    Returns `(n_in, n_out)` of each layer the adapter will wrap (`layer_shapes`), or None
    when they are not known cheaply (a hub id, no safetensors, no `targets`)."""
    folder = model_dir(config.model_name)
    adapted = None
    if folder is not None and targets is not None:
        names = parameter_names(folder)
        if names is not None:
            patterns = targets(default_targets(folder))
            check_targets(module_names(names), patterns)
            layers = layer_shapes(folder) or {}
            adapted = {m: s for m, s in layers.items() if _targeted(m, patterns)} or None
    config = with_source(config)
    if config.dataset:
        columns = dataset_columns(config.dataset)
        if columns is not None:
            check_columns(config, columns)
    elif config.task == "code-cls":  # the classes are held-out packages with evaluation files
        split = split_corpus()
        classes = sum(1 for p in split.federated if split.files(p, "eval"))
        if config.num_classes > classes:
            raise ValueError(
                f"num-classes: {config.num_classes}, but only {classes} held-out packages "
                "have evaluation files"
            )
    return adapted
