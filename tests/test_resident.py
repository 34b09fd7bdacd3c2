"""Resident client models (client/resident.py): one adapted base per process, B swapped.

A client process keeps the link's adapted base on its device and swaps only B and heads
between the clients it serves. What must hold: no client's state reaches the next (every
reply equals, bit for bit, the reply of a process that built its model afresh for that one
message), the model is rebuilt when its base or adapters change and only then, and memory
does not grow over rounds. CUDA-only checks are skipped on the CPU.
"""

from __future__ import annotations

import dataclasses
import gc
import random

import pytest
import torch
from flwr.app import Message

from client.compose import build_trainer
from client.links import BaseCache
from client.resident import ModelKey, ResidentModel, private_copy
from contract import protocol as p
from contract.config import RunConfig
from seedlora import (
    adapter_layers,
    inject,
    links_digest,
    rebuild,
    record_link,
    set_chain_index,
)
from seedlora.chain import EMPTY_DIGEST
from seedlora.roles import trained_factor
from seedlora.sharing import shared_copy
from simulation.local import make_grid, run_local
from tasks import TaskConfig
from testing.tiny import GPT2_TARGETS, tiny_gpt2
from tests import test_app_local as app_tests

overrides = app_tests.overrides  # the in-process app fixture (tiny GPT-2, tiny dataset)
CUDA = torch.cuda.is_available()


def _cleared(app, trainer):
    """`app` in a process that forgets its resident model before every message."""

    def wrapped(msg: Message, context):
        trainer.resident.clear()
        return app(msg, context)

    return wrapped


def _trained(ov: dict, num_nodes: int):
    """A trainer of its own and the in-process grid whose nodes it serves."""
    trainer = build_trainer(ov)
    return trainer, make_grid(ov, num_nodes, trainer.app())


def _replies(result) -> list[dict[str, torch.Tensor]]:
    return [r.content[p.ARRAYS].to_torch_state_dict() for r in result.grid.replies]


def _run(ov: dict, *, fresh_each_message: bool, num_nodes: int = 3):
    """One in-process run (and its trainer); Flower samples nodes with `random`, seeded
    here so two runs send the same messages in the same order (the average's float sum
    depends on it)."""
    random.seed(0)
    trainer, grid = _trained(ov, num_nodes)
    if fresh_each_message:
        grid.apps = {node: _cleared(app, trainer) for node, app in grid.apps.items()}
    return run_local(ov, num_nodes, grid=grid, fresh_cache=True), trainer


def _assert_same_replies(ours, fresh) -> None:
    assert len(ours) == len(fresh) > 0
    for a, b in zip(ours, fresh, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k


FAST = {"local-steps": 1, "central-eval": False}  # what is compared is the replies
CASES = {
    "plain": {},
    "hetero-ranks": {"client-ranks": "2,4,1"},  # private copies between full-rank clients
    "bf16-int8": {"precision": "bf16", "upload-codec": "int8", "fraction-evaluate": 1.0},
}


@pytest.mark.integration  # federated rounds in process
@pytest.mark.parametrize("case", list(CASES))
def test_no_client_state_reaches_the_next_client(overrides, case):
    """Three partitions served by one process, two links of two rounds: every reply is the
    one a process gets that built its model for that message alone."""
    ov = {**overrides, **FAST, "num-links": 2, "rounds-per-link": 2, **CASES[case]}
    ours, kept = _run(ov, fresh_each_message=False)
    fresh, cleared = _run(ov, fresh_each_message=True)
    _assert_same_replies(_replies(ours), _replies(fresh))
    messages = sum(r.get("sent", 0) for r in ours.metrics["rounds"])
    assert kept.resident.builds == 2  # one per link
    assert cleared.resident.builds >= messages  # a build for every message


@pytest.mark.integration  # federated rounds in process
def test_rebuilt_when_the_links_digest_changes_and_reused_otherwise(overrides):
    ov = {**overrides, **FAST, "num-links": 3, "rounds-per-link": 2, "fraction-evaluate": 1.0}
    result, trainer = _run(ov, fresh_each_message=False)
    resident = trainer.resident
    assert all(r["accepted"] == 3 for r in result.metrics["rounds"][1:])
    assert resident.builds == 3  # links 0, 1, 2; train and evaluate messages share the model
    assert resident.bases.loads == 1  # W0 loaded once ...
    assert resident.bases.applied == 2  # ... and each merged link applied once
    key = resident.key
    assert key is not None and key.chain_index == 2


_KEY = ModelKey(
    task=TaskConfig(),
    links=EMPTY_DIGEST,
    method="seedlora",
    kind="gaussian",
    seed=0,
    rank=2,
    alpha=4.0,
    chain_index=0,
    targets=GPT2_TARGETS,
    heads=(),
    frozen="A",
    dropout=0.0,
    precision="fp32",
    device="cpu",
    checkpointing=False,
)


def test_any_other_key_change_rebuilds_on_the_same_master(monkeypatch, tmp_path):
    import client.resident

    liger: list[torch.nn.Module] = []  # base-kernels: the build patches its model
    monkeypatch.setattr(client.resident, "use_liger", liger.append)
    resident = ResidentModel()
    key = _KEY
    with resident.use(key, list, tiny_gpt2, tmp_path) as first:
        pass
    with resident.use(key, list, tiny_gpt2, tmp_path) as again:
        assert again is first and resident.builds == 1
    changes = [
        {"method": "ffa"},
        {"kind": "circulant"},
        {"seed": 1},
        {"rank": 4},
        {"alpha": 8.0},
        {"chain_index": 1},
        {"targets": ("c_attn",)},
        {"heads": ("transformer.ln_f",)},
        {"frozen": "B"},
        {"dropout": 0.1},
        {"precision": "bf16"},
        {"checkpointing": True},
        {"kernels": "liger"},
        {"quantization": "4bit"},  # side-path mode (the loader stands in for the quantized W0)
    ]
    for change in changes:
        with resident.use(dataclasses.replace(key, **change), list, tiny_gpt2, tmp_path) as model:
            assert model is not first, change
    assert resident.builds == 1 + len(changes)
    assert len(liger) == 1  # only the build whose key asked for the kernels
    assert resident.bases.loads == resident.bases.maps == 1  # the same master throughout
    assert {f.name for f in dataclasses.fields(ModelKey)} == {"task", "links", "device"} | {
        k for c in changes for k in c
    }


@pytest.mark.parametrize(
    "change", [{}, {"heads": ("transformer.ln_f",)}, {"method": "full"}], ids=["b", "head", "full"]
)
def test_training_the_resident_model_leaves_the_master_alone(change, tmp_path):
    """The resident model shares the master's frozen storage (`shared_copy`, no second
    float32 copy); a step on everything trainable must still leave the master as it was."""
    resident = ResidentModel()
    key = dataclasses.replace(_KEY, **change)
    with resident.use(key, list, tiny_gpt2, tmp_path) as model:
        master = resident.bases.get(key.task, key.links, list, tiny_gpt2, tmp_path)
        before = {k: v.clone() for k, v in master.state_dict().items()}
        trainable = [q for q in model.parameters() if q.requires_grad]
        assert trainable
        ids = torch.randint(0, 64, (2, 8))
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.optim.SGD(trainable, lr=1.0).step()
    after = master.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    shared = {q.data_ptr() for q in master.parameters()}
    assert all(q.data_ptr() not in shared for q in trainable)


def test_shared_copy_shares_storage_not_parameters():
    model = tiny_gpt2()
    twin = shared_copy(model)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert a is not b and a.data_ptr() == b.data_ptr(), name
    assert twin.lm_head.weight is twin.transformer.wte.weight  # ties survive


def chain_links(factory, targets, n: int, frozen: str = "A", kind: str = "gaussian", seed=0):
    """n links of a chain over `factory()`'s model, random trained factors."""
    model = factory()
    inject(model, list(targets), kind=kind, seed=3, rank=2, alpha=4.0, frozen=frozen)
    gen = torch.Generator().manual_seed(seed)
    links = []
    for c in range(n):
        set_chain_index(model, c)
        for _, layer in adapter_layers(model):
            with torch.no_grad():
                trained_factor(layer).normal_(0, 0.5, generator=gen)
        links.append(record_link(model))
    return links


def test_base_cache_applies_only_the_links_it_lacks(tmp_path):
    links = chain_links(tiny_gpt2, GPT2_TARGETS, 3)
    cache = BaseCache()
    calls = []

    def given(ls):
        def f():
            calls.append(len(ls))
            return ls

        return f

    one = cache.get("k", links_digest(links[:1]), given(links[:1]), tiny_gpt2, tmp_path)
    assert cache.get("k", links_digest(links[:1]), given(links[:1]), tiny_gpt2, tmp_path) is one
    three = cache.get("k", links_digest(links), given(links), tiny_gpt2, tmp_path)
    assert three is one and (cache.loads, cache.applied) == (1, 3)
    assert calls == [1, 3]  # links asked for only when the master changed
    expected = rebuild(tiny_gpt2(), links)
    theirs = expected.state_dict()
    for name, a in three.state_dict().items():
        assert torch.equal(a, theirs[name]), name
    other = chain_links(tiny_gpt2, GPT2_TARGETS, 1, seed=9)  # not an extension: from W0
    cache.get("k", links_digest(other), given(other), tiny_gpt2, tmp_path)
    assert cache.loads == 2
    with pytest.raises(ValueError, match="do not hash"):
        cache.get("k", "0" * 64, given(links), tiny_gpt2, tmp_path)


def test_private_copy_shares_only_what_nothing_changes():
    model = tiny_gpt2()
    inject(model, list(GPT2_TARGETS), kind="gaussian", seed=3, rank=4, alpha=8.0)
    copy_ = private_copy(model)
    ours = dict(model.named_parameters())
    for name, q in copy_.named_parameters():
        shared = q is ours[name]
        adapted = any(name.startswith(n + ".") for n, _ in adapter_layers(model))
        assert shared == (not q.requires_grad and not adapted), name
    from seedlora.nested import shrink

    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _, layer in adapter_layers(copy_):
        with torch.no_grad():
            layer.lora_B.normal_()
    shrink(copy_, 2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer.lora_B.shape[1] == 4 for _, layer in adapter_layers(model))


def _live_tensors() -> tuple[int, int]:
    """(storages, bytes) of every tensor alive in this process (made since gc.freeze)."""
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return len(storages), sum(storages.values())


def _memory_probe(app, samples: list):
    def probed(msg: Message, context):
        reply = app(msg, context)
        allocated = torch.cuda.memory_allocated() if CUDA else 0
        samples.append((int(msg.content[p.CONFIG][p.GLOBAL_ROUND]), *_live_tensors(), allocated))
        return reply

    return probed


@pytest.mark.integration  # federated rounds in process
def test_memory_does_not_grow_over_rounds(overrides, frozen_heap):
    ov = {**overrides, "num-links": 1, "rounds-per-link": 4, "save-client-updates": False}
    samples: list = []
    _, grid = _trained(ov, 2)
    grid.apps = {node: _memory_probe(app, samples) for node, app in grid.apps.items()}
    run_local(ov, 2, grid=grid, fresh_cache=True)
    by_round = {}
    for rnd, count, nbytes, allocated in samples:
        by_round.setdefault(rnd, []).append((count, nbytes, allocated))
    assert sorted(by_round) == [1, 2, 3, 4]
    last = [by_round[r][-1] for r in (2, 3, 4)]  # after both clients of the round
    assert last[0] == last[1] == last[2], last


@pytest.mark.integration  # federated rounds in process
def test_gradient_checkpointing_is_a_key_and_changes_no_result(overrides):
    """Recomputed activations are the same numbers: the same B, bit for bit (on the CPU)."""
    assert RunConfig.from_flower({"gradient-checkpointing": True}).train.gradient_checkpointing
    ov = {**overrides, **FAST, "rounds-per-link": 2}
    plain, trainer = _run(ov, fresh_each_message=False, num_nodes=2)
    assert not trainer.resident._model.is_gradient_checkpointing
    checkpointed, trainer = _run(
        {**ov, "gradient-checkpointing": True}, fresh_each_message=False, num_nodes=2
    )
    model = trainer.resident._model
    assert trainer.resident.builds == 1 and model.is_gradient_checkpointing  # enabled once
    _assert_same_replies(_replies(checkpointed), _replies(plain))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_resident_model_and_replica_do_not_grow(overrides, frozen_heap):
    ov = {
        **overrides,
        "num-links": 2,
        "rounds-per-link": 3,
        "precision": "bf16",
        "device": "auto",
        "server-device": "auto",
    }
    samples: list = []
    trainer, grid = _trained(ov, 2)
    grid.apps = {node: _memory_probe(app, samples) for node, app in grid.apps.items()}
    result = run_local(ov, 2, grid=grid, fresh_cache=True)
    assert trainer.resident.builds == 2
    model = trainer.resident._model
    assert next(model.parameters()).device.type == "cuda"
    frozen = {q.dtype for q in model.parameters() if not q.requires_grad}
    assert frozen == {torch.bfloat16}
    allocated = {}
    for rnd, _, _, cuda_bytes in samples:
        allocated[rnd] = cuda_bytes
    # rounds 2-3 of link 0 and 5-6 of link 1: the same resident model, the same memory
    assert allocated[2] == allocated[3] and allocated[5] == allocated[6], allocated
    assert allocated[5] <= allocated[2] + 16 * 2**20, allocated
    assert all(r["central"] for r in result.metrics["rounds"])
