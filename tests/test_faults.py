"""Faults with real processes on 127.0.0.1: a SuperNode SIGKILLed mid-round, the ServerApp
SIGKILLed mid-run and resumed, a node that restarts with an empty cache and catches up,
and a checkpoint writer killed between its temp write and its rename. Every process
started here is stopped by pid, also on failure."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from seedlora import links_digest
from seedlora.serialize import state_from_bytes
from server import checkpoint
from simulation.launch import LaunchError
from tests.processes import Federation, read_json, wait_for

pytestmark = pytest.mark.integration

ROUND_TIMEOUT = 60  # seconds; a live node's round took 15-22 s on a loaded 2-core CPU


def updates(run_dir, rnd: int) -> tuple[dict, dict]:
    """(tensors, partition -> weight) of the accepted client updates of one round."""
    path = run_dir / "client-updates" / f"round-{rnd:04d}.safetensors"
    tensors, meta = state_from_bytes(path.read_bytes())
    return tensors, {int(k): v for k, v in meta["weights"].items()}


def node_id(fed: Federation, name: str) -> int:
    """The node id a SuperNode was given, from its log."""
    found = wait_for(
        lambda: re.search(r"SuperNode ID: (\d+)", fed.log(name)), 120, f"{name}'s node id"
    )
    return int(found.group(1))


def test_lost_node_server_kill_resume_and_late_joiner(tmp_path, tiny_lm_dir, tiny_text_dir):
    out = tmp_path / "outputs"
    run_dir = out / "faults"
    config = (
        f"model-name='{tiny_lm_dir}' dataset='{tiny_text_dir}' partitioner='iid' "
        f"output-dir='{out}' run-name='faults' num-links=3 rounds-per-link=1 local-steps=2 "
        "seq-len=32 max-train-blocks=16 max-eval-blocks=8 rank=4 alpha=8.0 a-kind='gaussian' "
        f"min-available-nodes=2 min-replies=2 round-timeout={ROUND_TIMEOUT} "
        "fraction-evaluate=0.0 save-client-updates=true export=false"
    )
    with Federation(tmp_path) as fed:
        fed.start_superlink()
        for i in range(3):
            fed.start_supernode(f"node-{i}", i, 3, cache=tmp_path / f"cache-{i}")
        lost_id = node_id(fed, "node-2")
        first = fed.submit(config)

        # 1. node-2 dies (SIGKILL, with its ClientApp) holding its round-1 train message.
        wait_for(lambda: "Receiving: train message" in fed.log("node-2"), 300, "round 1")
        fed.kill("node-2")

        # 2. The ServerApp dies after link 1 is merged and checkpointed, in round 3.
        def merged_two():
            doc = read_json(run_dir / "metrics.json")
            return doc and doc["links_merged"] >= 2 and checkpoint.load(run_dir).chain_index == 2

        wait_for(merged_two, 300, "two merged links")
        before = checkpoint.load(run_dir)
        os.kill(wait_for(fed.serverapp_pid, 30, "the ServerApp process"), signal.SIGKILL)
        first_log = fed.run_log(first)
        with contextlib.suppress(LaunchError):  # Flower may have marked it failed already
            fed.flwr("stop", first, "launch")

        # 3. node-2 comes back with an empty link cache; the run resumes from the checkpoint.
        fed.start_supernode("node-2b", 2, 3, cache=tmp_path / "cache-2-new")
        node_id(fed, "node-2b")  # registered before the resumed run samples its nodes
        resumed = fed.submit(config + " resume=true")
        status = fed.wait_finished(resumed, 400, alive=("superlink", "node-0", "node-1"))
        logs = fed.run_log(resumed)
        assert status == "finished:completed", f"{status}: {logs[-4000:]}"

    doc = read_json(run_dir / "metrics.json")
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]  # none lost, none run twice
    # Round 1 finished with the two live nodes once round-timeout passed; node-2 is named.
    assert rounds[1]["accepted"] == 2 and not rounds[1]["skipped"]
    assert rounds[1]["lost"] == [lost_id], rounds[1]
    # Round 2 samples it again only if Flower has not yet marked it offline.
    assert rounds[2]["accepted"] == 2 and rounds[2]["lost"] in ([], [lost_id]), rounds[2]
    assert re.search(rf"round 1: no reply from node\(s\) [\d, ]*{lost_id}", first_log), first_log
    assert sorted(updates(run_dir, 1)[1]) == [0, 1]  # the dead node's work counted nowhere
    assert sorted(updates(run_dir, 2)[1]) == [0, 1]
    # After the resume, the restarted node caught up from the two links and was accepted.
    tensors, weights = updates(run_dir, 3)
    assert sorted(weights) == [0, 1, 2] and rounds[3]["accepted"] == 3
    assert "resumed at link 2 round 0" in logs

    final = checkpoint.load(run_dir)
    assert [link.chain_index for link in final.links] == [0, 1, 2]
    assert links_digest(final.links[:2]) == links_digest(before.links)
    assert doc["links_digest"] == links_digest(final.links)
    # Link 2 is exactly the weighted mean of round 3's accepted updates: merged once.
    total = sum(weights.values())
    for layer, b in final.links[2].factors.items():
        mean = sum(w / total * tensors[f"{i}/{layer}.lora_B"].double() for i, w in weights.items())
        assert torch.allclose(b.double(), mean, rtol=1e-5, atol=1e-7), layer


WRITER = textwrap.dedent(
    """
    import os, sys, time, pathlib
    import torch
    from seedlora import ASpec, Link
    from server import checkpoint
    from server.state import ChainState

    def make(step):
        spec = ASpec("circulant", 0, 0, 2, "l", 4, 4)
        link = Link(8.0, (spec,), {"l": torch.ones(4, 2)})  # merged once: never changes
        return ChainState({}, [link], {"l.lora_B": torch.ones(4, 2) * step},
                          0, step, step, {}, [])

    directory, marker = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    checkpoint.save(directory, make(1))
    checkpoint.save(directory, make(2))

    def stall(fd):  # the temp file is written, not yet renamed: let the parent kill us
        marker.touch()
        time.sleep(120)

    os.fsync = stall
    checkpoint.save(directory, make(3))
    """
)


def test_sigkill_during_checkpoint_write_leaves_the_previous_good_one(tmp_path):
    marker = tmp_path / "writing"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path / "run"), str(marker)],
        start_new_session=True,
    )
    try:
        wait_for(marker.exists, 120, "the writer to reach its third save")
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    leftovers = [p.name for p in (tmp_path / "run").iterdir()]
    assert any(name.startswith(".checkpoint") for name in leftovers)  # the half-written temp
    ckpt = checkpoint.load(tmp_path / "run")
    assert ckpt.global_round == 2  # the last complete checkpoint, never the half one
    assert torch.equal(ckpt.arrays["l.lora_B"], torch.full((4, 2), 2.0))
