"""The benchmark scripts end to end at the smallest size, so a broken bench fails here first.

Tiny model and dataset fixtures, 2 clients, 1 round. The Ray half of bench.sim_overhead
needs a Ray start-up (minutes on a loaded CPU) and runs only with SEEDLORA_BENCH_RAY=1.
"""

from __future__ import annotations

import json
import math
import os
from importlib.util import find_spec
from pathlib import Path

import pytest

from bench import chain_soak, quality, sim_overhead
from bench.common import run_child
from testing.tiny import save_text_dataset

SMALL = ["--set", "rounds-per-link=2", "--set", "local-steps=1", "--name", "s"]


# The smallest quality run: one round of one local step (bench.quality, bench.quality_tuned).
TINY_QUALITY = [
    "num-links=1",
    "rounds-per-link=1",
    "local-steps=1",
    "rank=4",
    "alpha=8.0",
    "seq-len=32",
    "max-train-blocks=8",
    "max-eval-blocks=8",
]


def _quality_args(out: Path, model: str, data: str, methods: list[str], *more: str):
    sets = [f"model-name={model}", f"dataset={data}", *TINY_QUALITY]
    grid = ["--tasks", "code-lm", "--partitionings", "iid", "--seeds", "1", "--clients", "2"]
    argv = [*grid, "--methods", ",".join(methods), "--out", str(out), "--name", "q", *more]
    return quality.parse(argv + [x for kv in sets for x in ("--set", kv)])


@pytest.mark.bench
def test_quality_grid_writes_runs_summary_goal_and_plot(tmp_path, tiny_lm_dir, tiny_text_dir):
    methods = ["c3la", "c3la@r2", "fedit", "central"]
    payload = quality.run(_quality_args(tmp_path, tiny_lm_dir, tiny_text_dir, methods))
    doc = json.loads((tmp_path / "q.json").read_text())
    assert doc["completed_runs"] == doc["planned_runs"] == 4 and not doc["failed_runs"]
    assert doc["not_run_of_plan"] == [] and "LocalGrid" in doc["harness"]
    runs = {r["method"]: r for r in doc["runs"]}
    for r in runs.values():
        assert r["metric"] == "ppl" and r["rounds"] == 1 and r["skipped_rounds"] == 0
        assert math.isfinite(r["final"]) and r["final"] > 1 and r["base"] > 1
        assert r["wall_time_s"] > 0 and r["total_bytes_up"] > 0
    # Upload: FedIT sends A and B, chains only B; half the rank halves the chain's bytes.
    assert runs["fedit"]["total_bytes_up"] > runs["c3la"]["total_bytes_up"]
    assert 1.5 < runs["c3la"]["total_bytes_up"] / runs["c3la@r2"]["total_bytes_up"] <= 2.0
    # The ceiling: one node with the pooled data and the same optimizer-step budget.
    assert runs["central"]["nodes"] == 1 and runs["central"]["partitioning"] == "pooled"
    assert runs["central"]["total_optimizer_steps"] == runs["c3la"]["total_optimizer_steps"]
    assert runs["central"]["total_bytes_up"] * 2 == runs["c3la"]["total_bytes_up"]  # 1 vs 2 nodes
    checks = {c["method"]: c for c in payload["goal"]["checks"]}
    assert set(checks) == {"c3la", "c3la@r2"}
    assert 0.25 < checks["c3la"]["bytes_ratio_vs_fedit"] < 1.0
    assert checks["c3la@r2"]["bytes_ratio_vs_fedit"] < checks["c3la"]["bytes_ratio_vs_fedit"]
    assert (tmp_path / "q-code-lm.png").stat().st_size > 0


@pytest.mark.bench
def test_quality_resume_skips_finished_runs(tmp_path, tiny_lm_dir, tiny_text_dir):
    def args(*more: str):
        return _quality_args(tmp_path, tiny_lm_dir, tiny_text_dir, ["ffa"], *more)

    quality.run(args("--limit", "0"))
    assert json.loads((tmp_path / "q.json").read_text())["completed_runs"] == 0
    first = quality.run(args())
    again = quality.run(args("--resume"))
    assert first["runs"] == again["runs"] and again["completed_runs"] == 1
    assert again["grid_seconds_this_call"] < first["grid_seconds_this_call"]  # nothing rerun


def test_quality_options_parse_and_reduced_grid_records_what_was_not_run():
    opts = quality.parse(["--seeds", "3", "--task-seeds", "code-cls=1", "--set", "rank=4"])
    assert opts.seeds == [0, 1, 2] and opts.base == {**quality.BASE, "rank": 4}
    plan, full = quality.plan(opts), quality.plan(opts, full=True)
    assert {p.tags["seed"] for p in plan if p.tags["task"] == "code-cls"} == {0}
    assert all(p.overrides["rank"] == 4 for p in plan if p.tags["method"] != "c3la@r4")
    central = next(p for p in plan if p.tags["method"] == "central")
    assert central.nodes == 1 and central.tags["partitioning"] == "pooled"
    assert central.overrides["local-steps"] == 4 * quality.BASE["local-steps"]  # 4 clients
    assert len(full) - len(plan) == 2 * (len(opts.methods) * 2 - 1)
    assert quality.split_variant("c3la@r4@lr0.001") == ("c3la", {"rank": 4, "lr": 0.001})
    with pytest.raises(ValueError, match="unknown method"):
        quality.split_variant("lora")
    with pytest.raises(ValueError, match="suffix"):
        quality.split_variant("c3la@x2")


@pytest.mark.bench
@pytest.mark.integration  # runs the app in a subprocess
def test_sim_overhead_plain_run_and_json(tmp_path):
    argv = ["--clients", "2", "--variants", "plain-1-thread", "--skip-scale", *SMALL]
    payload = sim_overhead.run_benchmark(sim_overhead.parse([*argv, "--out", str(tmp_path)]))
    doc = json.loads((tmp_path / "s.json").read_text())
    run = doc["overhead"]["runs"]["plain-1-thread"]
    assert run["completed"], run.get("log_tail")
    assert len(run["round_times_s"]) == 2 and all(t > 0 for t in run["round_times_s"])
    assert run["steady_round_s"] > 0 and run["startup_and_teardown_s"] >= 0
    assert run["accepted_per_round"] == [2, 2] and run["torch_threads"] == 1
    assert run["peak_rss_mb"] > 50 and run["rss_samples"] > 0
    assert payload["overhead"]["best_plain_steady_round_s"] == run["steady_round_s"]
    assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.integration  # starts the app in a subprocess (stopped at its 0.5 s limit)
def test_sim_overhead_records_a_run_past_its_limit(tmp_path):
    spec = {"mode": "local", "overrides": {"run-name": "never"}, "nodes": 2}
    row = run_child(spec, tmp_path, timeout_s=0.5)
    assert row["completed"] is False and "limit" in row["why"]


@pytest.mark.bench
def test_chain_soak_records_time_bytes_and_cache_per_round(tmp_path, tiny_lm_dir, tiny_text_dir):
    sets = [
        f"model-name={tiny_lm_dir}",
        f"dataset={tiny_text_dir}",
        "partitioner=iid",
        "seq-len=32",
        "max-train-blocks=8",
        "rank=4",
        "alpha=8.0",
    ]
    argv = ["--links", "4", "--clients", "2", "--out", str(tmp_path), "--name", "soak"]
    chain_soak.main(argv + [x for kv in sets for x in ("--set", kv)])
    doc = json.loads((tmp_path / "soak.json").read_text())
    rows, summary = doc["rounds"], doc["summary"]
    assert [r["round"] for r in rows] == list(range(1, 9)) and summary["links"] == 4
    assert all(r["round_time_s"] > 0 for r in rows) and summary["round_time_ratio"] > 0
    # A round commit writes one checkpoint, one rounds.jsonl line and, where TensorBoard is
    # installed, that round's events, whatever the link.
    commits = [r for r in rows if not r["closes_link"]]
    kinds = ("checkpoint", "rounds.jsonl") + (("tensorboard",) if find_spec("tensorboard") else ())
    assert {tuple(sorted(r["bytes_by_kind"])) for r in commits} == {kinds}
    assert {r["bytes_by_kind"]["checkpoint"] for r in commits} == {summary["checkpoint_bytes"]}
    # A link close adds one link file; the clients' cache grows by one file per link.
    link = summary["link_file_bytes"]
    assert [r["bytes_by_kind"]["link log"] for r in rows if r["closes_link"]] == [link] * 4
    assert [r["cache_bytes"] for r in rows] == [0, 0, 0, link, link, 2 * link, 2 * link, 3 * link]
    assert summary["link_log_files"] == 4
    assert summary["cache_growth_over_link_file"] == pytest.approx(1.0)
    assert summary["bytes_per_round_grow"]["round_commit"] is False
    assert (tmp_path / "soak.png").stat().st_size > 0


def test_scale_dataset_has_rows_for_every_client(tmp_path):
    import datasets

    path = save_text_dataset(tmp_path / "d", min_rows=3000)
    rows = datasets.load_from_disk(str(path))
    assert len(rows) == 3000 and min(len(t) for t in rows["text"]) == 500


@pytest.mark.bench
@pytest.mark.integration  # Ray
@pytest.mark.skipif(not os.environ.get("SEEDLORA_BENCH_RAY"), reason="set SEEDLORA_BENCH_RAY=1")
def test_sim_overhead_ray_and_scale(tmp_path):
    argv = ["--clients", "2", "--variants", "plain-1-thread,ray-nice0", "--sizes", "4", *SMALL]
    payload = sim_overhead.run_benchmark(sim_overhead.parse([*argv, "--out", str(tmp_path)]))
    ratio = payload["overhead"]["steady_round_ratio_over_best_plain"]["ray-nice0"]
    assert ratio > 0
    (row,) = payload["scale"]
    assert row["completed"] and row["clients_trained_per_round"] == 4
    assert row["peak_rss_mb"] > 0 and Path(tmp_path / "s.png").exists()
