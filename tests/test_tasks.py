"""Tests of the tasks package: corpus split, partitioning, shipped model, local loading paths."""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import datasets
import pydantic
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
)

from tasks import (
    EMBEDDED,
    TaskConfig,
    build_task,
    corpus_info,
    load_corpus,
    resolve_model_path,
    split_corpus,
)
from tasks import models as models_mod
from tasks.base import Task
from tasks.code_lm import _stdlib_pools, lm_dataset
from tasks.partitioning import ClientSplit, split_for

CPU = torch.device("cpu")


def _packages(ds: datasets.Dataset) -> set[str]:
    return set(ds.with_format(None)["package"])


def _entropy(counts: Counter) -> float:
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values() if c)


# ---------------------------------------------------------------- corpus


def test_split_is_deterministic_and_seeded() -> None:
    fresh = split_corpus.__wrapped__  # bypass the cache: really recompute
    assert fresh(0) == fresh(0)
    assert fresh(0).federated != fresh(1).federated


def test_split_is_disjoint_and_complete() -> None:
    split = split_corpus(0)
    pre, val, fed = set(split.pretrain), set(split.validation), set(split.federated)
    assert not pre & val and not pre & fed and not val & fed
    assert pre | val | fed == set(load_corpus())
    assert 0.2 < len(fed) / len(load_corpus()) < 0.4
    for pkg in split.federated:
        train = {f.path for f in split.files(pkg, "train")}
        evals = {f.path for f in split.files(pkg, "eval")}
        assert not train & evals
        assert train | evals == {f.path for f in split.files(pkg)}
        assert len(evals) >= (1 if len(train | evals) >= 2 else 0)
    assert set(split.eval_files) <= {f.path for p in fed for f in load_corpus()[p]}


def test_corpus_excludes_tests_and_reports_counts() -> None:
    paths = [f.path for fs in load_corpus().values() for f in fs]
    assert not any(Path(p).name.startswith("test_") for p in paths)
    assert not any(
        {"test", "tests", "idle_test", "site-packages"} & set(Path(p).parts) for p in paths
    )
    info = corpus_info(0)
    assert info["python_version"] == sys.version.split()[0]
    assert info["total"]["files"] == len(paths)
    parts = ("pretrain", "validation", "federated")
    assert sum(info[k]["files"] for k in parts) == len(paths)


# ---------------------------------------------------------------- config


def test_config_validation_names_the_field() -> None:
    for field, bad in [("num_partitions", 0), ("dirichlet_alpha", 0.0), ("task", "nope")]:
        with pytest.raises(pydantic.ValidationError, match=field):
            TaskConfig(**{field: bad})
    with pytest.raises(pydantic.ValidationError, match="unknown"):
        TaskConfig(unknown=1)


def test_config_defaults_and_run_config_spelling() -> None:
    assert TaskConfig().split == "natural"
    assert TaskConfig(task="code-cls").split == "dirichlet"
    assert TaskConfig(task="code-cls", partitioner="iid").split == "iid"
    cfg = TaskConfig.from_mapping(
        {"num-partitions": 3, "dataset": "", "max-eval-blocks": 0, "x": 1}
    )
    assert (cfg.num_partitions, cfg.dataset, cfg.max_eval_blocks) == (3, "", 0)
    assert hash(cfg) == hash(TaskConfig(num_partitions=3, max_eval_blocks=0))


# ---------------------------------------------------------------- model location


def test_resolve_model_path_fallbacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    shipped = resolve_model_path(EMBEDDED)
    assert Path(shipped, "model.safetensors").is_file()
    assert not models_mod.embedded_seen_packages() & set(split_corpus().federated)  # unseen
    assert resolve_model_path("gpt2") == "gpt2"  # other names pass through
    monkeypatch.setattr(models_mod, "_HERE", tmp_path)  # as in a `flwr run` copy: no weights
    monkeypatch.setattr(models_mod, "_editable_source", lambda: None)
    monkeypatch.delenv(models_mod.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match="tried"):
        resolve_model_path(EMBEDDED)
    monkeypatch.setenv(models_mod.ENV_VAR, shipped)
    assert resolve_model_path(EMBEDDED) == shipped
    monkeypatch.delenv(models_mod.ENV_VAR)
    repo = Path(shipped).parents[2]
    monkeypatch.setattr(models_mod, "_editable_source", lambda: repo)
    assert Path(resolve_model_path(EMBEDDED)) == repo / "tasks" / "assets" / "base-model"


# ---------------------------------------------------------------- partitions (stdlib corpus)

# Uncapped, so every row counts; 1024-token blocks: the same files as the default 128 in an
# eighth of the rows (the partition rules do not depend on the length).
UNCAPPED = {"max_train_blocks": 0, "max_eval_blocks": 0, "seq_len": 1024}


@pytest.fixture(scope="module")
def partitioned() -> dict[str, ClientSplit]:
    """The stdlib corpus split three ways, built once for the tests below: natural (one
    client per package), IID and Dirichlet(0.1), each over 8 clients. The tests read the
    clients' rows (what tasks.partitioning hands each client) rather than the block datasets
    made from them, whose conversion would cost a pass over the corpus per split."""
    skewed = {"num_partitions": 8, "dirichlet_alpha": 0.1}
    configs = {
        "natural": TaskConfig(**UNCAPPED),
        "iid": TaskConfig(partitioner="iid", **skewed, **UNCAPPED),
        "dirichlet": TaskConfig(partitioner="dirichlet", **skewed, **UNCAPPED),
    }
    return {kind: split_for(cfg, _stdlib_pools, "package") for kind, cfg in configs.items()}


def _trained_packages(split: ClientSplit) -> set[str]:
    """The packages with at least one training block (the natural ids)."""
    pool = split.partitioner.dataset
    return {p for p, s in zip(pool["package"], pool["_split"], strict=True) if s == 0}


def _sizes(split: ClientSplit) -> tuple[list[int], list[int]]:
    clients = range(split.num_partitions)
    return [len(split.rows(p, "train")) for p in clients], [
        len(split.rows(p, "eval")) for p in clients
    ]


def test_natural_partition_puts_each_package_in_one_client(partitioned) -> None:
    split = partitioned["natural"]
    seen: Counter = Counter()
    for p in range(split.num_partitions):
        train = set(split.rows(p, "train")["package"])
        assert train, f"client {p} has no training data"
        assert set(split.rows(p, "eval")["package"]) <= train  # eval files of its packages
        seen.update(train)
    assert set(seen.values()) == {1}
    with_blocks = _trained_packages(split)
    assert set(seen) == with_blocks and with_blocks <= set(split_corpus(0).federated)
    task = build_task(TaskConfig(**UNCAPPED))  # the client's dataset is made of those rows
    assert _packages(task.train_dataset(3)) == set(split.rows(3, "train")["package"])
    assert _packages(task.eval_dataset(3)) == set(split.rows(3, "eval")["package"])


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_iid_and_dirichlet_cover_all_rows(partitioned, kind: str) -> None:
    split = partitioned[kind]
    train, evals = _sizes(split)
    assert len(train) == 8 and min(train) > 0
    assert sum(train) == sum(_sizes(partitioned["natural"])[0])
    assert sum(evals) == len(split.rows(None, "eval"))


def test_dirichlet_is_more_skewed_than_iid(partitioned) -> None:
    def mean_entropy(kind: str) -> float:
        split = partitioned[kind]
        clients = range(split.num_partitions)
        counts = [Counter(split.rows(p, "train")["package"]) for p in clients]
        return sum(map(_entropy, counts)) / len(counts)

    iid, skewed = mean_entropy("iid"), mean_entropy("dirichlet")
    print(f"mean package entropy per client: iid {iid:.2f}, dirichlet(0.1) {skewed:.2f}")
    assert skewed < 0.8 * iid


def test_caps_apply_and_are_deterministic() -> None:
    task = build_task(TaskConfig())  # the default caps: 256 train blocks, 128 held out
    a = task.train_dataset(1)
    assert len(a) == 256 and len(task.eval_dataset(None)) == 128
    assert a[0]["input_ids"].shape == (128,) and torch.equal(a[0]["labels"], a[0]["input_ids"])
    again = lm_dataset.__wrapped__(task.config, 1, "train")  # recomputed, not cached
    assert torch.equal(a[:]["input_ids"], again[:]["input_ids"])
    assert not torch.equal(a[:]["input_ids"], task.train_dataset(2)[:]["input_ids"])


# ---------------------------------------------------------------- the shipped model


def test_shipped_model_beats_random_init() -> None:
    path = resolve_model_path(EMBEDDED)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    task = build_task(TaskConfig())
    assert isinstance(task, Task) and task.target_modules == ("c_attn", "c_proj", "c_fc")
    central = task.eval_dataset(None).select(range(32))  # 32 held-out blocks tell them apart
    base = task.evaluate(model, central, 32, CPU)
    torch.manual_seed(0)
    random_model = GPT2LMHeadModel(GPT2Config.from_pretrained(path))
    rand = task.evaluate(random_model, central, 32, CPU)
    print(f"held-out ppl: shipped {base['ppl']:.2f}, random init {rand['ppl']:.2f}")
    assert base["num-examples"] == len(central) > 0
    assert base["ppl"] < 0.5 * rand["ppl"]
    fresh = task.load_model()
    assert fresh is not task.load_model() and not fresh.training
    batch = next(iter(torch.utils.data.DataLoader(task.train_dataset(0), batch_size=4)))
    loss = task.loss(fresh, batch)
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - base["loss"]) < 2.0


def test_code_cls_labels_and_head() -> None:
    task = build_task(TaskConfig(task="code-cls"))
    k = task.config.num_classes
    assert task.modules_to_save == ("score",)
    model = task.load_model()
    assert isinstance(model.score, torch.nn.Linear) and model.score.out_features == k
    assert torch.equal(model.score.weight, task.load_model().score.weight)  # seeded head init
    labels = [int(v) for p in range(4) for v in task.train_dataset(p)["labels"]]
    assert labels and min(labels) >= 0 and max(labels) < k
    central = task.eval_dataset(None)
    assert set(central.with_format(None)["labels"]) == set(range(k))  # every class evaluated
    metrics = task.evaluate(model, central.select(range(32)), 32, CPU)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and math.isfinite(metrics["loss"])
    with pytest.raises(ValueError, match="run-config key .num-classes.: 50, but only"):
        build_task(TaskConfig(task="code-cls", num_classes=50))


# ---------------------------------------------------------------- local model + local dataset


@pytest.fixture(scope="module")
def local_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from tasks.pretrain import train_tokenizer

    root = tmp_path_factory.mktemp("local")
    corpus = load_corpus()
    pkgs = ["json", "email", "asyncio"]
    texts = [f.text for p in pkgs for f in corpus[p]]
    tok = train_tokenizer(texts, vocab_size=400, max_len=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            bos_token_id=tok.eos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = {"text": [], "label": []}
    for pkg in pkgs:
        for f in corpus[pkg][:12]:
            for i in range(0, min(len(f.text), 4000), 400):
                rows["text"].append(f.text[i : i + 400])
                rows["label"].append(pkg)
    datasets.Dataset.from_dict(rows).save_to_disk(root / "data")
    return str(root / "model"), str(root / "data")


@pytest.mark.parametrize(
    ("task_name", "partitioner"),
    [
        ("code-lm", "natural"),
        ("code-lm", "iid"),
        ("code-cls", "dirichlet"),
        ("code-cls", "natural"),
    ],
)
def test_local_model_and_dataset(
    local_dirs: tuple[str, str], task_name: str, partitioner: str
) -> None:
    model_dir, data_dir = local_dirs
    cfg = TaskConfig(
        task=task_name,
        model_name=model_dir,
        dataset=data_dir,
        partitioner=partitioner,
        num_partitions=2,
        seq_len=32,
        max_train_blocks=64,
        max_eval_blocks=32,
    )
    task = build_task(cfg)
    model = task.load_model()
    train = task.train_dataset(1)
    assert len(train) > 0 and train[0]["input_ids"].shape == (32,)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=8)))
    assert torch.isfinite(task.loss(model, batch))
    for part in (0, None):
        metrics = task.evaluate(model, task.eval_dataset(part), 16, CPU)
        assert metrics["num-examples"] > 0
        assert all(math.isfinite(v) for v in metrics.values())
    if task_name == "code-cls":
        assert task.modules_to_save == ("score",) and model.score.out_features == 3
        assert {int(v) for v in train["labels"]} <= {0, 1, 2}


def test_load_rows_uses_test_split_or_holds_out_ten_percent(tmp_path: Path) -> None:
    from tasks.sources import load_rows

    rows = datasets.Dataset.from_dict({"text": [f"x = {i}" for i in range(50)], "label": [0] * 50})
    datasets.DatasetDict({"train": rows, "test": rows.select(range(5))}).save_to_disk(
        tmp_path / "a"
    )
    rows.save_to_disk(tmp_path / "b")
    train, evals = load_rows(str(tmp_path / "a"))
    assert (len(train), len(evals)) == (50, 5)
    train, evals = load_rows(str(tmp_path / "b"))
    assert (len(train), len(evals)) == (45, 5)
    assert not set(train["text"]) & set(evals["text"])
    assert list(load_rows.__wrapped__(str(tmp_path / "b"))[1]["text"]) == list(evals["text"])


def test_missing_model_path_says_so_and_hub_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^model-name '/no/such/model': no such dir"):
        resolve_model_path("/no/such/model")
    with pytest.raises(FileNotFoundError, match="model-name"):
        resolve_model_path("./relative/missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="model-name"):
        resolve_model_path(str(tmp_path / "file"))
    with pytest.raises(OSError, match="^model-name 'nobody/no-such-model': not a local dir"):
        models_mod.model_type_of("nobody/no-such-model")  # offline: the hub load fails


def test_text_only_dataset_is_split_iid_by_default(local_dirs: tuple[str, str], tmp_path) -> None:
    """`partitioner = "auto"` on code-lm means natural ids of label-column; data without
    that column is split IID instead of failing (code-cls still needs the labels)."""
    from tasks.sources import load_rows

    model_dir, data_dir = local_dirs
    text_only = tmp_path / "text-only"
    load_rows(data_dir)[0].remove_columns("label").save_to_disk(text_only)
    cfg = TaskConfig(model_name=model_dir, dataset=str(text_only), num_partitions=3, seq_len=32)
    assert cfg.partitioner == "auto" and cfg.split_of(["text"]) == "iid"
    task = build_task(cfg)
    assert all(len(task.train_dataset(p)) > 0 for p in range(3))
    with pytest.raises(ValueError, match=r"run-config key 'label-column': 'label' is not a col"):
        build_task(cfg.model_copy(update={"task": "code-cls"}))
    with pytest.raises(ValueError, match=r"run-config key 'text-column': 'body'"):
        build_task(cfg.model_copy(update={"text_column": "body"})).train_dataset(0)


def test_classifier_checkpoint_with_another_head_size_gets_a_new_head(
    local_dirs: tuple[str, str], tmp_path: Path
) -> None:
    from transformers import AutoModelForSequenceClassification

    model_dir, _ = local_dirs
    five = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=5)
    five.save_pretrained(tmp_path / "cls5")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "cls5")
    model, _ = models_mod.load_seq_cls(str(tmp_path / "cls5"), num_labels=3, seed=0)
    assert model.score.out_features == 3
    again, _ = models_mod._cached.__wrapped__(str(tmp_path / "cls5"), "seq-cls", 3, 0)  # reload
    assert torch.equal(model.score.weight, again.score.weight)  # seeded: same on every client


def test_natural_id_count_matches_the_split() -> None:
    """The launcher's cheap count (tasks/preflight) equals the packages the split keeps."""
    from tasks.preflight import natural_ids

    for cfg in (TaskConfig(), TaskConfig(**UNCAPPED)):  # splits the tests above made
        split = split_for(cfg, _stdlib_pools, "package")
        assert natural_ids(cfg) == len(_trained_packages(split))
    assert natural_ids(TaskConfig(partitioner="iid")) is None
    assert natural_ids(TaskConfig(task="code-cls", partitioner="natural")) == 8
