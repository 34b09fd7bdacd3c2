"""One float32 master per host (client/masters.py, seedlora/mapped.py).

What must hold: the mapped master is the in-memory rebuilt base bit for bit (every frozen
role), processes of a host share its pages (PSS counts them once), a crash mid-write never
leaves a readable partial master, and the previous link's file goes once the next is
complete. The PSS check reads /proc (Linux only).
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing as mp
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from client.links import BaseCache, BaseSource
from client.masters import MasterStore
from client.resident import ResidentModel
from seedlora import links_digest, rebuild
from seedlora.grouped import group_siblings
from seedlora.mapped import fill, stored_tensors, write_merged
from testing.tiny import GPT2_TARGETS, LLAMA_TARGETS, tiny_gpt2, tiny_llama
from tests import master_child as child
from tests.test_resident import _KEY, chain_links

LINUX = sys.platform.startswith("linux")


def _same(model: nn.Module, expected: nn.Module) -> None:
    theirs = dict(expected.named_parameters(remove_duplicate=False))
    theirs |= dict(expected.named_buffers(remove_duplicate=False))
    ours = dict(model.named_parameters(remove_duplicate=False))
    ours |= dict(model.named_buffers(remove_duplicate=False))
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        a, b = tensor.detach(), theirs[name].detach()
        assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


@pytest.mark.parametrize(
    "arch,frozen,kind",
    [
        ("gpt2", "A", "gaussian"),
        ("gpt2", "B", "circulant"),
        ("llama", "AB", "gaussian"),
        ("llama", "A", "random-block"),
    ],
)
def test_mapped_master_is_the_rebuilt_base_bit_for_bit(tmp_path, arch, frozen, kind):
    factory, targets = {"gpt2": (tiny_gpt2, GPT2_TARGETS), "llama": (tiny_llama, LLAMA_TARGETS)}[
        arch
    ]
    links = chain_links(factory, targets, 3, frozen, kind)
    cache = BaseCache()
    first = cache.get("k", links_digest(links[:1]), lambda: links[:1], factory, tmp_path)
    master = cache.get("k", links_digest(links), lambda: links, factory, tmp_path)
    assert master is first and (cache.loads, cache.applied, cache.writes) == (1, 3, 2)
    expected = rebuild(factory(), links)
    _same(master, expected)
    ties = [n for n, _ in factory().named_parameters(remove_duplicate=False)]
    assert [n for n, _ in master.named_parameters(remove_duplicate=False)] == ties
    if arch == "gpt2":
        assert master.lm_head.weight is master.transformer.wte.weight  # the tie survives
    # a second process's view: mapped into a skeleton, no links asked for
    other = BaseCache()
    name = BaseSource.of(factory).name  # the same source, with a meta skeleton
    skeleton = BaseSource(factory, skeleton=lambda: factory().to("meta"), name=name)
    mapped = other.get("k", links_digest(links), _never, skeleton, tmp_path)
    assert (other.loads, other.writes, other.maps) == (0, 0, 1)
    _same(mapped, expected)
    # safetensors reads the file as it is
    with safe_open(str(cache.path), "pt") as f:
        weight = next(n for n in list(f.keys()) if n.endswith("weight"))
        assert torch.equal(f.get_tensor(weight), expected.get_parameter(weight))
    # copy-on-write: a stray write in one process never reaches the file
    param = next(mapped.parameters())
    with torch.no_grad():
        param.add_(1.0)
    _same(BaseCache().get("k", links_digest(links), _never, skeleton, tmp_path), expected)


def test_a_bf16_checkpoint_writes_the_float32_master_of_its_cast(tmp_path):
    """A checkpoint loaded as stored (bf16) gives the master `.float()` then the merges give,
    bit for bit, and the model it was read from takes the float32 tensors."""
    links = chain_links(tiny_llama, LLAMA_TARGETS, 2)

    def stored():
        return tiny_llama().to(torch.bfloat16)

    cache = BaseCache()
    master = cache.get("k", links_digest(links), lambda: links, stored, tmp_path)
    assert {q.dtype for q in master.parameters()} == {torch.float32}
    _same(master, rebuild(stored().float(), links))


def _never():
    raise AssertionError("the links were asked for although the master file exists")


def test_a_master_is_written_from_the_longest_prefix_on_disk(tmp_path):
    """A process without a master of its own extends the folder's nearest one."""
    links = chain_links(tiny_gpt2, GPT2_TARGETS, 3)
    BaseCache().get("k", links_digest(links[:2]), lambda: links[:2], tiny_gpt2, tmp_path)
    late = BaseCache()
    master = late.get("k", links_digest(links), lambda: links, tiny_gpt2, tmp_path)
    assert (late.loads, late.applied) == (0, 1)  # only the third link merged
    _same(master, rebuild(tiny_gpt2(), links))
    with pytest.raises(ValueError, match="do not hash"):
        late.get("k", "0" * 64, lambda: links, tiny_gpt2, tmp_path)


def test_sources_and_weight_fingerprints_name_their_own_masters(tmp_path):
    """A master of other weights (another loader, changed files) is never mapped."""
    cache = BaseCache()
    gpt = cache.get("k", links_digest([]), list, tiny_gpt2, tmp_path)
    assert cache.get("k", links_digest([]), list, tiny_gpt2, tmp_path) is gpt
    llama = BaseCache().get("k", links_digest([]), list, tiny_llama, tmp_path)
    assert type(llama) is not type(gpt)
    older = BaseSource(tiny_gpt2, fingerprint=lambda: "v1", name="w")
    newer = BaseSource(lambda: tiny_gpt2(seed=1), fingerprint=lambda: "v2", name="w")
    a = BaseCache().get("k", links_digest([]), list, older, tmp_path)
    b = BaseCache().get("k", links_digest([]), list, newer, tmp_path)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)


def test_the_previous_links_master_is_evicted_once_the_next_is_complete(tmp_path):
    """A writer removes its chain's earlier masters and any master no process maps; a
    process that still maps a removed file keeps its pages."""
    links = chain_links(tiny_gpt2, GPT2_TARGETS, 3)
    other = chain_links(tiny_gpt2, GPT2_TARGETS, 2, seed=5)  # another run on this host
    store = MasterStore.of(tmp_path, BaseSource.of(tiny_gpt2).key("k"))
    run = BaseCache()
    run.get("k", links_digest(links[:1]), lambda: links[:1], tiny_gpt2, tmp_path)
    first = run.path
    assert first == store.path(links_digest(links[:1]))
    holder = BaseCache()
    holder.get("k", links_digest(other[:1]), lambda: other[:1], tiny_gpt2, tmp_path)
    before = [q.clone() for q in holder._model.parameters()]
    writer = BaseCache()
    writer.get("k", links_digest(other), lambda: other, tiny_gpt2, tmp_path)
    assert writer.applied == 1  # from the prefix holder wrote
    assert not holder.path.exists()  # a prefix: removed although holder maps it ...
    assert all(torch.equal(a, b) for a, b in zip(before, holder._model.parameters(), strict=True))
    assert first.exists()  # ... another chain's master that a process maps: kept
    orphan = writer.path
    writer.clear()  # nobody maps `other`'s master now
    run.get("k", links_digest(links[:2]), lambda: links[:2], tiny_gpt2, tmp_path)
    assert not first.exists()  # the previous link's master, once the next one is complete
    assert not orphan.exists()  # unused
    keeper = BaseCache()
    keeper.get("k", links_digest(other), lambda: other, tiny_gpt2, tmp_path)
    run.get("k", links_digest(links), lambda: links, tiny_gpt2, tmp_path)
    masters = sorted(q.name for q in store.dir.glob("*.safetensors"))
    assert masters == sorted([keeper.path.name, run.path.name])


@pytest.mark.skipif(not LINUX, reason="reads /proc/self/maps (Linux)")
def test_a_process_lets_go_of_the_previous_links_master(tmp_path):
    """After a link change a process maps only the new master, even with automatic gc off
    (the old model's sibling groups are reference cycles that held the old mapping)."""
    links = chain_links(tiny_llama, LLAMA_TARGETS, 2)
    resident = ResidentModel()
    key = dataclasses.replace(_KEY, task="llama", seed=3, targets=LLAMA_TARGETS)  # any
    # hashable names the source here
    gc.disable()
    try:
        paths = []
        for k in range(3):
            wanted = links[:k]
            key = dataclasses.replace(key, links=links_digest(wanted), chain_index=k)
            with resident.use(key, lambda w=wanted: w, tiny_llama, tmp_path) as model:
                assert group_siblings(model)  # as training does: cycles layer <-> group
            del model  # as a message handler's locals go when it returns
            paths.append(resident.bases.path)
            maps = Path("/proc/self/maps").read_text().splitlines()
            mapped = {line.split(maxsplit=5)[-1] for line in maps if str(tmp_path) in line}
            assert mapped == {str(resident.bases.path)}, mapped
    finally:
        gc.enable()
    assert len(set(paths)) == 3 and not paths[0].exists()


# --- processes (children in tests/master_child.py) ----------------------------------


@pytest.mark.integration  # spawns processes
@pytest.mark.skipif(not LINUX, reason="PSS is read from /proc (Linux)")
def test_two_processes_share_one_master(tmp_path):
    """Two processes that map one master grow by one master between them, not two."""
    source = BaseSource(child.wide_model, child.wide_skeleton, name="wide")
    digest = links_digest([])
    cache = BaseCache()
    cache.get("wide", digest, list, source, tmp_path)  # written once, here
    folder = str(cache.path.parent)
    size = sum(t.numel() * t.element_size() for _, t in stored_tensors(child.wide_model())[0])
    ctx = mp.get_context("spawn")
    ready, go, out = ctx.Barrier(2), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=child.map_and_report, args=(folder, digest, ready, go, out))
        for _ in range(2)
    ]
    for proc in procs:
        proc.start()
    try:
        reports = [out.get(timeout=120) for _ in procs]
    finally:
        go.set()
        for proc in procs:
            proc.join(timeout=60)
    assert reports[0][2] == reports[1][2]  # the same numbers
    growth = sum(r[1] for r in reports)
    assert growth < 1.3 * size, (growth / size, reports)
    assert all(r[1] > 0.3 * size for r in reports)  # each maps (and counts half of) it


@pytest.mark.integration  # spawns a process
def test_a_crash_mid_write_leaves_no_readable_master(tmp_path):
    source = BaseSource(child.wide_model, child.wide_skeleton, name="wide")
    store = MasterStore.of(tmp_path, source.key("wide"))
    digest = links_digest([])
    proc = mp.get_context("spawn").Process(
        target=child.crash_mid_write, args=(str(store.dir), digest)
    )
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL
    assert not store.path(digest).exists()
    partial = [q for q in store.dir.iterdir() if q.name != ".lock"]
    assert len(partial) == 1 and partial[0].name.startswith(".")  # the temp file
    size = sum(t.numel() * t.element_size() for _, t in stored_tensors(child.wide_model())[0])
    assert 0 < partial[0].stat().st_size < size
    assert store.open(digest) is None
    cache = BaseCache()
    master = cache.get("wide", digest, list, source, tmp_path)
    assert cache.writes == 1 and not partial[0].exists()  # the next writer cleans up
    _same(master, child.wide_model())


def test_write_merged_leaves_a_mapped_source_alone(tmp_path):
    """A master written from a mapped one changes no page of it (merges go to clones)."""
    links = chain_links(tiny_llama, LLAMA_TARGETS, 2)
    store = MasterStore(tmp_path)
    write_merged(store.path("w0"), tiny_llama())
    mapped = store.open("w0")
    assert mapped is not None
    source = fill(tiny_llama().to("meta"), mapped.tensors, mapped.aliases)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    write_merged(store.path("merged"), source, links)
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())
    merged = rebuild(tiny_llama(), links)
    expected = dict(merged.named_parameters()) | dict(merged.named_buffers())
    with safe_open(str(store.path("merged")), "pt") as f:
        names = set(f.keys())
        assert names == set(expected)
        for name in names:
            assert torch.equal(f.get_tensor(name), expected[name]), name
