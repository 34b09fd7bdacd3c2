"""Offline from the first import, and the fixtures every test file shares: tiny in-process
models (a GPT-2 with Conv1D layers, a Llama with nn.Linear layers) and a tiny saved model
and text dataset, all from testing.tiny."""

import gc
import os

# Offline from the first import: huggingface_hub, transformers and datasets read these when
# they are imported, so they are set before anything below imports them (and child
# processes inherit them). Set, not defaulted: a developer's HF_HUB_OFFLINE=0 must not
# send the tests online.
HF_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
os.environ.update(HF_OFFLINE_ENV)

from simulation.launch import OFFLINE_ENV  # noqa: E402 - Flower's and Ray's telemetry off

os.environ.update(OFFLINE_ENV)

import pytest  # noqa: E402

from tests.network import refuse_outside_network  # noqa: E402

# Connections beyond this machine are refused from here to the end of the session: the
# test files' module-level code and every test (tests/network.py).
OUTSIDE_REFUSED = refuse_outside_network()

from testing.tiny import (  # noqa: E402
    GPT2_TARGETS,
    LLAMA_TARGETS,
    save_text_dataset,
    save_tiny_lm,
    tiny_gpt2,
    tiny_llama,
)


def pytest_unconfigure(config: pytest.Config) -> None:
    OUTSIDE_REFUSED.undo()


# (factory, adapter targets, an untied head module to train fully)
MODELS = {
    "gpt2": (tiny_gpt2, GPT2_TARGETS, "transformer.ln_f"),
    "llama": (tiny_llama, LLAMA_TARGETS, "model.norm"),
}


@pytest.fixture
def frozen_heap():
    """Every object made before the test is moved out of the collector's sight (gc.freeze),
    so the test's full collections (and gc.get_objects) see only what the test made: the
    same verdict on what the test allocates, in a fraction of the time with torch and
    transformers loaded."""
    gc.freeze()
    yield
    gc.unfreeze()


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
