"""Checkpoints: round trip, atomic replacement, fallback when the newest is damaged, the link
log beside them, and checkpoints written before the link log."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from seedlora import ASpec, Link, links_digest
from server import checkpoint
from server.state import ChainState


def link(index: int) -> Link:
    spec = ASpec("circulant", 0, index, 2, "l", 4, 4)
    return Link(8.0, (spec,), {"l": torch.full((4, 2), float(index + 1))})


def make(step: int, links: int = 1) -> ChainState:
    """Round `step` of a run with `links` merged links (a link, once merged, never changes)."""
    return ChainState(
        config={"rank": 2},
        links=[link(i) for i in range(links)],
        arrays={"l.lora_B": torch.full((4, 2), float(step))},
        chain_index=1,
        round_in_link=step,
        global_round=3 + step,
        strategy_state={
            "m_t": {"l.lora_B": np.ones((4, 2), np.float32) * step},
            "momentum_vector": [np.zeros(3, np.float32)],
            "current_arrays": ArrayRecord({"l.lora_B": torch.ones(4, 2)}),
        },
        history=[{"round": step}],
    )


def test_round_trip(tmp_path):
    checkpoint.save(tmp_path, make(1))
    back = checkpoint.load(tmp_path)
    assert (back.chain_index, back.round_in_link, back.global_round) == (1, 1, 4)
    assert links_digest(back.links) == links_digest(make(1).links)
    assert torch.equal(back.arrays["l.lora_B"], make(1).arrays["l.lora_B"])
    assert np.array_equal(back.strategy_state["m_t"]["l.lora_B"], np.ones((4, 2)))
    assert isinstance(back.strategy_state["current_arrays"], ArrayRecord)
    assert isinstance(back.strategy_state["momentum_vector"], list)
    assert back.history == []  # the history is server/report.py's rounds.jsonl
    assert checkpoint.link_path(tmp_path, 0).exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage):
    checkpoint.save(tmp_path, make(1))
    checkpoint.save(tmp_path, make(2))
    newest = tmp_path / checkpoint.FILE
    if damage == "truncate":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "garbage":
        newest.write_bytes(b"\x00" * 100)
    else:
        newest.unlink()
    assert checkpoint.load(tmp_path).round_in_link == 1


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    checkpoint.save(tmp_path, make(1))
    (tmp_path / checkpoint.FILE).write_bytes(b"junk")
    with pytest.raises(FileNotFoundError, match="no usable checkpoint"):
        checkpoint.load(tmp_path)


def test_a_crash_while_writing_leaves_a_good_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, make(1))

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("seedlora.serialize.os.fsync", die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, make(2))
    assert checkpoint.load(tmp_path).round_in_link == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")]


def test_a_temp_file_left_by_a_sigkill_is_removed_by_the_next_write(tmp_path):
    checkpoint.save(tmp_path, make(1))
    orphan = tmp_path / f".{checkpoint.FILE}.abc123"  # what mkstemp leaves after a SIGKILL
    orphan.write_bytes(b"half a checkpoint")
    assert checkpoint.load(tmp_path).round_in_link == 1  # loading ignores it
    checkpoint.save(tmp_path, make(2))
    assert not orphan.exists()
    assert checkpoint.load(tmp_path).round_in_link == 2


def test_the_checkpoint_does_not_grow_with_the_links_and_each_link_is_written_once(tmp_path):
    sizes, written = {}, {}
    for links in range(1, 7):
        checkpoint.save(tmp_path, make(links, links))
        sizes[links] = (tmp_path / checkpoint.FILE).stat().st_size
        written[links] = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "links").iterdir()}
    assert len(set(sizes.values())) == 1, sizes  # same digits, same digest length
    assert sorted(written[6]) == [f"{i:05d}.safetensors" for i in range(6)]
    assert all(written[6][name] == t for name, t in written[1].items())  # never rewritten
    back = checkpoint.load(tmp_path)
    assert back.links.digest == links_digest([link(i) for i in range(6)])
    assert [x.chain_index for x in back.links] == list(range(6))


def test_a_link_file_beyond_the_checkpoint_is_ignored_and_can_be_discarded(tmp_path):
    """A crash between writing link 1 and the checkpoint that counts it."""
    checkpoint.save(tmp_path, make(2, 1))
    checkpoint.save(tmp_path / "other", make(3, 2))  # a link 1 file, copied in beside
    extra = checkpoint.link_path(tmp_path, 1)
    extra.parent.mkdir(exist_ok=True)
    extra.write_bytes(checkpoint.link_path(tmp_path / "other", 1).read_bytes())
    assert len(checkpoint.load(tmp_path).links) == 1
    assert checkpoint.discard_links_from(tmp_path, 1) == [extra]
    assert len(checkpoint.load(tmp_path).links) == 1


@pytest.mark.parametrize("damage", ["delete", "garbage", "other-link"])
def test_a_damaged_link_log_is_a_clear_error_never_a_wrong_chain(tmp_path, damage):
    checkpoint.save(tmp_path, make(1, 3))
    path = checkpoint.link_path(tmp_path, 1)
    if damage == "delete":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 100)
    else:
        path.write_bytes(checkpoint.link_path(tmp_path, 2).read_bytes())
    with pytest.raises(FileNotFoundError, match="no usable checkpoint"):
        checkpoint.load(tmp_path)


def test_a_checkpoint_written_before_the_link_log_still_loads(tmp_path):
    """Links and history inside the checkpoint (the format before the link log); the next
    save writes the links into the log."""
    from seedlora.serialize import links_to_bytes, state_from_bytes, state_to_bytes

    state = make(1, 2)
    checkpoint.save(tmp_path / "new", state)
    tensors, meta = state_from_bytes((tmp_path / "new" / checkpoint.FILE).read_bytes())
    blob = links_to_bytes(state.links)
    tensors["links"] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    meta = {k: v for k, v in meta.items() if k not in ("links_merged", "links_digest")}
    meta["history"] = [{"round": 0}, {"round": 1}]
    (tmp_path / checkpoint.FILE).write_bytes(state_to_bytes(tensors, meta))
    back = checkpoint.load(tmp_path)
    assert back.links.digest == state.links.digest and back.global_round == 4
    assert [r.global_round for r in back.history] == [0, 1]
    checkpoint.save(tmp_path, back)
    assert checkpoint.link_path(tmp_path, 1).exists()
    assert checkpoint.load(tmp_path).links.digest == state.links.digest
