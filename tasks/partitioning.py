"""Client splits through flwr-datasets partitioners, plus the glue they need."""

from __future__ import annotations

import functools
import heapq
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

import datasets
import numpy as np
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

from tasks.corpus import SPLIT_SEED

if TYPE_CHECKING:
    from tasks.base import TaskConfig

Pools = Callable[["TaskConfig"], tuple[datasets.Dataset, datasets.Dataset, str]]

GROUP = "group"
SPLIT = "_split"


def assign_groups(
    sizes: Mapping[Hashable, int], num_groups: int, first: Collection[Hashable] = ()
) -> dict[Hashable, int]:
    """Deterministic balanced grouping (largest first onto the lightest group).

    Values in `first` are placed before the others so that, when there are enough of them, every
    group gets one (used to give every client some packages that have evaluation files).
    """
    if num_groups > len(sizes):
        raise ValueError(
            f"num-partitions={num_groups} (the node config; --num-supernodes in a simulation) "
            f"exceeds the {len(sizes)} natural ids available; use fewer clients or "
            "partitioner='iid'"
        )
    heap = [(0, g) for g in range(num_groups)]
    out: dict[Hashable, int] = {}
    for batch in ([v for v in sizes if v in first], [v for v in sizes if v not in first]):
        for value in sorted(batch, key=lambda v: (-sizes[v], str(v))):
            load, g = heapq.heappop(heap)
            out[value] = g
            heapq.heappush(heap, (load + sizes[value], g))
    return out


def make_partitioner(
    config: TaskConfig, kind: str, natural_by: str, label_by: str, min_size: int
) -> Partitioner:
    """The flwr-datasets partitioner of `kind` ("natural", "iid" or "dirichlet")."""
    if kind == "natural":
        return NaturalIdPartitioner(partition_by=natural_by)
    if kind == "iid":
        return IidPartitioner(num_partitions=config.num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=config.num_partitions,
            partition_by=label_by,
            alpha=config.dirichlet_alpha,
            min_partition_size=min_size,
            seed=config.seed,
        )
    raise ValueError(f"partitioner must be natural, iid or dirichlet, got {kind!r}")


class ClientSplit:
    """One partitioner over the training and evaluation pools together.

    Rows carry a train/eval flag through the partitioner, so a client's evaluation rows follow the
    same natural ids, IID share or Dirichlet label proportions as its training rows.
    """

    def __init__(
        self,
        train_pool: datasets.Dataset,
        eval_pool: datasets.Dataset,
        config: TaskConfig,
        natural_by: str,
        label_by: str,
    ) -> None:
        # a custom dataset without the natural-id column is split IID (TaskConfig.split_of)
        kind = config.split_of(train_pool.column_names) if config.dataset else config.split
        num_partitions = config.num_partitions
        self.num_partitions, self.eval_pool = num_partitions, eval_pool
        client_eval = eval_pool
        if kind == "natural":  # ids without training rows belong to no client (central set only)
            ids = set(train_pool[natural_by])
            client_eval = eval_pool.select(
                [i for i, v in enumerate(eval_pool[natural_by]) if v in ids]
            )
        pool = datasets.concatenate_datasets(
            [
                train_pool.add_column(SPLIT, [0] * len(train_pool)),
                client_eval.add_column(SPLIT, [1] * len(client_eval)),
            ]
        )
        min_size = min(10, len(train_pool) // num_partitions)
        self.partitioner = make_partitioner(config, kind, natural_by, label_by, min_size)
        # Shuffle first (as FederatedDataset does): IidPartitioner takes contiguous shards.
        self.partitioner.dataset = pool.shuffle(seed=config.seed)
        got = self.partitioner.num_partitions
        if got != num_partitions:
            raise ValueError(
                f"num_partitions={num_partitions} but the {kind} partitioner produced {got}"
            )

    def rows(self, partition_id: int | None, which: str) -> datasets.Dataset:
        """Rows of a client, or the whole evaluation pool (the central set) for None."""
        if partition_id is not None:
            return self.partition(partition_id, which)
        if which != "eval":
            raise ValueError("training data needs a partition_id")
        return self.eval_pool

    def partition(self, partition_id: int, which: str) -> datasets.Dataset:
        """Client `partition_id`'s rows of `which` ("train" or "eval")."""
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition_id {partition_id} not in [0, {self.num_partitions})")
        part = self.partitioner.load_partition(partition_id)
        flag = {"train": 0, "eval": 1}[which]
        keep = [i for i, f in enumerate(part[SPLIT]) if f == flag]
        return part.select(keep).remove_columns(SPLIT)


@functools.lru_cache(maxsize=8)
def split_for(config: TaskConfig, pools: Pools, stdlib_label: str) -> ClientSplit:
    """The ClientSplit of a task config: its pools, partitioned by the configured rule, built
    once per process. `stdlib_label` is the label column of the stdlib corpus's pools; a
    custom dataset's is `label_column`."""
    label_by = config.label_column if config.dataset else stdlib_label
    train, evals, natural_by = pools(config)
    return ClientSplit(train, evals, config, natural_by=natural_by, label_by=label_by)


def client_rows(
    config: TaskConfig, pools: Pools, stdlib_label: str, partition_id: int | None, which: str
) -> tuple[datasets.Dataset, int | None, list[int]]:
    """A client's (or the central, partition_id=None) rows of `which` ("train" or "eval"),
    with the cap that applies to them and the RNG key of their capped subset."""
    part = split_for(config, pools, stdlib_label).rows(partition_id, which)
    limit = (config.max_train_blocks if which == "train" else config.max_eval_blocks) or None
    return part, limit, cap_key(config.seed, partition_id, which)


def cap_key(seed: int, partition_id: int | None, which: str) -> list[int]:
    """RNG key of a capped subset; the central set ignores the experiment seed (same every run)."""
    if partition_id is None:
        return [SPLIT_SEED, 0, 0]
    return [seed, partition_id + 1, int(which == "train")]


def cap(
    dataset: datasets.Dataset, limit: int | None, seed: int | Sequence[int]
) -> datasets.Dataset:
    """Seeded random subset of at most `limit` rows (original order kept)."""
    if limit is None or len(dataset) <= limit:
        return dataset
    keep = np.random.default_rng(seed).choice(len(dataset), size=limit, replace=False)
    return dataset.select(np.sort(keep))


def stratified_cap(
    dataset: datasets.Dataset, limit: int | None, column: str, seed: int | Sequence[int]
) -> datasets.Dataset:
    """Seeded subset of at most `limit` rows, as even over `column` values as the data allows.

    Keeps small classes in a capped evaluation set (a plain random cap drops them).
    """
    if limit is None or len(dataset) <= limit:
        return dataset
    rng = np.random.default_rng(seed)
    by_value: dict[Hashable, list[int]] = {}
    for i, v in enumerate(dataset[column]):
        by_value.setdefault(v, []).append(i)
    pools = [list(rng.permutation(ix)) for _, ix in sorted(by_value.items())]
    keep: list[int] = []
    while len(keep) < limit:  # round-robin over the values that still have rows
        for pool in pools:
            if pool and len(keep) < limit:
                keep.append(int(pool.pop()))
    return dataset.select(np.sort(keep))


def held_out_half(
    dataset: datasets.Dataset, which: str, column: str | None, seed: int | Sequence[int]
) -> datasets.Dataset:
    """One of two disjoint seeded halves of a held-out set: "validation" (for choosing
    hyper-parameters) or "test" (for the number reported), so a tuned result is not
    selected on the rows that score it. With `column` (class labels) each value's rows are
    shuffled and dealt alternately, so both halves keep every class; otherwise the rows are
    shuffled and cut in two (validation gets the extra row of an odd count)."""
    if which not in ("validation", "test"):
        raise ValueError(f"expected 'validation' or 'test', got {which!r}")
    rng = np.random.default_rng(seed)
    if column is None:
        groups = [list(range(len(dataset)))]
    else:
        by_value: dict[Hashable, list[int]] = {}
        for i, v in enumerate(dataset[column]):
            by_value.setdefault(v, []).append(i)
        groups = [ix for _, ix in sorted(by_value.items())]
    start = int(which == "test")
    keep = [int(i) for ix in groups for i in rng.permutation(ix)[start::2]]
    return dataset.select(sorted(keep))
