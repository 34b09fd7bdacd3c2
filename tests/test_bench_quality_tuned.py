"""bench.quality_tuned: the lr sweep on the validation half, the choice, the final seeds on
the test half, the goal verdict and the Pareto plot, at the smallest size."""

from __future__ import annotations

import json
import math
import pickle

import pytest

from bench import quality, quality_tuned
from tests.test_bench_pipeline import TINY_QUALITY


def _args(tmp_path, model: str, data: str, *more: str):
    sets = [f"model-name={model}", f"dataset={data}", *TINY_QUALITY]
    argv = ["--cells", "code-lm:iid", "--methods", "c3la,fedit", "--lrs", "1e-3,3e-2"]
    argv += ["--seeds", "1", "--clients", "2", "--out", str(tmp_path), "--name", "t", *more]
    return quality_tuned.parse(argv + [x for kv in sets for x in ("--set", kv)])


@pytest.mark.bench
def test_tuned_protocol_picks_on_validation_and_reports_on_test(
    tmp_path, tiny_lm_dir, tiny_text_dir
):
    args = _args(tmp_path, tiny_lm_dir, tiny_text_dir)
    sweep = quality_tuned.sweep_plan(args)
    assert {p.overrides["central-eval-split"] for p in sweep} == {"validation"}
    assert len(sweep) == 4  # 2 methods x 2 lrs, one seed
    payload = quality_tuned.run(args)
    doc = json.loads((tmp_path / "t.json").read_text())
    assert doc["lr_grid"] == {"c3la": [1e-3, 3e-2], "fedit": [1e-3, 3e-2]}
    assert doc["completed_runs"] == doc["planned_runs"] == 6 and not doc["failed_runs"]
    sweep_rows = [r for r in doc["runs"] if r["phase"] == "sweep"]
    for method in ("c3la", "fedit"):
        finals = {r["lr"]: r["final"] for r in sweep_rows if r["method"] == method}
        assert len(finals) == 2 and all(math.isfinite(v) for v in finals.values())
        best = min(finals, key=finals.get)  # perplexity: the validation argmin
        assert doc["chosen"]["code-lm:iid"][method]["lr"] == best
        (row,) = [s for s in doc["summary"] if s["method"] == method]
        assert row["lr"] == best and row["seeds"] == [0] and list(row["finals"]) == ["0"]
        (final,) = [r for r in doc["runs"] if r["phase"] == "final" and r["method"] == method]
        assert final["lr"] == best and final["final"] == row["final_mean"]
        # validation and test halves are different rows: the same run scores differently
        assert final["base"] != next(r["base"] for r in sweep_rows if r["method"] == method)
    goal = doc["goal"]
    assert goal["met"] is False and goal["complete"] is False  # 1 cell, 1 seed
    assert goal == json.loads(json.dumps(quality_tuned.goal(payload["summary"])))
    assert doc["cells_run"] == ["code-lm:iid"]
    assert (tmp_path / "t-code-lm-iid.png").stat().st_size > 0
    again = quality_tuned.run(_args(tmp_path, tiny_lm_dir, tiny_text_dir, "--resume"))
    assert again["runs"] == payload["runs"]  # nothing rerun


def _row(task: str, part: str, method: str, mean: float, mb: float, seeds: int = 3) -> dict:
    metric = quality.METRIC[task]
    return {
        "task": task,
        "partitioning": part,
        "method": method,
        "metric": metric,
        "seeds": list(range(seeds)),
        "final_mean": mean,
        "final_std": 0.1,
        "total_mb_up_mean": mb,
    }


def _summary(c3la_ppl: float = 40.5, core_ppl: float = 39.0, seeds: int = 3) -> list[dict]:
    rows = []
    for cell in quality_tuned.CELLS:
        task, part = cell.split(":")
        lm = task == "code-lm"
        rows += [
            _row(task, part, "fedit", 40.0 if lm else 0.50, 10.0, seeds),
            _row(task, part, "c3la", c3la_ppl if lm else 0.495, 4.0, seeds),  # 0.4x bytes
            _row(task, part, "c3la@int8", 30.0 if lm else 0.9, 1.0, seeds),  # not exact
            _row(task, part, "seedcore", core_ppl if lm else 0.3, 0.1, seeds),  # 0.01x bytes
        ]
    return rows


def test_goal_needs_both_subgoals_all_cells_and_three_seeds():
    met = quality_tuned.goal(_summary())
    assert met["met"] is True and met["complete"] is True
    assert met["exact_within_2pct_at_half_bytes"]["cells_met"] == 4  # 40.5 <= 1.02 x 40
    assert met["seedcore_at_5pct_bytes"]["cells_met"] == 2  # code-lm cells only
    # c3la and seedcore 3% worse on code-lm: only the code-cls cells (0.495 >= 0.98 x 0.5)
    # pass, 2 < 3; the int8 row, better than FedIT, is not an exact method and does not count.
    worse = quality_tuned.goal(_summary(c3la_ppl=41.2, core_ppl=41.2))
    assert worse["exact_within_2pct_at_half_bytes"]["cells_met"] == 2 and not worse["met"]
    no_core = quality_tuned.goal(_summary(core_ppl=40.1))  # seedcore never reaches FedIT
    assert no_core["exact_within_2pct_at_half_bytes"]["met"] and not no_core["met"]
    one_seed = quality_tuned.goal(_summary(seeds=1))
    assert one_seed["met"] is False and one_seed["complete"] is False
    (c3la,) = [c for c in one_seed["cells"][0]["candidates"] if c["method"] == "c3la"]
    assert c3la["bytes_ratio_vs_fedit"] == 0.4 and not c3la["enough_seeds"] and not c3la["counts"]
    assert quality_tuned.goal(_summary()[:-4])["met"] is False  # 3 cells: incomplete


def test_options_and_default_methods():
    args = quality_tuned.parse([])
    assert args.cells == list(quality_tuned.CELLS) and args.seeds == [0, 1, 2]
    assert "c3la@r16" in args.methods and "c3la@L6x1" in args.methods
    assert "c3la@r16@int8" in args.methods and "seedcore" in args.methods
    assert quality.split_variant("c3la@L6x1@int8") == (
        "c3la",
        {"num-links": 6, "rounds-per-link": 1, "upload-codec": "int8"},
    )
    assert "c3la@r7" in args.methods and "rac-lora@r7" in args.methods  # 0.49x FedIT's bytes
    assert "rac-lora@fB@r9" in args.methods  # the other role, 0.49x FedIT's bytes
    swapped = {"frozen-factor": "B", "rank": 9}
    assert quality.split_variant("rac-lora@fB@r9") == ("rac-lora", swapped)
    # 5 points a method; the widened grids keep the first run's points (its runs reused)
    assert quality_tuned.lr_grid(args, "seedcore") == [0.00585, 0.01, 0.0171, 0.0292, 0.05]
    assert quality_tuned.lr_grid(args, "fedit") == [0.00215, 0.00464, 0.01, 0.0215, 0.0464]
    three = quality_tuned.parse(["--lr-points", "3"])
    assert quality_tuned.lr_grid(three, "c3la@r16") == [0.00215, 0.01, 0.0464]
    with pytest.raises(ValueError, match="--cells"):
        quality_tuned.parse(["--cells", "code-lm:natural"])
    with pytest.raises(ValueError, match="--ablation"):
        quality_tuned.parse(["--ablation", "--cells", "code-cls:iid"])


def test_ablation_varies_one_knob_at_a_time_at_equal_total_rounds():
    args = quality_tuned.parse(["--ablation", "--seeds", "1"])
    chosen = {"code-lm:iid": {"c3la": {"lr": 4e-3}}}
    points = quality_tuned.ablation_plan(args, chosen)
    knobs = {(p.tags["knob"], p.tags["value"]) for p in points}
    assert knobs == {
        ("lr", 2e-3),
        ("lr", 8e-3),
        ("alpha", 8.0),
        ("alpha", 32.0),
        ("rounds-per-link", 1),
        ("rounds-per-link", 6),
    }
    base = quality.BASE
    for p in points:
        ov = p.overrides
        assert ov["central-eval-split"] == "test" and ov["a-kind"] == "circulant"
        assert (
            ov["num-links"] * ov["rounds-per-link"] == base["num-links"] * base["rounds-per-link"]
        )
        changed = {
            k for k in ("lr", "alpha", "rounds-per-link") if ov[k] != {**base, "lr": 4e-3}[k]
        }
        assert changed == {p.tags["knob"]}
    assert quality_tuned.ablation_plan(quality_tuned.parse([]), chosen) == []  # not asked
    rows = [{**quality_tuned._run(args, "code-lm:iid", "c3la", 0, 2e-3, "ablation").tags}]
    rows[0] |= {"knob": "lr", "value": 2e-3, "final": 50.0, "metric": "ppl", "base": 100.0}
    rows[0] |= {"total_bytes_up": 1e6, "wall_time_s": 1.0}
    table = quality_tuned.ablation_table(rows, [])
    assert table[0]["knob"] == "lr" and table[0]["final_mean"] == 50.0
    assert table[-1]["value"] == "moot"  # the optimizer is fresh every round


def test_workers_run_points_picklably_with_their_own_cache_and_threads():
    """--workers > 1: quality.run_point with a private link cache at --threads, as a
    callable a spawned worker can unpickle; --workers 1 is today's in-process run."""
    args = quality_tuned.parse(["--workers", "3", "--threads", "2"])
    run = pickle.loads(pickle.dumps(quality_tuned.runner(args)))
    assert run.func is quality.run_point and run.keywords == {"fresh_cache": True, "threads": 2}
    assert quality_tuned.runner(quality_tuned.parse([])) is quality.run_point
    with pytest.raises(ValueError, match="--workers"):
        quality_tuned.parse(["--workers", "0"])


def test_code_cls_eval_size_and_server_device_follow_the_run_config():
    args = quality_tuned.parse(["--set", "device=cuda"])
    cls, lm = quality.task_config(args, "code-cls"), quality.task_config(args, "code-lm")
    assert cls["max-eval-blocks"] == 1024 and lm["max-eval-blocks"] == 256
    assert cls["server-device"] == lm["server-device"] == "cuda"  # follows device
    sweep = quality_tuned.sweep_plan(args)
    assert {p.overrides["server-device"] for p in sweep} == {"cuda"}
    assert {p.overrides["max-eval-blocks"] for p in sweep if p.tags["task"] == "code-cls"} == {1024}
    named = quality_tuned.parse(["--set", "max-eval-blocks=16", "--set", "server-device=cpu"])
    assert quality.task_config(named, "code-cls")["max-eval-blocks"] == 16  # --set wins
    assert quality.task_config(named, "code-lm")["server-device"] == "cpu"
    assert quality.task_config(quality_tuned.parse([]), "code-lm")["server-device"] == "cpu"


def test_a_spent_time_budget_starts_no_run_and_still_writes_the_result(tmp_path):
    argv = ["--cells", "code-lm:iid", "--methods", "c3la,fedit", "--seeds", "1"]
    args = quality_tuned.parse([*argv, "--time-budget", "0", "--out", str(tmp_path)])
    payload = quality_tuned.run(args)
    assert payload["completed_runs"] == 0 and payload["not_run"] == 10  # 2 methods x 5 lrs
    assert payload["options"]["time_budget"] == 0 and payload["goal"]["met"] is False
    assert (tmp_path / "quality_tuned.runs.jsonl").read_text() == ""
