"""Custom datasets: a Hugging Face dataset id, a local `save_to_disk` directory, or a local
JSON / JSON Lines / CSV / Parquet file (loaded by the `datasets` builder of its suffix)."""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import datasets

from tasks.base import TaskConfig
from tasks.corpus import SPLIT_SEED
from tasks.datafiles import file_builder
from tasks.partitioning import GROUP, Pools, assign_groups

EVAL_FRACTION = 0.1
_EVAL_SPLITS = ("test", "validation")


def _load(dataset: str) -> datasets.Dataset | datasets.DatasetDict:
    path = Path(dataset).expanduser()
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    if path.is_file():  # one split, "train"; load_rows holds out its eval rows
        return datasets.load_dataset(file_builder(dataset), data_files=str(path))
    # hub id; needs network or a populated cache (HF_DATASETS_OFFLINE=1 otherwise)
    return datasets.load_dataset(dataset)


@functools.lru_cache(maxsize=4)
def load_rows(dataset: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train rows, eval rows); a fixed 10% of rows is held out when there is no test split.

    The hold-out does not depend on the experiment seed, so all runs evaluate on the same rows.
    """
    obj = _load(dataset)
    if isinstance(obj, datasets.DatasetDict):
        evals = [k for k in _EVAL_SPLITS if k in obj]
        train_key = "train" if "train" in obj else sorted(obj)[0]
        if evals:
            return obj[train_key], obj[evals[0]]
        obj = obj[train_key]
    if len(obj) < 2:
        raise ValueError(f"dataset {dataset!r} has {len(obj)} rows; need at least 2")
    parts = obj.train_test_split(test_size=EVAL_FRACTION, seed=SPLIT_SEED, shuffle=True)
    return parts["train"], parts["test"]


def require_column(rows: datasets.Dataset, column: str, key: str, why: str = "") -> None:
    """Fail naming the run-config key to fix when a needed column is missing."""
    if column not in rows.column_names:
        raise ValueError(
            f"run-config key '{key}': {column!r} is not a column of the dataset "
            f"(columns: {', '.join(rows.column_names)}){why}"
        )


def label_names(train: datasets.Dataset, evals: datasets.Dataset, column: str) -> list[str]:
    """Class names: the ClassLabel names if present, else the sorted distinct values."""
    feature = train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return sorted({str(v) for v in train[column]} | {str(v) for v in evals[column]})


def label_ids(rows: datasets.Dataset, column: str, names: list[str]) -> list[int]:
    """Integer labels of `rows` in the order of `names`."""
    if isinstance(rows.features[column], datasets.ClassLabel):
        return [int(v) for v in rows[column]]
    index = {n: i for i, n in enumerate(names)}
    return [index[str(v)] for v in rows[column]]


def pools_of(config: TaskConfig, stdlib: Pools) -> Pools:
    """`stdlib` (a task's pools of the stdlib corpus), or `custom_pools` for a dataset."""
    return custom_pools if config.dataset else stdlib


def custom_pools(config: TaskConfig) -> tuple[datasets.Dataset, datasets.Dataset, str]:
    """Row pools (train, eval, natural id column); natural/dirichlet split by `label_column`."""
    assert config.dataset is not None
    train, evals = load_rows(config.dataset)
    for key, column in config.required_columns().items():
        require_column(train, column, key)
    split = config.split_of(train.column_names)
    if split == "iid":
        return train, evals, config.label_column
    why = f" (partitioner {split!r} splits by it; partitioner='iid' does not)"
    require_column(train, config.label_column, "label-column", why)
    values = [str(v) for v in train[config.label_column]]
    if split == "dirichlet" or len(set(values)) == config.num_partitions:
        return train, evals, config.label_column
    groups = assign_groups(Counter(values), config.num_partitions)

    def grouped(rows: datasets.Dataset) -> datasets.Dataset:
        return rows.add_column(GROUP, [groups.get(str(v), -1) for v in rows[config.label_column]])

    return grouped(train), grouped(evals), GROUP
