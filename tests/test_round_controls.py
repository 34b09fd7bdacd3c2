"""In-process runs of the LLM fine-tuning knobs: the server's lr schedule reaches the
clients' optimizers, `comm-budget-mb` ends a run cleanly, and every round's scalars land
in TensorBoard event files."""

import builtins
import logging

import pytest
import torch
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from client import local
from contract import protocol as p
from contract.config import RunConfig
from contract.round_record import Replies, RoundRecord
from seedlora import trainable_state
from server import tracking
from server.outcome import STOPPED_BUDGET
from server.report import read_rounds
from server.schedule import round_lr
from simulation.local import make_grid, run_local
from tests import test_app_local as app_tests

overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)


def spy_optimizer_lrs(monkeypatch) -> list[float]:
    """Every lr a client optimizer is built with, in order."""
    seen: list[float] = []
    build = local._optimizer

    def spy(cfg, params, lr, **options):
        seen.append(lr)
        return build(cfg, params, lr, **options)

    monkeypatch.setattr(local, "_optimizer", spy)
    return seen


def events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / tracking.TB_DIR))
    acc.Reload()
    return acc


def scalar(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_clients_train_at_the_scheduled_lr_and_tensorboard_has_every_round(
    overrides, tmp_path, monkeypatch, caplog
):
    """Cosine over 3 rounds with 1 warmup round: the server sends lr/2, lr, lr-min; node 102
    gets its message's lr tripled on the way, and its optimizer follows the message, not
    the run config. The round entries, log lines and event files carry the same lrs."""
    ov = {
        **overrides,
        "rounds-per-link": 3,
        "lr-schedule": "cosine",
        "lr": 4e-3,
        "lr-min": 1e-3,
        "warmup-rounds": 1,
    }
    seen = spy_optimizer_lrs(monkeypatch)
    grid = make_grid(ov, 2)
    honest = grid.apps[102]

    def tripled(msg, context):
        if msg.metadata.message_type.startswith("train"):
            msg.content[p.CONFIG][p.LR] = 3 * float(msg.content[p.CONFIG][p.LR])
        return honest(msg, context)

    grid.apps[102] = tripled
    with caplog.at_level(logging.INFO, logger="flwr"):
        result = run_local(ov, grid=grid, out_dir=tmp_path / "run")
    expected = [2e-3, 4e-3, 1e-3]
    cfg = RunConfig.from_flower(ov)
    assert [round_lr(cfg.train, g, 3) for g in (1, 2, 3)] == pytest.approx(expected)
    per_round = [sorted(seen[i : i + 2]) for i in (0, 2, 4)]  # nodes 101 and 102, any order
    assert per_round == [pytest.approx([lr, 3 * lr]) for lr in expected]
    rounds = result.metrics["rounds"][1:]
    assert [r["lr"] for r in rounds] == pytest.approx(expected)
    lines = [r.getMessage() for r in caplog.records]
    assert any("| lr 0.001 |" in x for x in lines), lines

    acc = events(tmp_path / "run")
    assert scalar(acc, "lr") == pytest.approx({1: 2e-3, 2: 4e-3, 3: 1e-3})
    central = scalar(acc, "central/loss")
    assert sorted(central) == [0, 1, 2, 3]  # round 0: the base model
    for entry in result.metrics["rounds"]:
        assert central[entry["round"]] == pytest.approx(entry["central"]["loss"])
    assert scalar(acc, "train/loss") == pytest.approx({r["round"]: r["train_loss"] for r in rounds})
    up = scalar(acc, "comm/mb_up_total")
    assert up == pytest.approx({r["round"]: r["bytes_up_total"] / 1e6 for r in rounds})
    assert up[3] > up[2] > up[1] > 0
    assert set(scalar(acc, "time/round_s")) == {1, 2, 3}
    assert "phases/train_exchange" in acc.Tags()["scalars"]


def test_tensorboard_off_or_missing_writes_no_events(tmp_path, monkeypatch, caplog):
    off = tracking.RoundScalars(tmp_path, enabled=False, resumed_at=None)
    off.write(RoundRecord(1, 0, lr=0.1))
    assert off.writer is None and not (tmp_path / tracking.TB_DIR).exists()

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with caplog.at_level(logging.INFO, logger="flwr"):
        missing = tracking.RoundScalars(tmp_path, enabled=True, resumed_at=None)
    missing.write(RoundRecord(1, 0, lr=0.1))
    assert missing.writer is None and not (tmp_path / tracking.TB_DIR).exists()
    assert any("tensorboard not installed" in r.getMessage() for r in caplog.records)


def test_a_resumed_run_replaces_the_rounds_after_its_checkpoint(tmp_path, monkeypatch):
    """Rounds 1-3 logged, the checkpoint at round 1: on resume rounds 2-3 run again, and
    TensorBoard shows the new round 2 and no stale round 3."""
    from tensorboard.summary.writer import event_file_writer

    # Event files are named by the second and then a process-wide writer count, and read in
    # name order: within one second a 10th writer ('.10') sorts before a 9th ('.9'). Count
    # from 0 here, so this test's files sort as written whatever earlier tests made.
    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))
    first = tracking.RoundScalars(tmp_path, enabled=True, resumed_at=None)
    for g in (1, 2, 3):
        first.write(RoundRecord(g, 0, lr=float(g)))
    first.close()
    resumed = tracking.RoundScalars(tmp_path, enabled=True, resumed_at=1)
    resumed.write(RoundRecord(2, 0, lr=20.0))
    resumed.close()
    assert scalar(events(tmp_path), "lr") == {1: 1.0, 2: 20.0}
    fresh = tracking.RoundScalars(tmp_path, enabled=True, resumed_at=None)  # a new run here
    fresh.write(RoundRecord(1, 0, lr=5.0))
    fresh.close()
    assert scalar(events(tmp_path), "lr") == {1: 5.0}


def test_round_scalars_name_every_per_round_value():
    replies = Replies(
        round_in_link=1,
        num_links=3,
        rounds_per_link=3,
        sent=2,
        accepted=2,
        train_metrics={p.TRAIN_LOSS: 2.5},
        client_eval={"loss": 2.0, "num-examples": 8},
        bytes_up=2_000_000,
        bytes_down=3_000_000,
        bytes_up_total=8_000_000,
        bytes_down_total=12_000_000,
    )
    record = RoundRecord(
        global_round=4,
        chain_index=1,
        central={"loss": 1.5, "perplexity": 4.48},
        lr=1e-3,
        wall_time=3.5,
        phases={"configure": 0.1},
        replies=replies,
    )
    assert tracking.round_scalars(record) == {
        "train/loss": 2.5,
        "client_eval/loss": 2.0,
        "central/loss": 1.5,
        "central/perplexity": 4.48,
        "lr": 1e-3,
        "comm/mb_up": 2.0,
        "comm/mb_down": 3.0,
        "comm/mb_up_total": 8.0,
        "comm/mb_down_total": 12.0,
        "clients/accepted": 2.0,
        "time/round_s": 3.5,
        "phases/configure": 0.1,
    }
    base = RoundRecord(global_round=0, chain_index=0, central={"loss": 3.0})
    assert tracking.round_scalars(base) == {"central/loss": 3.0}


def round_mb(overrides, tmp_path) -> float:
    """MB up + down of a first round with 2 nodes, every reply accepted: each node gets the
    global trainable state and sends its own back (4 copies; no links in link 0)."""
    from server.compose import build_server

    cfg = RunConfig.from_flower({**overrides, "central-eval": False})
    state = trainable_state(build_server(cfg, 1, tmp_path).model)
    return 4 * sum(v.numel() * 4 for v in state.values()) / 1e6


def test_the_comm_budget_stops_mid_link_and_merges_the_open_link(overrides, tmp_path, caplog):
    """A budget of 1.5 rounds' traffic: round 2 (link 0, 2 of 3) crosses it, so the run
    stops after round 2 with link 0 merged from its 2 rounds, exits normally and says so."""
    ov = {**overrides, "num-links": 2, "rounds-per-link": 3}
    budget = 1.5 * round_mb(ov, tmp_path)
    ov["comm-budget-mb"] = budget
    with caplog.at_level(logging.INFO, logger="flwr"):
        result = run_local(ov, 2, out_dir=tmp_path / "run")
    doc = result.metrics
    rounds = doc["rounds"][1:]
    assert [r["round"] for r in rounds] == [1, 2]
    totals = [r["mb_up_total"] + r["mb_down_total"] for r in rounds]
    assert totals[0] < budget <= totals[1]
    # the estimate above, less each array's serialisation header (14% for these tiny B's)
    assert totals[0] == pytest.approx(budget / 1.5, rel=0.25)
    assert doc["stopped"] == STOPPED_BUDGET
    assert doc["links_merged"] == 1
    lines = [r.getMessage() for r in caplog.records]
    stop = [x for x in lines if x.startswith("communication budget reached")]
    assert len(stop) == 1 and "after round 2 of 6 (links merged: 1)" in stop[0], lines

    links = sorted((tmp_path / "run" / "links").iterdir())
    assert len(links) == 1  # the link log the exports are built from holds link 0
    history = read_rounds(tmp_path / "run" / "rounds.jsonl")
    assert [r.global_round for r in history] == [0, 1, 2]


@pytest.mark.integration
def test_a_budget_stopped_run_exports_its_link_and_resumes_without_new_rounds(overrides, tmp_path):
    """Stopped in round 1 of 2 x 2: the merged model and the PEFT adapter both hold link 0
    (equal logits, not the base's), a resume runs no round and changes nothing, and a
    resume without the budget trains the next link."""
    ov = {**overrides, "num-links": 2, "rounds-per-link": 2, "export": True}
    ov["comm-budget-mb"] = 0.5 * round_mb(ov, tmp_path)  # reached in round 1
    run_dir = tmp_path / "run"
    first = run_local(ov, 2, out_dir=run_dir)
    assert [r["round"] for r in first.metrics["rounds"]] == [0, 1]
    assert first.metrics["stopped"] == STOPPED_BUDGET and first.metrics["links_merged"] == 1

    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(overrides["model-name"]).eval()
    with torch.no_grad():
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, run_dir / "peft-adapter").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged-model").eval()(ids)
    torch.testing.assert_close(merged.logits, peft, rtol=1e-4, atol=1e-5)
    assert float((merged.logits - plain).abs().max()) > 1e-4  # link 0 is in the export

    again = run_local({**ov, "resume": True, "export": False}, 2, out_dir=run_dir)
    assert again.grid.rounds_sent == 0
    assert again.metrics["rounds"] == first.metrics["rounds"]
    assert again.metrics["links_digest"] == first.metrics["links_digest"]
    assert again.metrics["stopped"] == STOPPED_BUDGET

    more = run_local(
        {**ov, "resume": True, "export": False, "comm-budget-mb": 0.0}, 2, out_dir=run_dir
    )
    assert [r["round"] for r in more.metrics["rounds"]] == [0, 1, 2, 3]  # link 1: 2 rounds
    assert more.metrics["links_merged"] == 2 and more.metrics["stopped"] is None
