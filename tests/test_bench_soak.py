"""bench.soak: the chain soak's per-round time, bytes and cache, and the Byzantine table,
from their tiny modes.

Why: "cost must not grow with the chain" is judged from these counts; a meter that counted a
rename as a write, or a cache that kept master files, would report growth that is not there
(or hide growth that is)."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest

from bench import soak

pytestmark = pytest.mark.bench


def test_chain_tiny_counts_what_each_round_writes_and_caches(tmp_path):
    soak.main(["chain", "--tiny", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "chain_soak.json").read_text())
    rows, summary = doc["rounds"], doc["summary"]
    assert [r["round"] for r in rows] == list(range(1, 9)) and summary["links"] == 4
    assert all(r["round_time_s"] > 0 for r in rows) and summary["round_time_ratio"] > 0
    # A round commit writes one checkpoint, one rounds.jsonl line (and TensorBoard events).
    commits = [r for r in rows if not r["closes_link"]]
    kinds = ("checkpoint", "rounds.jsonl") + (("tensorboard",) if find_spec("tensorboard") else ())
    assert {tuple(sorted(r["bytes_by_kind"])) for r in commits} == {kinds}
    assert {r["bytes_by_kind"]["checkpoint"] for r in commits} == {summary["checkpoint_bytes"]}
    # A link close adds one link file; the clients' cache grows by one file per link.
    link = summary["link_file_bytes"]
    assert [r["bytes_by_kind"]["link log"] for r in rows if r["closes_link"]] == [link] * 4
    assert [r["cache_bytes"] for r in rows] == [0, 0, 0, link, link, 2 * link, 2 * link, 3 * link]
    assert summary["cache_growth_over_link_file"] == pytest.approx(1.0)
    assert summary["bytes_per_round_grow"]["round_commit"] is False
    assert (tmp_path / "chain_soak.png").stat().st_size > 0


def test_byzantine_tiny_table_against_clean_fedavg(tmp_path):
    soak.main(["byzantine", "--tiny", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "byzantine.json").read_text())
    table = {(r["rule"], r["attack"]): r for r in doc["table"]}
    assert set(table) == {("fedavg", "clean"), ("fedavg", "scale10"), ("fedmedian", "scale10")}
    assert table["fedavg", "clean"]["ratio_to_clean_fedavg"] == 1.0
    for row in table.values():
        assert row["final_ppl"] > 1 and row["ratio_to_clean_fedavg"] > 0
    runs = {(r["rule"], r["attack"]): r for r in doc["runs"]}
    assert runs["fedavg", "clean"]["byzantine_nodes"] == []
    assert len(runs["fedmedian", "scale10"]["byzantine_nodes"]) == 1
    assert doc["summary"]["robust_within_5pct"] == (doc["summary"]["robust_failures"] == [])
    assert set(doc["summary"]["fedavg_under_attack"]) == {"scale10"}
    assert (tmp_path / "byzantine.png").stat().st_size > 0
