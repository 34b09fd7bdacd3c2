"""Tiny in-process models (a GPT-2 with Conv1D layers, a Llama with nn.Linear layers) and
a tiny saved model and text dataset, all from testing.tiny."""

import os

# Offline from the first import: transformers and datasets read these when imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from testing.tiny import (  # noqa: E402
    GPT2_TARGETS,
    LLAMA_TARGETS,
    save_text_dataset,
    save_tiny_lm,
    tiny_gpt2,
    tiny_llama,
)

# (factory, adapter targets, an untied head module to train fully)
MODELS = {
    "gpt2": (tiny_gpt2, GPT2_TARGETS, "transformer.ln_f"),
    "llama": (tiny_llama, LLAMA_TARGETS, "model.norm"),
}


@pytest.fixture(params=sorted(MODELS))
def arch(request):
    """(factory, targets, head) for each tiny architecture."""
    return MODELS[request.param]


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny-lm")))


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    """A small `datasets` text dataset saved with save_to_disk (the local-dataset path)."""
    return str(save_text_dataset(tmp_path_factory.mktemp("tiny-text"), min_rows=80, chunk=1500))


@pytest.fixture(scope="session", autouse=True)
def private_link_cache(tmp_path_factory):
    """Keep the clients' link cache out of the user's home during tests."""
    os.environ["SEEDLORA_CACHE"] = str(tmp_path_factory.mktemp("link-cache"))
