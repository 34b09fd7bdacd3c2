"""Long and hostile runs: a chain whose cost must not grow, and Byzantine clients.

    python -m bench.soak chain --links 256    # chain_soak.json
    python -m bench.soak byzantine            # byzantine.json

Both run code-lm in this process (simulation.local.run_local); `--set` changes the run config.
chain: 2 rounds of 1 step per link, nothing evaluated. Per round its wall time (this
benchmark's look at the disk left out), CPU time, the bytes written to the run directory by
kind (created or replaced: whole; appended: the growth; renamed: nothing) and the clients'
link cache; the last rounds against the early ones, and growth per link.
byzantine: one client trains, then sends its update x10 (scale10) or x-1 (signflip), placed
by this script (testing.attackers). Goal: robust rules within 5% of clean fedavg.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench import harness as h
from simulation.sweep import Point, run_grid

EDGE_LINKS = 5
KINDS = {"links": "link log", "tb": "tensorboard"}  # run-directory folders, for bytes by kind


# --- chain ----------------------------------------------------------------------------
class DiskMeter:
    """Bytes written under `root` between two looks (module docstring); only the name tells
    an append (rounds.jsonl, TensorBoard events) from a replacement."""

    def __init__(self, root: Path):
        self.root, self.seen = root, {}

    def look(self) -> dict[str, int]:
        files = [(p, p.stat()) for p in self.root.rglob("*") if p.is_file()]
        now = {p: (s.st_ino, s.st_size, s.st_mtime_ns) for p, s in files}
        before_states, written = set(self.seen.values()), {}
        for path, state in now.items():
            before = self.seen.get(path)
            if before == state or state in before_states:
                continue  # unchanged, or renamed
            append = path.name == "rounds.jsonl" or path.name.startswith("events.out.tfevents.")
            size = state[1] - before[1] if append and before and state[1] >= before[1] else state[1]
            rel = path.relative_to(self.root)
            kind = KINDS.get(rel.parts[0]) or ("checkpoint" if "checkpoint" in rel.name else None)
            kind = kind or (rel.name if rel.name in ("rounds.jsonl", "metrics.json") else "other")
            written[kind] = written.get(kind, 0) + size
        self.seen = now
        return written


def tree_bytes(root: Path, leave_out: str | None = None) -> int:
    """Bytes of the files under `root`, those under a folder named `leave_out` left out."""
    files = [f for f in root.rglob("*") if f.is_file()] if root.exists() else []
    return sum(f.stat().st_size for f in files if leave_out not in f.relative_to(root).parts)


def soak_grid(inner: Any, log: Path, run_dir: Path, cache: Path) -> Any:
    """The run's grid, looking at the run directory and the link cache `cache` before each
    round's training (the look timed, to take it out of the round)."""
    from client.masters import MASTERS
    from contract import protocol as p
    from testing.probe import TimedGrid

    class SoakGrid(TimedGrid):
        meter, looks = DiskMeter(run_dir), []

        def look(self, rnd: int | None) -> None:
            began, cpu = time.perf_counter(), time.process_time()
            written = self.meter.look()
            cache_bytes = tree_bytes(cache, MASTERS) if rnd is not None else None
            look = dict(before_round=rnd, written=written, cache_bytes=cache_bytes, cpu_began=cpu)
            look |= dict(look_s=time.perf_counter() - began, cpu_ended=time.process_time())
            self.looks.append(look)

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            messages = list(messages)
            if messages and messages[0].metadata.message_type.startswith("train"):
                self.look(int(messages[0].content[p.CONFIG][p.SERVER_ROUND]))
            return super().push_messages(messages)

    return SoakGrid(inner, log)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Least-squares slope of ys against xs."""
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    covariance = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return covariance / sum((x - mx) ** 2 for x in xs)


def bytes_summary(rows: list[dict], closing: bool) -> dict[str, Any]:
    """Bytes per round (closing a link or not) in the first and last links, and growth."""
    chosen = [r for r in rows[:-1] if r["closes_link"] == closing]  # the last holds the end
    if not chosen:
        return {"rounds": 0}
    links = sorted({r["link"] for r in chosen})
    edges = (links[:EDGE_LINKS], links[-EDGE_LINKS:])
    first, last = (h.mean([r["bytes_written"] for r in chosen if r["link"] in s]) for s in edges)
    xs, kinds = [r["link"] for r in chosen], sorted({k for r in chosen for k in r["bytes_by_kind"]})
    out = dict(rounds=len(chosen), first_links_mean_bytes=first, last_links_mean_bytes=last)
    out |= dict(last_over_first=h.ratio(last, first))
    out["growth_bytes_per_link"] = slope(xs, [r["bytes_written"] for r in chosen])
    by_kind = {k: [r["bytes_by_kind"].get(k, 0) for r in chosen] for k in kinds}
    return out | {"growth_bytes_per_link_by_kind": {k: slope(xs, v) for k, v in by_kind.items()}}


def chain_summary(rows: list[dict], run_dir: Path) -> dict[str, Any]:
    """The round-time, CPU, bytes and cache figures of the module docstring."""
    links = sorted((run_dir / "links").glob("*.safetensors"))
    size = lambda n: (run_dir / n).stat().st_size if (run_dir / n).exists() else 0  # noqa: E731
    facts = dict(checkpoint_bytes=size("checkpoint.safetensors"), link_log_files=len(links))
    facts["link_file_bytes"] = links[-1].stat().st_size if links else 0
    facts["link_log_bytes"] = sum(f.stat().st_size for f in links)
    facts |= dict(metrics_json_bytes=size("metrics.json"), rounds_jsonl_bytes=size("rounds.jsonl"))
    facts["run_dir_bytes"] = tree_bytes(run_dir)
    times, cpu = [r["round_time_s"] for r in rows], [r["cpu_s"] for r in rows[:-1]]
    early, late = h.mean(times[2:12]), h.mean(times[-10:])
    cache = {r["link"]: r["cache_bytes"] for r in rows if r["cache_bytes"] is not None}
    cache = sorted((link, b) for link, b in cache.items() if link > 0)  # as each link's last starts
    cache_slope = slope([x for x, _ in cache], [b for _, b in cache]) if cache else None
    grows = {"round_commit": bytes_summary(rows, False), "link_close": bytes_summary(rows, True)}

    def kind_ratio(opens: bool) -> float | None:  # the last 5 over 5 from the second on
        t = [r["round_time_s"] for r in rows if r["opens_link"] == opens]
        return h.ratio(h.mean(t[-5:]), h.mean(t[1:6]))

    out = dict(rounds=len(rows), links=len({r["link"] for r in rows}), bytes_per_round=grows)
    out |= dict(round_time_early_mean_s=early, round_time_late_mean_s=late)
    out["round_time_ratio"] = h.ratio(late, early)
    out["round_time_ratio_is"] = "mean of the last 10 rounds / mean of rounds 3-12"
    out["round_cpu_ratio"] = h.ratio(h.mean(cpu[-10:]), h.mean(cpu[2:12]))
    out["round_time_ratio_by_kind"] = {"first_round_of_link": kind_ratio(True)}
    out["round_time_ratio_by_kind"]["other_rounds"] = kind_ratio(False)
    grow = {n: (g.get("last_over_first") or 0) > 1.05 for n, g in grows.items()}
    out["bytes_per_round_grow"] = grow
    out |= dict(cache_final_bytes=rows[-1]["cache_bytes"], cache_growth_bytes_per_link=cache_slope)
    out["cache_growth_over_link_file"] = h.ratio(cache_slope, facts["link_file_bytes"])
    return out | facts


def chain(args: Any) -> dict:
    """A long chain: round time, bytes written and cache per round must not grow."""
    from simulation.local import make_grid, resolved_config, run_local

    run = {"rounds-per-link": 2, "local-steps": 1, "central-eval": False, "export": False}
    run["fraction-evaluate"] = 0.0
    links, clients = (4, 2) if args.tiny else (args.links, args.clients)
    with tempfile.TemporaryDirectory(prefix="chain-soak-") as tmp:
        tiny = {"seq-len": 32, "max-train-blocks": 8, "rank": 4, **h.tiny_assets(Path(tmp))}
        tiny = tiny if args.tiny else {}
        ov = h.with_sets(run | tiny, args) | {"num-links": links}
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        grids: list[Any] = []
        grid, cache = make_grid(ov, clients), Path(tmp) / "cache"
        grid.use_cache(cache)  # the clients' link cache, of this run alone
        grid.keep_replies = False  # the in-process grid's own record would grow every round
        began = time.perf_counter()
        log = Path(tmp) / "grid.jsonl"
        wrap = lambda g: grids.append(soak_grid(g, log, run_dir, cache)) or grids[0]  # noqa: E731
        kw = {"grid": grid, "wrap_grid": wrap, "out_dir": run_dir}
        doc = run_local(ov, clients, **kw).metrics
        wall, looks = time.perf_counter() - began, grids[0].looks
        grids[0].look(None)
        at, rows = {x["before_round"]: i for i, x in enumerate(looks)}, []
        for e in sorted((r for r in doc["rounds"] if r["round"] > 0), key=lambda r: r["round"]):
            i = at[e["round"]]
            nxt = looks[i + 1] if i + 1 < len(looks) else None
            at_round = e.get("round_in_link")
            row = dict(round=e["round"], link=e["link"], opens_link=at_round == 1)
            row["closes_link"] = at_round == e.get("rounds_per_link")
            row["round_time_s"] = e["wall_time"] - looks[i]["look_s"]  # the look left out
            row |= dict(metrics_wall_time_s=e["wall_time"], cache_bytes=looks[i]["cache_bytes"])
            row["cpu_s"] = nxt["cpu_began"] - looks[i]["cpu_ended"] if nxt else None
            written = nxt["written"] if nxt else {}
            rows.append(row | dict(bytes_written=sum(written.values()), bytes_by_kind=written))
        summary = chain_summary(rows, run_dir)
    options = {"links": links, "clients": clients}
    payload = dict(benchmark="chain_soak", harness="simulation.local.run_local", options=options)
    payload |= dict(run_config=resolved_config(ov), run_wall_s=wall, summary=summary, rounds=rows)
    h.write_result(args.name, payload, args.out)
    x, title = [r["round"] for r in rows], f"{links} links, {clients} clients, per round"
    curves = {"round time (s) x 100": (x, [100 * r["round_time_s"] for r in rows])}
    curves["kB written to the run dir"] = (x, [r["bytes_written"] / 1e3 for r in rows])
    curves["client link cache (kB)"] = (x, [(r["cache_bytes"] or 0) / 1e3 for r in rows])
    h.plot(args.out / f"{args.name}.png", title, curves, xlabel="round", yscale="log")
    print(json.dumps({k: v for k, v in summary.items() if k != "bytes_per_round"}, indent=1))
    return payload


# --- byzantine ------------------------------------------------------------------------
RULES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum")
ATTACKS = {"clean": None, "scale10": 10.0, "signflip": -1.0}
TOLERANCE = 0.05
BYZANTINE_RUN = {"partitioner": "iid", "num-links": 2, "rounds-per-link": 2, "local-steps": 6}
BYZANTINE_RUN |= {"lr": 5e-3, "max-train-blocks": 48, "max-eval-blocks": 48, "export": False}
BYZANTINE_RUN |= {"fraction-evaluate": 0.0, "trim-beta": 0.2, "krum-select": 3, "device": "cpu"}


def attacked_run(point: Point) -> dict:
    """One run; the last `num-malicious` nodes are Byzantine unless clean."""
    from simulation.local import make_grid, run_local
    from testing.attackers import scaled_update

    grid = make_grid(point.overrides, point.nodes)
    factor = ATTACKS[point.tags["attack"]]
    byzantine = sorted(grid.apps)[-point.overrides["num-malicious"] :] if factor else []
    for node in byzantine:
        grid.apps[node] = scaled_update(grid.apps[node], factor)
    start = time.perf_counter()
    rounds = run_local(point.overrides, grid=grid).metrics["rounds"]
    ppl = [r["central"]["ppl"] for r in rounds]
    rejected = sum(len(r.get("rejected", [])) for r in rounds[1:])
    row = dict(byzantine_nodes=byzantine, base_ppl=ppl[0], final_ppl=ppl[-1], series=ppl[1:])
    return row | dict(rejected=rejected, wall_time_s=time.perf_counter() - start)


def byzantine(args: Any) -> dict:
    """Final perplexity under each aggregation rule, clean and attacked."""
    with tempfile.TemporaryDirectory() as tmp:
        tiny = {**h.tiny_assets(Path(tmp)), **h.TINY_RUN, "num-links": 1, "krum-select": 2}
        tiny = tiny if args.tiny else {}
        rules, attacks = args.rules.split(","), args.attacks.split(",")
        rules, attacks = (["fedavg", "fedmedian"], ["scale10"]) if args.tiny else (rules, attacks)
        clients = 4 if args.tiny else args.clients
        base = h.with_sets(BYZANTINE_RUN | tiny, args)
        base |= {"min-available-nodes": clients, "num-malicious": args.attackers}
        pairs = [("fedavg", "clean"), *((r, a) for a in attacks for r in rules)]
        plan = [Point({**base, "strategy": r}, clients, {"rule": r, "attack": a}) for r, a in pairs]
        started = time.perf_counter()
        results = args.out / f"{args.name}.runs.jsonl"
        runs = run_grid(plan, attacked_run, results, resume=args.resume).rows
    clean = {r["rule"]: r["final_ppl"] for r in runs if r["attack"] == "clean"}
    table = []
    for r in runs:
        row = {k: r[k] for k in ("rule", "attack", "final_ppl")}
        row["ratio_to_clean_fedavg"] = r["final_ppl"] / clean["fedavg"]
        row["ratio_to_clean_same_rule"] = h.ratio(r["final_ppl"], clean.get(r["rule"]))
        table.append(row | {"within_5pct": row["ratio_to_clean_fedavg"] <= 1 + TOLERANCE})
    robust = [r for r in table if r["attack"] != "clean" and r["rule"] != "fedavg"]
    attacked = [r for r in table if r["attack"] != "clean" and r["rule"] == "fedavg"]
    fedavg = {r["attack"]: {"final_ppl": r["final_ppl"]} for r in attacked}
    for v in fedavg.values():
        v["vs_base_ppl"] = v["final_ppl"] / runs[0]["base_ppl"]
    summary = {"robust_within_5pct": all(r["within_5pct"] for r in robust)}
    failed = [f"{r['rule']}/{r['attack']}" for r in robust if not r["within_5pct"]]
    summary["robust_failures"] = failed
    summary["fedavg_under_attack"] = fedavg
    payload = dict(benchmark="byzantine", harness="simulation.local.run_local", run_config=base)
    payload["attack"] = f"{args.attackers} of {clients} clients send sent + f * (trained - sent)"
    payload["options"] = {"rules": rules, "attacks": attacks, "clients": clients}
    payload |= dict(reference="clean fedavg final perplexity", tolerance=TOLERANCE, table=table)
    payload |= dict(summary=summary, grid_seconds=time.perf_counter() - started, runs=runs)
    h.write_result(args.name, payload, args.out)
    labels = list(dict.fromkeys(r["rule"] for r in runs))
    ppl = {(r["rule"], r["attack"]): r["final_ppl"] for r in runs}
    attacks = dict.fromkeys(r["attack"] for r in runs)
    series = {a: [ppl.get((x, a), 0) for x in labels] for a in attacks}
    title, line = "final perplexity, Byzantine clients", (1 + TOLERANCE) * clean["fedavg"]
    h.plot(args.out / f"{args.name}.png", title, series, labels, yscale="log", line=line)
    print(json.dumps(summary))
    return payload


ap, subs = h.cli(__doc__)
p = h.command(subs, "chain", chain, "chain_soak")
p.add_argument("--links", type=int, default=256, help="chain links (num-links)")
p.add_argument("--clients", type=int, default=4)
p = h.command(subs, "byzantine", byzantine, "byzantine")
p.add_argument("--rules", default=",".join(RULES))
p.add_argument("--attacks", default="scale10,signflip")
p.add_argument("--clients", type=int, default=5)
p.add_argument("--attackers", type=int, default=1, help="krum/multikrum are told it")
p.add_argument("--resume", action="store_true", help="skip runs in <name>.runs.jsonl")
main = h.main_of(ap)

if __name__ == "__main__":
    main()
