"""Issue 18, "cost must not grow with the chain": a long chain, and what each round costs.

`python -m bench.chain_soak --links 256` runs the embedded default (code-lm on the shipped
GPT-2) in this process (`simulation.local.run_local`: the real ServerApp and ClientApp over
an in-process grid) with `--clients` 4 clients and RUN below: 2 rounds per link, 1 local
step, no central or client evaluation and no export, so a round is training, aggregation
and the chain's own bookkeeping, which is what must not grow. `--set KEY=VALUE` changes
the run config. Per round it records

- `round_time_s`: the round's `wall_time` from metrics.json (from the end of the previous
  round's entry to the end of this one's, so it covers the previous round's checkpoint and
  close_link too), less the time this benchmark's own look at the disk took inside it;
- `bytes_written`: bytes of the files in the run directory created, rewritten or appended
  to from the start of this round's training to the start of the next round's: the round's
  commit (rounds.jsonl, checkpoint) and, at a link's last round, close_link's (link file,
  checkpoint, metrics.json), by kind. A rename (checkpoint -> .prev) writes nothing. The
  last round's also holds what the end of the run writes (metrics.json, metrics.png), so
  the bytes summary leaves it out;
- `cache_bytes`: the clients' link cache (a directory of its own for the run, shared by
  the clients as on one machine) when this round's training starts, its master files
  (one base, replaced per link) left out.
- `cpu_s`: CPU time of this process (server and clients, all threads) from the start of
  this round's training to the start of the next round's, the looks left out: the round's
  work, which other jobs on a shared machine inflate much less than its wall time.

The summary: `round_time_ratio` = mean round time of the last 10 rounds / of rounds 3-12
(round 1 also tokenizes every client's data, round 2 is the first after it) and
`round_cpu_ratio` the same for `cpu_s` (the last round left out), the same
ratio (last 5 / 5 from the second) for the first rounds of links (which also hold the
server's close_link and the clients' rebuild of the base) and the other rounds, bytes written
per round in the first and the last 5 links, split into rounds that close a link and
rounds that do not, with their growth per link (least squares), and the cache's growth
per link (least squares over the cache size as each link's last round starts, link 0 left
out) against the size of one link file.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from bench.common import figure, parser, with_sets, write_result
from client.masters import MASTERS
from contract import protocol as p
from testing.probe import TimedGrid

NAME = "chain_soak"
RUN: dict[str, Any] = {
    "rounds-per-link": 2,
    "local-steps": 1,
    "central-eval": False,
    "fraction-evaluate": 0.0,
    "export": False,
}
EDGE_LINKS = 5  # links at each end compared for bytes per round


def kind_of(path: Path, root: Path) -> str:
    """What a file in the run directory is, for the bytes breakdown."""
    rel = path.relative_to(root)
    if rel.parts[0] == "links":
        return "link log"
    if rel.name.startswith("checkpoint"):
        return "checkpoint"
    if rel.parts[0] == "tb":
        return "tensorboard"
    return rel.name if rel.name in ("rounds.jsonl", "metrics.json") else "other"


def appended(path: Path) -> bool:
    """The run directory's files written by appending: rounds.jsonl and TensorBoard's
    event files (counted by their growth, not whole)."""
    return path.name == "rounds.jsonl" or path.name.startswith("events.out.tfevents.")


class DiskMeter:
    """Bytes written to a directory between two looks: a file created or replaced counts
    whole, an appended file (`appended`) counts its growth, a file renamed (the same
    inode, size and mtime seen at another path) counts nothing. File systems reuse inode
    numbers at once, so only the name tells an append from a replacement."""

    def __init__(self, root: Path):
        self.root = root
        self.seen: dict[Path, tuple[int, int, int]] = {}  # path -> (inode, size, mtime_ns)

    def look(self) -> dict[str, int]:
        now = {}
        for path in self.root.rglob("*"):
            if path.is_file():
                st = path.stat()
                now[path] = (st.st_ino, st.st_size, st.st_mtime_ns)
        seen_states = set(self.seen.values())
        written: dict[str, int] = {}
        for path, state in now.items():
            before = self.seen.get(path)
            if before == state or state in seen_states:
                continue  # unchanged, or renamed
            grew = appended(path) and before is not None and state[1] >= before[1]
            size = state[1] - before[1] if grew else state[1]
            kind = kind_of(path, self.root)
            written[kind] = written.get(kind, 0) + size
        self.seen = now
        return written


def tree_bytes(root: Path, leave_out: str | None = None) -> int:
    """Bytes of the files under `root`, those under a folder named `leave_out` left out."""
    if not root.exists():
        return 0
    files = (f for f in root.rglob("*") if f.is_file())
    return sum(f.stat().st_size for f in files if leave_out not in f.relative_to(root).parts)


class SoakGrid(TimedGrid):
    """The run's grid; before each round's training it looks at the run directory and the
    clients' link cache (and times that look, to take it out of the round's time)."""

    def __init__(self, inner: Grid, log: Path, run_dir: Path, cache: Path):
        super().__init__(inner, log)
        self.meter = DiskMeter(run_dir)
        self.cache = cache
        self.looks: list[dict[str, Any]] = []

    def look(self, global_round: int | None) -> None:
        """Record what was written since the last look; `None`: the look after the run."""
        began, cpu = time.perf_counter(), time.process_time()
        written = self.meter.look()
        cache = self.cache if global_round is not None else None
        self.looks.append(
            {
                "before_round": global_round,
                "written": written,
                # the link files; the host's master files (client/masters.py) hold one
                # base each and are replaced per link, not accumulated
                "cache_bytes": tree_bytes(cache, MASTERS) if cache else None,
                "look_s": time.perf_counter() - began,
                "cpu_began": cpu,  # this process's CPU time when the look began and ended
                "cpu_ended": time.process_time(),
            }
        )

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if messages and messages[0].metadata.message_type.startswith("train"):
            self.look(int(messages[0].content[p.CONFIG][p.SERVER_ROUND]))
        return super().push_messages(messages)


def per_round(doc: dict, looks: list[dict]) -> list[dict]:
    """One row per round: its time, what it wrote (the next look's count) and the cache."""
    entries = {r["round"]: r for r in doc["rounds"] if r["round"] > 0}
    at = {look["before_round"]: i for i, look in enumerate(looks)}
    rows = []
    for rnd, entry in sorted(entries.items()):
        i = at[rnd]
        written = looks[i + 1]["written"] if i + 1 < len(looks) else {}
        cpu = looks[i + 1]["cpu_began"] - looks[i]["cpu_ended"] if i + 1 < len(looks) else None
        rows.append(
            {
                "round": rnd,
                "link": entry["link"],
                "opens_link": entry.get("round_in_link") == 1,
                "closes_link": entry.get("round_in_link") == entry.get("rounds_per_link"),
                "round_time_s": entry["wall_time"] - looks[i]["look_s"],
                "metrics_wall_time_s": entry["wall_time"],
                "cpu_s": cpu,
                "bytes_written": sum(written.values()),
                "bytes_by_kind": written,
                "cache_bytes": looks[i]["cache_bytes"],
            }
        )
    return rows


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys against xs."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def bytes_summary(rows: list[dict], closing: bool) -> dict[str, Any]:
    """Bytes written per round (those that close a link, or those that do not) in the
    first and the last EDGE_LINKS links, and their growth per link."""
    chosen = [r for r in rows[:-1] if r["closes_link"] == closing]  # the last holds the end
    if not chosen:
        return {"rounds": 0}
    links = sorted({r["link"] for r in chosen})
    first, last = set(links[:EDGE_LINKS]), set(links[-EDGE_LINKS:])
    mean = lambda sel: statistics.fmean(r["bytes_written"] for r in chosen if r["link"] in sel)  # noqa: E731
    kinds = sorted({k for r in chosen for k in r["bytes_by_kind"]})
    per_kind = {
        k: slope([r["link"] for r in chosen], [r["bytes_by_kind"].get(k, 0) for r in chosen])
        for k in kinds
    }
    return {
        "rounds": len(chosen),
        "first_links_mean_bytes": mean(first),
        "last_links_mean_bytes": mean(last),
        "last_over_first": mean(last) / mean(first) if mean(first) else None,
        "growth_bytes_per_link": slope(
            [r["link"] for r in chosen], [r["bytes_written"] for r in chosen]
        ),
        "growth_bytes_per_link_by_kind": per_kind,
    }


def time_ratio(rows: list[dict], edge: int = 5) -> float | None:
    """Mean round time of the last `edge` rows / of `edge` rows from the second on."""
    times = [r["round_time_s"] for r in rows]
    early, late = times[1 : 1 + edge], times[-edge:]
    return statistics.fmean(late) / statistics.fmean(early) if early and late else None


def summarize(rows: list[dict], run_dir_files: dict[str, int]) -> dict[str, Any]:
    times = [r["round_time_s"] for r in rows]
    early, late = times[2:12], times[-10:]
    cpu = [r["cpu_s"] for r in rows[:-1]]  # the last one holds the end of the run
    # The cache when each link's last round starts; a link's links arrive in its first round.
    last = {r["link"]: r["cache_bytes"] for r in rows if r["cache_bytes"] is not None}
    cache = sorted((link, b) for link, b in last.items() if link > 0)
    grows = {
        name: bytes_summary(rows, closing)
        for name, closing in (("round_commit", False), ("link_close", True))
    }
    link_file = run_dir_files.get("link_file_bytes")
    cache_slope = slope([x for x, _ in cache], [b for _, b in cache]) if cache else None
    return {
        "rounds": len(rows),
        "links": len({r["link"] for r in rows}),
        "round_time_early_mean_s": statistics.fmean(early) if early else None,
        "round_time_late_mean_s": statistics.fmean(late) if late else None,
        "round_time_ratio": statistics.fmean(late) / statistics.fmean(early) if early else None,
        "round_time_ratio_is": "mean of the last 10 rounds / mean of rounds 3-12",
        "round_cpu_early_mean_s": statistics.fmean(cpu[2:12]) if cpu[2:12] else None,
        "round_cpu_late_mean_s": statistics.fmean(cpu[-10:]) if cpu[-10:] else None,
        "round_cpu_ratio": statistics.fmean(cpu[-10:]) / statistics.fmean(cpu[2:12])
        if cpu[2:12]
        else None,
        # A link's first round also holds the server's close_link of the link before and
        # the clients' rebuild of the base; the other rounds train and commit only.
        "round_time_ratio_by_kind": {
            name: time_ratio([r for r in rows if r["opens_link"] == opens])
            for name, opens in (("first_round_of_link", True), ("other_rounds", False))
        },
        "bytes_per_round": grows,
        "bytes_per_round_grow": {
            name: bool(g.get("last_over_first") and g["last_over_first"] > 1.05)
            for name, g in grows.items()
        },
        "cache_final_bytes": rows[-1]["cache_bytes"],
        "cache_growth_bytes_per_link": cache_slope,
        "link_file_bytes": link_file,
        "cache_growth_over_link_file": cache_slope / link_file
        if cache_slope and link_file
        else None,
        **run_dir_files,
    }


def run_dir_facts(run_dir: Path) -> dict[str, int]:
    """Sizes of what the run left (0 for a file it does not have)."""
    size = lambda name: (run_dir / name).stat().st_size if (run_dir / name).exists() else 0  # noqa: E731
    links = sorted((run_dir / "links").glob("*.safetensors"))
    return {
        "checkpoint_bytes": size("checkpoint.safetensors"),
        "link_log_files": len(links),
        "link_file_bytes": links[-1].stat().st_size if links else 0,
        "link_log_bytes": sum(f.stat().st_size for f in links),
        "metrics_json_bytes": size("metrics.json"),
        "rounds_jsonl_bytes": size("rounds.jsonl"),
        "run_dir_bytes": tree_bytes(run_dir),
    }


def plot(rows: list[dict], path: Path, title: str) -> Path:
    rounds = [r["round"] for r in rows]
    with figure(path, 3, 1, figsize=(8, 8.5), sharex=True) as (_, axes):
        axes[0].plot(rounds, [r["round_time_s"] for r in rows], ".-", lw=0.8, label="wall")
        cpu = [(r["round"], r["cpu_s"]) for r in rows if r["cpu_s"] is not None]
        axes[0].plot([x for x, _ in cpu], [c for _, c in cpu], ".-", lw=0.8, label="CPU")
        axes[0].set_ylabel("round time (s)")
        axes[0].legend(fontsize=8)
        axes[0].set_title(title)
        for closing, label in ((False, "round commit"), (True, "round + link close")):
            sel = [r for r in rows[:-1] if r["closes_link"] == closing]
            axes[1].plot(
                [r["round"] for r in sel], [r["bytes_written"] / 1e3 for r in sel], ".", label=label
            )
        axes[1].set_ylabel("kB written to the run dir")
        axes[1].legend(fontsize=8)
        cache = [(r["round"], r["cache_bytes"]) for r in rows if r["cache_bytes"] is not None]
        axes[2].plot([x for x, _ in cache], [b / 1e6 for _, b in cache], "-")
        axes[2].set_ylabel("client link cache (MB)")
        axes[2].set_xlabel("round")
        for ax in axes:
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    from simulation.local import make_grid, resolved_config, run_local

    ap = parser(__doc__, NAME)
    ap.add_argument("--links", type=int, default=256, help="chain links (num-links)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run directory here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    overrides = with_sets(RUN, a) | {"num-links": a.links}
    with tempfile.TemporaryDirectory(prefix="chain-soak-") as tmp:
        run_dir = a.keep or Path(tmp) / "run"
        run_dir.mkdir(parents=True, exist_ok=True)
        cache = Path(tmp) / "cache"  # the clients' link cache, of this run alone
        grids: list[SoakGrid] = []

        def wrap(grid: Grid) -> Grid:
            grids.append(SoakGrid(grid, Path(tmp) / "grid.jsonl", run_dir, cache))
            return grids[0]

        grid = make_grid(overrides, a.clients)
        grid.use_cache(cache)
        grid.keep_replies = False  # the in-process grid's own record would grow every round
        began = time.perf_counter()
        doc = run_local(overrides, a.clients, grid=grid, wrap_grid=wrap, out_dir=run_dir)
        wall = time.perf_counter() - began
        grids[0].look(None)
        rows = per_round(doc.metrics, grids[0].looks)
        facts = run_dir_facts(run_dir)
    summary = summarize(rows, facts)
    payload = {
        "benchmark": NAME,
        "harness": "simulation.local.run_local (real ServerApp/ClientApp, in-process transport)",
        "options": {"links": a.links, "clients": a.clients, "threads": a.threads},
        "run_config": resolved_config(overrides),
        "run_wall_s": wall,
        "summary": summary,
        "rounds": rows,
    }
    write_result(a.name, payload, a.out)
    title = f"{a.links} links x {overrides['rounds-per-link']} rounds, {a.clients} clients"
    plot(rows, a.out / f"{a.name}.png", title)
    print(json.dumps({k: v for k, v in summary.items() if k != "bytes_per_round"}, indent=1))
    print(json.dumps(summary["bytes_per_round"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
