"""Instruction fine-tuning (task `sft`): the loss mask, both templates, every file format,
errors naming the key, the shipped data, and a federated run that writes samples."""

from __future__ import annotations

import copy
import itertools
import json
import sys
from pathlib import Path

import datasets
import pytest
import torch

from contract.config import RunConfig, RunConfigError
from contract.preflight import check_run
from tasks import TaskConfig, build_task, load_tokenizer
from tasks.chat import conversation, encode_masked
from tasks.corpus import split_corpus
from tasks.preflight import dataset_columns
from tasks.sft_data import rows_of, shipped_path

CPU = torch.device("cpu")
EOS = "<|endoftext|>"
ROWS = [
    {"instruction": f"Add {i} and {i + 1}.", "input": "", "response": f"{2 * i + 1}"}
    for i in range(40)
] + [{"instruction": "Name it.", "input": "def f(): pass", "response": "f"}] * 10
# A small Jinja chat template; the shipped tokenizer has none.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _config(**fields) -> TaskConfig:
    values = {"num_partitions": 2, "seq_len": 64, "partitioner": "iid"} | fields
    return TaskConfig(task="sft", **values)


def _trained(ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """(prompt ids, trained ids) of one example."""
    return [i for i, lab in zip(ids, labels, strict=True) if lab == -100], [
        lab for lab in labels if lab != -100
    ]


def test_labels_mask_exactly_the_prompt() -> None:
    tok = load_tokenizer()
    split = split_corpus()  # the first 20 short rows of build_rows(), from the files they need
    every = (r for p in split.federated for f in split.files(p) for r in rows_of(f))
    rows = list(itertools.islice((r for r in every if len(r["response"]) < 120), 20))
    cfg = _config()
    talks = [conversation(r, cfg) for r in rows]
    ids, labels = encode_masked(tok, talks, seq_len=256)
    for row, i, lab in zip(rows, ids, labels, strict=True):
        prompt, trained = _trained(i, lab)
        assert tok.decode(trained) == row["response"] + EOS
        expected = f"### Instruction:\n{row['instruction']}"
        if row["input"]:
            expected += f"\n\n{row['input']}"
        assert tok.decode(prompt) == expected + "\n\n### Response:\n"


def test_dataset_pads_with_ignored_labels_and_truncates_from_the_right() -> None:
    task = build_task(_config(seq_len=40))
    data = task.eval_dataset(None)
    assert len(data) > 0 and data[0]["input_ids"].shape == (40,)
    labels, mask = data[:]["labels"], data[:]["attention_mask"]
    assert bool((labels[mask == 0] == -100).all())  # padding is never a target
    assert bool(((labels != -100).sum(1) > 0).all())  # every kept row has response tokens
    assert int(mask.sum(1).max()) == 40  # long rows are cut at seq-len


def test_chat_template_is_used_when_the_tokenizer_has_one() -> None:
    tok = copy.deepcopy(load_tokenizer())
    tok.chat_template = TEMPLATE
    talk = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    (ids,), (labels,) = encode_masked(tok, [talk], seq_len=256)
    prompt, trained = _trained(ids, labels)
    assert tok.decode(trained) == f"Hello<|end|>\n{EOS}Ciao<|end|>\n{EOS}"  # every assistant turn
    assert tok.decode(prompt).startswith("<|system|>Be brief.<|end|>\n<|user|>Hi<|end|>\n")
    assert "### Instruction" not in tok.decode(ids)
    plain = load_tokenizer()
    assert not plain.chat_template  # the shipped tokenizer takes the plain template


def _write(path: Path, rows: list[dict]) -> None:
    table = datasets.Dataset.from_list(rows)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
    elif path.suffix == ".csv":
        table.to_csv(str(path), index=False)
    else:
        table.to_parquet(str(path))


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_each_file_format_loads(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"rows{suffix}"
    _write(path, ROWS)
    assert dataset_columns(str(path)) == ["instruction", "input", "response"]
    task = build_task(_config(dataset=str(path)))
    tok = load_tokenizer()
    train, evals = task.train_dataset(0), task.eval_dataset(None)
    assert len(train) + len(task.train_dataset(1)) == 45 and len(evals) == 5
    row = train[0]
    answers = {r["response"] + EOS for r in ROWS}
    assert tok.decode(row["labels"][row["labels"] != -100]) in answers


def test_messages_column_trains_on_assistant_turns(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    talks = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(20)
    ]
    _write(path, talks)
    task = build_task(_config(dataset=str(path), messages_column="messages"))
    row = task.train_dataset(0)[0]
    tok = load_tokenizer()
    assert tok.decode(row["labels"][row["labels"] != -100]) == "a" + EOS
    assert tok.decode(row["input_ids"]).startswith("### Instruction:\nq")


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"prompt_column": "question"}, "prompt-column: 'question'"),
        ({"response_column": "answer"}, "response-column: 'answer'"),
        ({"messages_column": "chat"}, "messages-column: 'chat'"),
        ({"input_column": "context"}, "input-column: 'context'"),
    ],
)
def test_bad_columns_name_the_key(tmp_path: Path, fields: dict, key: str) -> None:
    path = tmp_path / "rows.jsonl"
    _write(path, ROWS)
    cfg = _config(dataset=str(path), **fields)
    with pytest.raises(ValueError, match=f"run-config key '{key.split(':')[0]}'"):
        build_task(cfg).train_dataset(0)
    overrides = {"task": "sft", "dataset": str(path)} | {
        k.replace("_", "-"): v for k, v in fields.items()
    }
    with pytest.raises(RunConfigError, match=f"^{key}"):  # the launcher's pre-check
        check_run(RunConfig.from_flower(overrides))
    check_run(RunConfig.from_flower({"task": "sft"}))  # the shipped data passes


def test_samples_are_greedy_completions_of_held_out_prompts() -> None:
    task = copy.copy(build_task(_config()))  # not the cached instance: it is changed
    assert task.sample_count == 4
    task.sample_count = 2  # generating is slow on a shared CPU
    rows = task.samples(task.load_model(), CPU)
    assert len(rows) == 2
    assert all(r["prompt"].endswith("### Response:\n") and r["reference"] for r in rows)


@pytest.mark.skipif(sys.version_info[:3] != (3, 11, 7), reason="written from Python 3.11.7")
def test_shipped_file_is_what_the_script_writes(tmp_path: Path) -> None:
    from tasks.sft_data import write

    count = write(tmp_path / "out.jsonl")
    assert (tmp_path / "out.jsonl").read_bytes() == shipped_path().read_bytes()
    assert count >= 500 and shipped_path().stat().st_size < 400_000


@pytest.mark.integration
def test_federated_sft_lowers_held_out_response_loss_and_writes_samples(tmp_path: Path) -> None:
    from simulation.local import run_local

    overrides = {
        "task": "sft",
        "num-links": 2,
        "rounds-per-link": 1,
        "local-steps": 5,
        "lr": 5e-3,
        "max-train-blocks": 64,
        "max-eval-blocks": 32,
        "fraction-evaluate": 0.0,
        "export": False,
    }
    result = run_local(overrides, num_nodes=2, out_dir=tmp_path)
    losses = [r["central"]["loss"] for r in result.metrics["rounds"]]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.1, losses
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(
        set(s) == {"prompt", "reference", "generated"} for s in samples
    )
