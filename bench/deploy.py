"""Separate machines against the simulation: real `flower-superlink` and data owners' node
commands on this machine, side by side with the launcher's simulation and Flower's floor.

    python -m bench.deploy --preset cpu-default --nodes 2
    source .gpubundle/setup.sh && python -m bench.deploy --preset qwen-0.36b --nodes 2,4

For each N in `--nodes`, with one run config (the preset's, `--set` over it):
- `simulated`: `python -m simulation.launch --num-supernodes N` (Ray; on a GPU preset the
  N clients share the GPU, `--num-gpus 1/N`);
- `deployed`: a `flower-superlink` and the data owners' `python -m client.node` (a node
  workers beside its SuperNodes): `--layout partition` (the default) gives one command
  with a worker per partition (training concurrently), `host` one command with one worker
  serving all N partitions in turn, `node` one command per partition;
- `floor`: the deployed processes and message pattern with the clients' work cut to one
  step of batch 1 and one evaluation example (same messages, same array sizes), on
  Flower's own SuperNode (its 3 s idle poll): what Flower's per-message process costs
  before any training; `floor_fast_poll` the same on the node command's default poll
  (client/supernode.py), the floor of `deployed`.

Per run the JSON records every round's wall time (metrics.json) and when it ended, and per
worker the model builds and the tokenized datasets by split (train, eval) from its log. The
goal per N: median steady round (a link's rounds after its first) deployed <= floor +
1.1 x simulated + 1 s; builds at most 1 per worker per link; each partition tokenized
once per split.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import QWEN25_05B, parser, with_sets, write_result
from bench.gpu_sim import LLAMA2_7B, TINY_RUN, TINY_SHAPE, _rounds, launch
from simulation.federation import Federation, wait_for
from tasks.models import ENV_VAR, asset_candidates
from testing.tiny import save_random_lm, save_text_dataset

GPU_RUN: dict[str, Any] = {
    "partitioner": "iid",
    "precision": "bf16",
    "seq-len": 512,
    "batch-size": 4,
    "local-steps": 10,
    "max-eval-blocks": 16,
    "fraction-evaluate": 1.0,
    "export": False,
}
PRESETS: dict[str, dict[str, Any]] = {
    "cpu-default": {"shape": None, "gpu": False, "run": {"fraction-evaluate": 1.0}},
    "tiny": {"shape": TINY_SHAPE, "gpu": False, "run": {**GPU_RUN, **TINY_RUN}},
    "qwen-0.36b": {"shape": {**QWEN25_05B, "vocab_size": 0}, "gpu": True, "run": GPU_RUN},
    "llama2-7b": {"shape": LLAMA2_7B, "gpu": True, "run": GPU_RUN},
}
BASE_RUN = {"num-links": 2, "rounds-per-link": 3}
FLOOR_WORK = {"local-steps": 1, "batch-size": 1, "max-eval-blocks": 1, "eval-batch-size": 1}
RUN_TIMEOUT_S = 1800.0
FLOWER_POLL = "3"  # the floor: Flower's own SuperNode (3 s idle poll, client/supernode.py)


def worker_stats(log_dir: Path) -> dict[str, list[dict]]:
    """Every message each of a node command's workers served (its log, with a restarted
    worker's earlier logs `worker-0.<ms>.log` first): time, partition, builds, tokenized."""
    workers: dict[str, list[dict]] = {}
    for path in sorted(log_dir.glob("worker*.log")):
        rows = workers.setdefault(path.name.split(".")[0], [])
        for line in path.read_text(errors="replace").splitlines():
            match = re.match(r"(\S+ \S+) worker message (\{.*\})", line)
            if match:
                stamp = time.mktime(time.strptime(match[1].split(",")[0], "%Y-%m-%d %H:%M:%S"))
                rows.append({"at": stamp, "log": path.name, **json.loads(match[2])})
    return workers


def deployed(root: Path, overrides: dict, nodes: int, layout: str, *node_args: str) -> dict:
    """One run on a SuperLink and node commands (`layout` host: one, node: one per node),
    each given `node_args`."""
    root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(overrides["output-dir"]) / overrides["run-name"]
    ids = [str(i) for i in range(nodes)]
    groups = ids if layout == "node" else [",".join(ids)]
    expected = nodes if layout != "host" else 1
    with Federation(root) as fed:
        fed.start_superlink()
        for i, partitions in enumerate(groups):
            per = ("--workers", "host" if layout == "host" else "partition")
            fed.start_node(f"owner-{i}", partitions, nodes, *per, *node_args)

        def listening() -> bool:
            for i in range(len(groups)):
                node = fed.procs[f"owner-{i}"]
                assert node.poll() is None, fed.log(f"owner-{i}")[-2000:]  # it failed: say why
            return len(list(root.glob("owner-*.sock"))) == expected

        wait_for(listening, 300, "the workers")
        text = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
        start, ended = time.time(), {}
        run_id = fed.submit(text)

        def finished() -> str | None:
            for entry in _rounds(run_dir):
                ended.setdefault(entry["round"], time.time())
            status = fed.status(run_id)
            return status if status.startswith("finished") else None

        status = wait_for(finished, RUN_TIMEOUT_S, "the deployed run", poll=0.5)
    rounds = [r for r in _rounds(run_dir) if r.get("round", 0) > 0]
    for entry in rounds:
        entry["ended_at"] = ended.get(entry["round"])
    stats = {
        f"owner-{i}/{name}": lines
        for i in range(len(groups))
        for name, lines in worker_stats(root / f"owner-{i}").items()
    }
    return {"status": status, "start": start, "rounds": rounds, "workers": stats}


def steady(rounds: list[dict]) -> list[float]:
    """Wall times of the rounds after each link's first (no build, no tokenizing)."""
    return [r["wall_time"] for r in rounds if r.get("round_in_link", 1) >= 2 and "wall_time" in r]


def summary(run: dict) -> dict:
    walls = steady(run["rounds"])
    row: dict[str, Any] = {
        "rounds": [
            {
                k: r.get(k)
                for k in ("round", "link", "round_in_link", "wall_time", "ended_at", "phases")
            }
            for r in run["rounds"]
        ],
        "steady_median_s": statistics.median(walls) if walls else None,
        "steady_s": walls,
    }
    for name, lines in run.get("workers", {}).items():
        last = lines[-1] if lines else {}
        row.setdefault("workers", {})[name] = {
            "messages": len(lines),
            "partitions": sorted({x["partition"] for x in lines}),
            "builds": last.get("builds"),
            "tokenized": last.get("tokenized"),
            "per_round": _per_round(lines, run["rounds"]),
            "seconds": [x["seconds"] for x in lines],  # each message's time in the worker
        }
    return row


def _per_round(lines: list[dict], rounds: list[dict]) -> list[dict]:
    """Builds and tokenized datasets so far at each round's end (the worker's counters)."""
    out = []
    for r in rounds:
        done = [x for x in lines if r.get("ended_at") and x["at"] <= r["ended_at"]]
        last = done[-1] if done else {}
        out.append({"round": r["round"], "builds": last.get("builds"), **last.get("tokenized", {})})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = parser(__doc__, "deploy")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-default")
    ap.add_argument("--nodes", default="2", help="N,... nodes (one partition each)")
    ap.add_argument(
        "--layout",
        default="partition",
        help="partition,host,node: one command with a worker per partition / one command "
        "with one worker serving all in turn / one command per node",
    )
    ap.add_argument("--client-eval", default="with-train", help="with-train,separate")
    ap.add_argument("--floors", default="floor,floor_fast_poll", help="floor (Flower's poll) ...")
    ap.add_argument("--work", type=Path, default=Path("/tmp/seedlora-bench-deploy"))
    args = ap.parse_args(argv)
    # The embedded base for every process, also where the project is not pip-installed
    # (the GPU machine) or a stray egg-info hides the editable install's source tree.
    os.environ.setdefault(ENV_VAR, str(asset_candidates("base-model")[0]))
    preset = PRESETS[args.preset]
    gpu = preset["gpu"]
    work = args.work / f"{args.preset}-{int(time.time())}"
    base = {**BASE_RUN, **preset["run"], "output-dir": str(work / "outputs")}
    (work / "outputs").mkdir(parents=True)
    if preset["shape"] is not None:
        model = work / "model"
        shape = {k: v for k, v in preset["shape"].items() if k != "vocab_size"}
        save_random_lm(model, shape)
        save_text_dataset(work / "text", min_chars=2_000_000 if gpu else 50_000)
        base.update({"model-name": str(model), "dataset": str(work / "text")})
    base = with_sets(base, args)
    name = args.name if args.name != "deploy" else f"deploy-{args.preset}"
    rows: list[dict] = []
    for mode in args.client_eval.split(","):
        for nodes in (int(n) for n in args.nodes.split(",")):
            row: dict[str, Any] = {"client_eval": mode, "nodes": nodes}
            rows.append(row)

            def save() -> None:  # after each run: a run cut short keeps what it measured
                payload = {"preset": args.preset, "run_config": base, "rows": rows}
                write_result(name, payload, args.out)

            cfg = {**base, "client-eval": mode}
            floors = [f for f in args.floors.split(",") if f]
            compare(row, cfg, args.layout, floors, gpu, work, save)
            print(json.dumps({"client_eval": mode, "nodes": nodes, **row["goals"]}), flush=True)


def compare(
    row: dict,
    base: dict,
    layouts: str,
    floors: list[str],
    gpu: bool,
    work: Path,
    save: Callable[[], None],
) -> None:
    """Into `row`: simulated, deployed (each layout) and floor runs of one run config with
    `row["nodes"]` nodes, then the goals; `save()` after each run."""
    nodes = row["nodes"]
    tag = f"{base['client-eval']}-n{nodes}"
    sim = launch(Path.cwd(), {**base, "run-name": f"{tag}-sim"}, nodes, nodes, int(gpu))
    row["simulated"] = summary(sim)
    save()
    for layout in layouts.split(","):
        ov = {**base, "run-name": f"{tag}-{layout}"}
        # one worker per node shares the CPUs as the simulation's actors do (1/N each)
        threads = ("--threads", str(max(1, (os.cpu_count() or 1) // nodes)))
        args = threads if layout == "node" and not gpu else ()
        run = deployed(work / f"{tag}-{layout}", ov, nodes, layout, *args)
        row[f"deployed_{layout}"] = summary(run)
        save()
    for name in floors:
        ov = {**base, **FLOOR_WORK, "run-name": f"{tag}-{name}"}
        args = ("--idle-poll", FLOWER_POLL) if name == "floor" else ()
        row[name] = summary(deployed(work / f"{tag}-{name}", ov, nodes, "partition", *args))
        save()
    row["goals"] = goals(row, base)
    save()


def goals(row: dict, run: dict) -> dict:
    """Each goal's measured value and whether it is met."""
    sim = row["simulated"]["steady_median_s"]
    floor = row.get("floor", {}).get("steady_median_s")  # Flower's own
    links = int(run["num-links"])
    out: dict[str, Any] = {"simulated_s": sim, "floor_s": floor}
    for key, value in row.items():
        if not key.startswith("deployed_"):
            continue
        dep = value["steady_median_s"]
        bound = floor + 1.1 * sim + 1.0 if None not in (floor, sim) else None
        workers = value.get("workers", {}).values()
        out[key] = {
            "steady_s": dep,
            "bound_s": bound,
            "over_simulated": dep / sim if dep and sim else None,
            "round_met": dep is not None and bound is not None and dep <= bound,
            "builds_met": all((w["builds"] or 0) <= links for w in workers),
            "tokenized_met": all(
                (w["tokenized"] or {}).get(split, 0) <= len(w["partitions"])
                for w in workers
                for split in ("train", "eval")
            ),
        }
    return out


if __name__ == "__main__":
    main()
