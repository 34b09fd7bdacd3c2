"""Exports a user can load anywhere: merged-model/ with its tokenizer, adapter_config.json
with PEFT's task type and a base reference that is not this machine's path; and no
transformers loss_type notice per client."""

import json
import logging
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
)
from transformers.utils import logging as hf_logging

from seedlora import adapter_layers, export_peft, inject, record_link, relative_error
from simulation.local import run_local
from tasks import load_causal_lm, portable_name, resolve_model_path
from testing.tiny import GPT2_TARGETS, tiny_gpt2
from tests import test_app_local as app_tests

overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def adapter_config(run_dir: Path) -> dict:
    return json.loads((run_dir / "peft-adapter" / "adapter_config.json").read_text())


@pytest.mark.parametrize("method", ["seedlora", "fedit"])
def test_run_exports_carry_tokenizer_task_type_and_base_name(overrides, tmp_path, method):
    ov = {**overrides, "export": True, "method": method}
    result = run_local(ov, 2, out_dir=tmp_path / "run")
    merged = tmp_path / "run" / "merged-model"
    tok = AutoTokenizer.from_pretrained(merged)
    expected = AutoTokenizer.from_pretrained(overrides["model-name"])
    text = "def f(x):\n    return x + 1\n"
    assert tok(text)["input_ids"] == expected(text)["input_ids"]
    assert AutoModelForCausalLM.from_pretrained(merged) is not None
    config = adapter_config(tmp_path / "run")
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == overrides["model-name"]  # as the user gave it
    assert result.metrics["links_merged"] == (1 if method == "seedlora" else 0)


def random_link(model, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for _, layer in adapter_layers(model):
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    return record_link(model)


def test_the_embedded_base_is_recorded_as_a_checkout_path_not_this_machines(tmp_path):
    absolute = resolve_model_path("embedded")
    base, _ = load_causal_lm("embedded")
    assert base.name_or_path == absolute  # what PEFT would have recorded
    model, _ = load_causal_lm("embedded")
    inject(model, list(GPT2_TARGETS), kind="gaussian", seed=0, rank=2, alpha=4.0)
    out = export_peft(
        base, [random_link(model)], tmp_path / "peft", base_model_name_or_path=portable_name()
    )
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tasks/assets/base-model"
    assert config["task_type"] == "CAUSAL_LM"
    assert not any(absolute in f.read_text() for f in out.glob("*.json"))
    root = Path(__file__).resolve().parents[1]
    assert Path(absolute).resolve() == (root / config["base_model_name_or_path"]).resolve()


def test_a_classifier_exports_as_seq_cls(tmp_path):
    def classifier():
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=97, n_positions=32, n_embd=24, n_layer=2, n_head=2)
        config.num_labels, config.pad_token_id = 3, 0
        return GPT2ForSequenceClassification(config).eval()

    model = classifier()
    targets = list(GPT2_TARGETS)
    inject(model, targets, kind="circulant", seed=0, rank=2, alpha=4.0, modules_to_save=["score"])
    link = random_link(model)
    heads = {"score.weight": model.score.weight.detach() * 1.5}
    with torch.no_grad():
        model.score.weight.copy_(heads["score.weight"])
    out = export_peft(classifier(), [link], tmp_path / "peft", heads=heads)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    loaded = PeftModel.from_pretrained(classifier(), out).eval()
    assert relative_error(loaded(IDS).logits, model(IDS).logits) <= 1e-5


def test_causal_lms_load_with_their_loss_type_and_say_nothing_about_it(tiny_lm_dir):
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect()
    hf_logging.get_logger("transformers").addHandler(handler)
    try:
        hf_logging.warning_once.cache_clear()
        plain = tiny_gpt2()  # what transformers does without the fix: the notice
        plain(input_ids=IDS, labels=IDS)
        assert any("loss_type=None" in r for r in records), records
        records.clear()
        hf_logging.warning_once.cache_clear()
        model, _ = load_causal_lm(tiny_lm_dir)
        assert model.loss_type == "ForCausalLM"
        ids = torch.randint(0, 200, (2, 9))
        assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
        assert not any("loss_type" in r for r in records), records
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
