"""The ServerApp fails, in one line, what must not "complete": a run whose first round or a
whole link accepts no update, more clients than the split has natural ids (before round
1), and a run folder another ServerApp holds. In process, over LocalGrid (no Ray)."""

import json
import logging

import datasets
import pytest
from flwr.app import Context, Error, Message, RecordDict

from client.compose import build_client_app
from contract import protocol as p
from contract.config import RunConfig, RunConfigError
from server import rundir
from server.app import build_server_app
from server.outcome import RunFailed
from simulation.local import RUN_ID, LocalGrid


@pytest.fixture
def overrides(tiny_lm_dir, tiny_text_dir, tmp_path):
    return {
        "model-name": tiny_lm_dir,
        "dataset": tiny_text_dir,
        "partitioner": "iid",
        "num-links": 2,
        "rounds-per-link": 1,
        "local-steps": 1,
        "seq-len": 32,
        "max-train-blocks": 8,
        "max-eval-blocks": 8,
        "rank": 4,
        "fraction-evaluate": 0.0,
        "export": False,
        "output-dir": str(tmp_path / "out"),
        "run-name": "r",
    }


def serve(overrides: dict, grid) -> None:
    """The ServerApp's main, as Flower calls it."""
    context = Context(
        run_id=RUN_ID,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=RunConfig().to_flower(),
    )
    build_server_app(overrides)(grid=grid, context=context)


def crash(msg, context):
    raise RuntimeError("client fell over")


def test_a_run_whose_first_round_accepts_nothing_fails_and_leaves_no_folder(
    overrides, tmp_path, caplog
):
    grid = LocalGrid(build_client_app(overrides), 3)
    grid.apps = dict.fromkeys(grid.apps, crash)
    with caplog.at_level(logging.ERROR, logger="flwr"), pytest.raises(RunFailed) as failed:
        serve(overrides, grid)
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("round 1 accepted no client update (3 sent, 3 rejected, e.g. node")
    assert "client fell over" in message and "first round accepts none fails" in message
    assert grid.rounds_sent == 1  # failed at once, not after every round
    assert f"seedlora: {message}" in caplog.text  # one line in the log
    assert not (tmp_path / "out" / "r").exists()  # nothing of value: no folder left


class SilentGrid(LocalGrid):
    """Clients that never answer within the round (a round-timeout shorter than a round)."""

    def pull_messages(self, message_ids):
        due = [self.queued[i] for i in message_ids if i in self.queued]
        if any(m.metadata.message_type.startswith("train") for m in due):
            return []
        return super().pull_messages(message_ids)


def test_a_round_timeout_shorter_than_a_round_fails_the_run(overrides):
    grid = SilentGrid(build_client_app(overrides), 2)
    with pytest.raises(RunFailed, match=r"2 without a reply in time \(round-timeout 0\.5 s\)"):
        serve({**overrides, "round-timeout": 0.5}, grid)
    assert grid.rounds_sent == 1


@pytest.mark.integration  # trains a round
def test_a_link_that_accepts_nothing_fails_before_it_is_merged(overrides, tmp_path):
    client = build_client_app(overrides)

    def fails_from_link_1(msg: Message, context) -> Message:
        if int(msg.content[p.CONFIG][p.CHAIN_INDEX]) >= 1:
            return Message(Error(code=0, reason="broken"), reply_to=msg)
        return client(msg, context)

    grid = LocalGrid(client, 2)
    grid.apps = dict.fromkeys(grid.apps, fails_from_link_1)
    with pytest.raises(RunFailed, match=r"^link 1 accepted no client update in its 1 round"):
        serve(overrides, grid)
    run_dir = tmp_path / "out" / "r"
    doc = json.loads((run_dir / "metrics.json").read_text())
    assert doc["links_merged"] == 1  # link 0 merged; the empty link 1 was not
    assert [r["accepted"] for r in doc["rounds"][1:]] == [2, 0]
    assert rundir.holds_run(run_dir)  # resume=true continues from here


def test_more_clients_than_natural_ids_are_refused_before_round_1(overrides, tmp_path):
    labelled = tmp_path / "labelled"
    rows = {"text": [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(30)]}
    rows["label"] = [f"pkg{i % 3}" for i in range(30)]
    datasets.Dataset.from_dict(rows).save_to_disk(str(labelled))
    ov = {**overrides, "dataset": str(labelled), "partitioner": "natural"}
    grid = LocalGrid(build_client_app(ov), 4)
    with pytest.raises(RunConfigError, match=r"^nodes: 4 clients, .* only 3 \(values of 'label'\)"):
        serve(ov, grid)
    assert grid.rounds_sent == 0
    assert not (tmp_path / "out" / "r").exists()


def test_a_second_server_on_a_held_folder_is_refused(overrides, tmp_path):
    grid = LocalGrid(build_client_app(overrides), 2)
    held = RunConfig.from_flower(overrides)
    with rundir.claim(held) as folder, pytest.raises(RunConfigError, match="in use by another"):
        serve({**overrides, "run-name": "r"}, grid)
    assert grid.rounds_sent == 0 and folder.name == "r"
