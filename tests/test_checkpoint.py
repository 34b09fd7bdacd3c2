"""Checkpoints: round trip, atomic replacement, fallback when the newest is damaged."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from seedlora import ASpec, Link, links_digest
from server import checkpoint
from server.state import ChainState


def make(step: int) -> ChainState:
    link = Link(8.0, (ASpec("circulant", 0, 0, 2, "l", 4, 4),), {"l": torch.full((4, 2), step)})
    return ChainState(
        config={"rank": 2},
        links=[link],
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
    assert back.history == [{"round": 1}]


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
