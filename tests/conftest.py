"""Offline from the first import, and the fixtures every test file shares: tiny in-process
models (a GPT-2 with Conv1D layers, a Llama with nn.Linear layers) and a tiny saved model
and text dataset, all from testing.tiny."""

import contextlib
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

import torch  # noqa: E402

from testing.tiny import (  # noqa: E402
    GPT2_TARGETS,
    LLAMA_TARGETS,
    save_text_dataset,
    save_tiny_lm,
    tiny_gpt2,
    tiny_llama,
)


def pytest_configure(config: pytest.Config) -> None:
    """One garbage collection where pytest makes five at the end of the session to surface
    exceptions raised in finalizers: each is a full pass over torch's and transformers'
    objects. One pass still runs every finalizer of what the tests left behind."""
    with contextlib.suppress(ImportError):  # pytest's own knob for that count
        from _pytest.unraisableexception import gc_collect_iterations_key

        config.stash[gc_collect_iterations_key] = 1


def pytest_collection_finish(session: pytest.Session) -> None:
    """What importing the test files made (modules, classes, functions: it lives as long as
    the session) is frozen, so every later full collection (the resident model's rebuild
    calls one) scans only what the tests make, and what they leave behind is collected as
    before."""
    freeze_survivors()


def pytest_unconfigure(config: pytest.Config) -> None:
    OUTSIDE_REFUSED.undo()


# One intra-op thread: the tiny models gain nothing from two, and on a busy 2-core machine
# a second OpenMP thread spins against the other processes (test_scaling under load ~5:
# 29 s of CPU and 64 s with two threads, 9 s and 15 s with one). Child processes keep
# their own defaults.
torch.set_num_threads(1)


# (factory, adapter targets, an untied head module to train fully)
MODELS = {
    "gpt2": (tiny_gpt2, GPT2_TARGETS, "transformer.ln_f"),
    "llama": (tiny_llama, LLAMA_TARGETS, "model.norm"),
}


def freeze_survivors() -> None:
    """Collect garbage, then move every object still alive out of the collector's sight
    (gc.freeze): later full collections, and gc.get_objects, see only what is made after.
    Nothing is ever unfrozen (that would thaw every earlier freeze too)."""
    gc.collect()
    gc.freeze()


@pytest.fixture
def frozen_heap():
    """The test's collections scan only what the test makes: the same verdict on what it
    allocates, in a fraction of the time with torch and transformers loaded."""
    freeze_survivors()


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
