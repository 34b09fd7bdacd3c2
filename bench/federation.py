"""The federation around the clients: transport, processes and GPUs.

    python -m bench.federation sim                                      # sim_overhead.json
    python -m bench.federation deploy --preset cpu-default --nodes 2    # deploy-<preset>.json
    python -m bench.federation gpu-sim --configs 16x4 --shape llama2-7b # gpu_sim-<label>-<shape>
    python -m bench.federation gpu-clients --gpus 1,2                   # gpu_clients.json

sim: the same clients in one process and under Ray; Ray's steady round over the plain one.
deploy: a real flower-superlink and data owners' `client.node` commands beside the launcher's
simulation and Flower's floor (the same messages, the work cut to one step); goals per N:
steady median deployed <= floor + 1.1 x simulated + 1 s, one build per worker per link, one
tokenizing per partition and split. `--resume` runs only the parts of each row (simulated,
each layout, each floor) that the result file lacks, so a row longer than one call (N=4 at
0.36B on a GPU: over 570 s) finishes over two.
gpu-sim: the launcher per NxK (K clients per GPU): the steady round over the clients'
critical path (goal 1.25), GPU use, host PSS of clients and server over one float32 master
(goal 1.3 each). gpu-clients: N clients sharing G GPUs under Ray against the same clients in
turn in one process, probed per call, and the A digests here against the CPU's (no GPU,
--tiny: Ray gets logical GPUs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import harness as h


def role(cmd: str) -> str:
    """What a process of the run is, by its command line (Ray retitles its actors)."""
    marks = {"ClientAppActor": "clients", "flwr-simulation": "server"}
    return next((name for mark, name in marks.items() if mark in cmd), "other")


# cpu-0.18b: a 0.73 GB master outweighs a Python process, so CPU host-memory rows mean something
CPU_018B = dict(h.TINY_SHAPE, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12)
CPU_018B |= {"num_attention_heads": 16, "num_key_value_heads": 4}
SHAPES = {"qwen-0.36b": {**h.QWEN25_05B, "vocab_size": 0}, "llama2-7b": h.LLAMA2_7B}
SHAPES |= {"cpu-0.18b": CPU_018B, "tiny": h.TINY_SHAPE}
GPU_RUN = {"partitioner": "iid", "precision": "bf16", "seq-len": 512, "batch-size": 4}
GPU_RUN |= {"local-steps": 10, "max-eval-blocks": 16, "export": False}
CPU_RUN = {"precision": "fp32", "seq-len": 32, "local-steps": 2, "max-eval-blocks": 4}


# --- sim ------------------------------------------------------------------------------
def sim(args: Any) -> dict:
    """Ray simulation against the same clients in one process: the steady round."""
    run = {**h.THROUGHPUT_RUN, "rounds-per-link": 3, "local-steps": 3, "batch-size": 4}
    run |= {"seq-len": 32, "rank": 4, "alpha": 8.0, "device": "cpu", "min-available-nodes": 1}
    run |= {"rounds-per-link": 2, "local-steps": 1} if args.tiny else {}
    args.base = h.with_sets(run, args)
    variants = {"plain-1-thread": {"threads": 1}, "plain": {}, "ray": {"mode": "ray"}}
    variants["ray-nice0"] = {"mode": "ray", "env": {"RAY_worker_niceness": "0"}}  # 15 shipped
    chosen = ["plain-1-thread"] if args.tiny else args.variants.split(",")
    clients, runs = 2 if args.tiny else args.clients, {}
    with tempfile.TemporaryDirectory(prefix="bench-sim-") as tmp:
        assets = h.tiny_assets(Path(tmp))
        args.model_dir, args.data = assets["model-name"], assets["dataset"]
        for name in chosen:
            spec = {"mode": "local", **variants[name], "nodes": clients, "num_cpus": 1}
            memory = h.Sampler(lambda: h.host_memory(os.getpid(), lambda cmd: "all"), 0.2)
            memory.start()
            runs[name] = probed_run(args, spec, Path(tmp), name)
            memory.stop.set()
            peak = max((m["all"][0] for _, m in memory.samples), default=0)
            runs[name]["peak_rss_mb"] = peak / h.MIB
            print(name, runs[name].get("round_s"), runs[name].get("why"), flush=True)
    best = min((r.get("round_s") or math.inf for k, r in runs.items() if "plain" in k))
    ratios = {k: h.ratio(r.get("round_s"), best) for k, r in runs.items() if "ray" in k}
    met = {k: v is not None and v <= 1.3 for k, v in ratios.items()}
    overhead = dict(clients=clients, runs=runs, best_plain_steady_round_s=best)
    overhead |= dict(steady_round_ratio_over_best_plain=ratios, goal_ratio_max=1.3, goal_met=met)
    options = {"clients": clients, "variants": chosen}
    payload = dict(benchmark="sim_overhead", options=options, run_config=args.base)
    h.write_result(args.name, payload | {"overhead": overhead}, args.out)
    return payload


# --- the launcher, watched ------------------------------------------------------------
def nvml(gpus: int) -> Any:
    """A sampler of the first `gpus` GPUs' NVML utilisation (0-1) and used memory, or one of
    nothing where there is no NVML (the CPU check)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(gpus)]
    except Exception:  # noqa: BLE001
        return lambda: None
    utilisation, memory = pynvml.nvmlDeviceGetUtilizationRates, pynvml.nvmlDeviceGetMemoryInfo
    return lambda: ([utilisation(x).gpu / 100 for x in handles], [memory(x).used for x in handles])


def launch(overrides: dict, nodes: int, per_gpu: int, gpus: int, cache: Path | None = None) -> dict:
    """`simulation.launch` once; the rounds with their end times, GPU and host samples.
    `cache`: the clients' cache folder (their float32 master files), else the user's."""
    run_dir = Path(overrides["output-dir"]) / overrides["run-name"]
    cpus = max(1, (os.cpu_count() or 2) // max(1, min(nodes, per_gpu * max(gpus, 1))))
    text = " ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())
    cmd = [sys.executable, "-m", "simulation.launch", "--num-supernodes", str(nodes)]
    cmd += ["--num-cpus", str(cpus), "--num-gpus", str(1 / per_gpu if gpus else 0)]
    env = {**os.environ, "PYTHONPATH": f"{h.REPO}:{os.environ.get('PYTHONPATH', '')}"}
    if cache is not None:
        from client.compose import CACHE_ENV

        env[CACHE_ENV] = str(cache)
    if gpus:  # the first `gpus` GPUs only, so one machine measures 1 GPU against 2
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(gpus))
    sampler, ended, start = h.Sampler(nvml(gpus), 0.25), {}, time.time()
    sampler.start()
    with open(run_dir.parent / f"{overrides['run-name']}.log", "w") as log:
        cmd += ["--run-config", text]
        proc = subprocess.Popen(cmd, cwd=h.REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        memory = h.Sampler(lambda: h.host_memory(proc.pid, role))
        memory.start()
        while proc.poll() is None:
            for entry in h.read_rounds(run_dir):
                ended.setdefault(entry["round"], time.time())
            time.sleep(0.25)
    sampler.stop.set()
    memory.stop.set()
    rounds = [r for r in h.read_rounds(run_dir) if r.get("round", 0) > 0]
    for entry in rounds:
        entry["ended_at"] = ended.get(entry["round"], time.time())
    out = dict(rc=proc.returncode, start=start, rounds=rounds)
    return out | dict(samples=sampler.samples, host=memory.samples)


def host_pss(samples: list, window: tuple[float, float], master: float) -> dict:
    """Peak and steady-window mean PSS per role (GB), and each over one `master` (bytes)."""
    out: dict[str, Any] = {"master_gb": master / 1e9}
    for name in ("clients", "server", "other"):
        sizes = [(at, m.get(name, [0, 0])) for at, m in samples]
        peak = max((b for _, (b, _) in sizes), default=0)
        mean = h.mean([b for at, (b, _) in sizes if window[0] <= at <= window[1]])
        out[name] = dict(peak_gb=peak / 1e9, steady_gb=mean and mean / 1e9)
        out[name]["peak_over_master"] = h.ratio(peak, master)
        out[name]["steady_over_master"] = h.ratio(mean, master)
        out[name]["processes"] = max((n for _, (_, n) in sizes), default=0)
    return out


# --- deploy ---------------------------------------------------------------------------
DEPLOY_PRESETS = {"cpu-default": {"shape": None, "gpu": False, "run": {"fraction-evaluate": 1.0}}}
DEPLOY_PRESETS["tiny"] = {"shape": h.TINY_SHAPE, "gpu": False, "run": {**GPU_RUN, **CPU_RUN}}
GPU_PRESETS = ("qwen-0.36b", "llama2-7b")
DEPLOY_PRESETS |= {k: {"shape": SHAPES[k], "gpu": True, "run": GPU_RUN} for k in GPU_PRESETS}
FLOOR_WORK = {"local-steps": 1, "batch-size": 1, "max-eval-blocks": 1, "eval-batch-size": 1}
FLOWER_POLL = "3"  # the floor: Flower's own SuperNode idle poll (client/supernode.py)


def worker_stats(log_dir: Path) -> dict[str, list[dict]]:
    """Every message each worker of a node command served (its log; a restarted worker's
    earlier logs `worker-0.<ms>.log` first): time, partition, builds, tokenized."""
    workers: dict[str, list[dict]] = {}
    for path in sorted(log_dir.glob("worker*.log")):
        rows = workers.setdefault(path.name.split(".")[0], [])
        for line in path.read_text(errors="replace").splitlines():
            if match := re.match(r"(\S+ \S+) worker message (\{.*\})", line):
                stamp = time.mktime(time.strptime(match[1].split(",")[0], "%Y-%m-%d %H:%M:%S"))
                rows.append({"at": stamp, "log": path.name, **json.loads(match[2])})
    return workers


def deployed(root: Path, overrides: dict, nodes: int, layout: str, *node_args: str) -> dict:
    """One run on a SuperLink and node commands laid out by `layout`, given `node_args`."""
    from simulation.federation import Federation, wait_for

    root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(overrides["output-dir"]) / overrides["run-name"]
    ids = [str(i) for i in range(nodes)]
    groups = ids if layout == "node" else [",".join(ids)]
    with Federation(root) as fed:
        fed.start_superlink()
        for i, partitions in enumerate(groups):
            per = "host" if layout == "host" else "partition"
            fed.start_node(f"owner-{i}", partitions, nodes, "--workers", per, *node_args)

        def listening() -> bool:
            for i in range(len(groups)):  # a node command that exited: say why
                assert fed.procs[f"owner-{i}"].poll() is None, fed.log(f"owner-{i}")[-2000:]
            return len(list(root.glob("owner-*.sock"))) == (1 if layout == "host" else nodes)

        wait_for(listening, 300, "the workers")
        start, ended = time.time(), {}
        run_id = fed.submit(" ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()))

        def finished() -> str | None:
            for entry in h.read_rounds(run_dir):
                ended.setdefault(entry["round"], time.time())
            status = fed.status(run_id)
            return status if status.startswith("finished") else None

        status = wait_for(finished, 1800, "the deployed run", poll=0.5)
    rounds = [r for r in h.read_rounds(run_dir) if r.get("round", 0) > 0]
    for entry in rounds:
        entry["ended_at"] = ended.get(entry["round"])
    stats = {}
    for i in range(len(groups)):
        stats |= {f"owner-{i}/{k}": v for k, v in worker_stats(root / f"owner-{i}").items()}
    shutil.rmtree(fed.cache, ignore_errors=True)  # its master files: 27 GB a link at 7B
    return {"status": status, "start": start, "rounds": rounds, "workers": stats}


def summary(run: dict) -> dict:
    """Rounds, steady median and per worker its messages, builds and tokenized datasets
    (in all and as each round ended)."""
    walls, keys = h.steady(run["rounds"]), ("round", "link", "round_in_link", "wall_time")
    row: dict[str, Any] = {"steady_median_s": statistics.median(walls) if walls else None}
    row |= {"rounds": [{k: r.get(k) for k in (*keys, "ended_at", "phases")} for r in run["rounds"]]}
    row["steady_s"] = walls
    for name, lines in run.get("workers", {}).items():
        last, per_round = lines[-1] if lines else {}, []
        for r in run["rounds"]:
            done = [x for x in lines if r.get("ended_at") and x["at"] <= r["ended_at"]] or [{}]
            per_round.append({"round": r["round"], "builds": done[-1].get("builds")})
            per_round[-1] |= done[-1].get("tokenized", {})
        worker = dict(messages=len(lines), partitions=sorted({x["partition"] for x in lines}))
        worker |= dict(builds=last.get("builds"), tokenized=last.get("tokenized"))
        worker |= dict(per_round=per_round, seconds=[x["seconds"] for x in lines])
        row.setdefault("workers", {})[name] = worker
    return row


def goals(row: dict, run: dict) -> dict:
    """Each deployed layout's steady round against floor + 1.1 x simulated + 1 s, its
    builds against the links and its tokenized datasets against its partitions."""
    sim_s, floor = row["simulated"]["steady_median_s"], row.get("floor", {}).get("steady_median_s")
    bound = floor + 1.1 * sim_s + 1.0 if None not in (floor, sim_s) else None
    out: dict[str, Any] = {"simulated_s": sim_s, "floor_s": floor}
    for key, value in row.items():
        if not key.startswith("deployed_"):
            continue
        dep, workers = value["steady_median_s"], value.get("workers", {}).values()
        met = dep is not None and bound is not None and dep <= bound
        goal = dict(steady_s=dep, bound_s=bound, over_simulated=h.ratio(dep, sim_s), round_met=met)
        goal["builds_met"] = all((w["builds"] or 0) <= int(run["num-links"]) for w in workers)
        per = [(w["tokenized"] or {}, len(w["partitions"])) for w in workers]
        once = all(t.get(s, 0) <= n for t, n in per for s in ("train", "eval"))
        out[key] = goal | {"tokenized_met": once}
    return out


RUN_PATHS = ("output-dir", "model-name", "dataset")  # under the work folder: differ per call


MACHINE = ("gpu", "cpu_count")  # environment keys a resumed row's timings must share


def resumed_rows(path: Path, preset: str, run: dict) -> list[dict]:
    """The rows of an earlier `deploy` of the same preset and run config on the same kind
    of machine at `path` (none when there is no file), so a long row finishes over several
    calls; anything else is refused, naming what differs (timings compare only side by
    side)."""
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    old, new = (
        {k: v for k, v in r.items() if k not in RUN_PATHS} for r in (doc["run_config"], run)
    )
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    here, there = h.environment(), doc.get("environment", {})
    differ += [
        f"{k} {there.get(k)!r} there, {here.get(k)!r} here"
        for k in MACHINE
        if there.get(k) != here.get(k)
    ]
    if doc.get("preset") != preset:
        differ.insert(0, f"preset {doc.get('preset')!r}")
    if differ:
        raise SystemExit(f"--resume: {path} holds another run ({', '.join(differ)})")
    return doc["rows"]


def deploy(args: Any) -> None:
    """Separate machines (on this one) against the simulation and Flower's floor; with
    `--resume`, only the parts (simulated, each layout, each floor) the file lacks."""
    from tasks.models import ENV_VAR, asset_candidates
    from testing.tiny import save_random_lm, save_text_dataset

    os.environ.setdefault(ENV_VAR, str(asset_candidates("base-model")[0]))  # where not installed
    name = "tiny" if args.tiny else args.preset
    args.work.mkdir(parents=True, exist_ok=True)
    preset, work = DEPLOY_PRESETS[name], Path(tempfile.mkdtemp(prefix=f"{name}-", dir=args.work))
    base = {"num-links": 2, "rounds-per-link": 3, **preset["run"]}
    base["output-dir"] = str(work / "outputs")
    (work / "outputs").mkdir(parents=True)
    if preset["shape"] is not None:  # kept across calls (--resume): 13.5 GB at 7B
        shape = {k: v for k, v in preset["shape"].items() if k != "vocab_size"}
        key = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
        assets = args.work / f"{name}-assets-{key}"  # another shape gets other assets
        save_random_lm(assets / "model", shape)
        save_text_dataset(assets / "text", min_chars=2_000_000 if preset["gpu"] else 50_000)
        base |= {"model-name": str(assets / "model"), "dataset": str(assets / "text")}
    base, gpu, stem = h.with_sets(base, args), preset["gpu"], args.name or f"deploy-{name}"
    rows = resumed_rows(args.out / f"{stem}.json", name, base) if args.resume else []

    def save() -> None:  # after each part: a run cut short keeps what it measured
        h.write_result(stem, {"preset": name, "run_config": base, "rows": rows}, args.out)

    for mode, nodes in ((m, n) for m in args.client_eval.split(",") for n in h.ints(args.nodes)):
        cfg, tag, key = {**base, "client-eval": mode}, f"{mode}-n{nodes}", (mode, nodes)
        row = next((r for r in rows if (r["client_eval"], r["nodes"]) == key), None)
        if row is None:
            rows.append(row := {"client_eval": mode, "nodes": nodes})
        if "simulated" not in row:
            cache = work / f"{tag}-sim-cache"
            simulated = launch({**cfg, "run-name": f"{tag}-sim"}, nodes, nodes, int(gpu), cache)
            shutil.rmtree(cache, ignore_errors=True)
            row["simulated"] = summary(simulated)
            save()
        for layout in [x for x in args.layout.split(",") if x]:
            if f"deployed_{layout}" in row:
                continue
            threads = ("--threads", str(max(1, (os.cpu_count() or 1) // nodes)))
            extra = threads if layout == "node" and not gpu else ()  # shares CPUs as actors do
            ov = {**cfg, "run-name": f"{tag}-{layout}"}
            row[f"deployed_{layout}"] = summary(
                deployed(work / f"{tag}-{layout}", ov, nodes, layout, *extra)
            )
            save()
        for floor in [f for f in args.floors.split(",") if f and f not in row]:
            ov = {**cfg, **FLOOR_WORK, "run-name": f"{tag}-{floor}"}
            extra = ("--idle-poll", FLOWER_POLL) if floor == "floor" else ()
            row[floor] = summary(deployed(work / f"{tag}-{floor}", ov, nodes, "partition", *extra))
            save()
        row["goals"] = goals(row, cfg)
        save()
        print(json.dumps({"client_eval": mode, "nodes": nodes, **row["goals"]}), flush=True)


# --- gpu-sim --------------------------------------------------------------------------
def floor_tokens_per_s(overrides: dict, passes: int = 3) -> list[float]:
    """Tokens/s of one client's round trained in this process, per pass after a warm-up."""
    import torch

    from client.local import train
    from contract.config import RunConfig
    from runtime.devices import pick_device, place
    from seedlora import prepare
    from tasks import build_task

    cfg = RunConfig.from_flower(overrides)
    task, a, device = build_task(cfg.task_config(1)), cfg.adapter, pick_device(cfg.train.device)
    targets = a.targets(task.target_modules)
    kw = {"kind": a.kind, "seed": a.seed, "rank": a.rank, "alpha": a.alpha}
    model = prepare(task.load_model(), a.method, targets, **kw)
    model, data = place(model, device, cfg.train.precision), task.train_dataset(0)
    train(model, task, data, cfg, device, data_seed=0)  # warm-up: kernels, allocator
    rates = []
    for seed in range(1, passes + 1):
        start = time.perf_counter()
        steps = train(model, task, data, cfg, device, data_seed=seed).steps
        torch.cuda.synchronize() if device.type == "cuda" else None
        tokens = steps * cfg.train.batch_size * cfg.task.seq_len
        rates.append(tokens / (time.perf_counter() - start))
    return rates


def gpu_summary(run: dict, nodes: int, per_gpu: int, gpus: int, ov: dict, master: float) -> dict:
    """Steady rounds (round 1 is the warm-up) against the clients' critical path, GPU
    utilisation, tokens/s per GPU, peak GPU memory and host PSS."""
    rounds = sorted(run["rounds"], key=lambda r: r["round"])
    concurrent, per_round = min(nodes, per_gpu * max(gpus, 1)), []
    for prev, cur in zip(rounds, rounds[1:], strict=False):
        mean_train = cur.get("train_metrics", {}).get("train-time", 0.0)
        phases = cur.get("phases") or {}
        train = phases.get("client_train_sum", mean_train * cur.get("accepted", 0))
        wall = cur["ended_at"] - prev["ended_at"]
        row = dict(round=cur["round"], wall=wall, critical_path=train / concurrent)
        per_round.append(row | dict(accepted=cur.get("accepted"), phases=cur.get("phases")))
    window = (rounds[0]["ended_at"], rounds[-1]["ended_at"]) if rounds else (0, 0)
    util = [sum(u) / len(u) for t, (u, _) in run["samples"] if window[0] <= t <= window[1] and u]
    wall = h.mean([r["wall"] for r in per_round])
    critical = h.mean([r["critical_path"] for r in per_round])
    tokens = nodes * ov["local-steps"] * ov["batch-size"] * ov["seq-len"]
    out = dict(nodes=nodes, clients_per_gpu=per_gpu, gpus=gpus, rc=run["rc"])
    out["steady_rounds"] = [r["round"] for r in (rounds[1:] or rounds)]
    out |= dict(round_time_mean=wall, critical_path_mean=critical)
    out |= dict(round_over_critical_path=h.ratio(wall, critical), gpu_util_mean=h.mean(util))
    out["tokens_per_s_per_gpu"] = tokens / wall / max(gpus, 1) if wall else None
    out["peak_gpu_memory_gb"] = max((max(m) for _, (_, m) in run["samples"] if m), default=0) / 1e9
    out["host_pss"] = host_pss(run.get("host", []), window, master)
    return out | {"rounds": per_round}


def gpu_sim(args: Any) -> dict:
    """The launcher on GPUs: round vs critical path, GPU use, host PSS per role."""
    import torch

    from testing.tiny import save_random_lm, save_text_dataset

    shape, cpu = ("tiny", True) if args.tiny else (args.shape, args.cpu)
    gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model, data = out / f"model-{shape}", out / "text"
    facts = save_random_lm(model, {k: v for k, v in SHAPES[shape].items() if k != "vocab_size"})
    save_text_dataset(data, min_chars=50_000 if cpu else 2_000_000)
    base = {**GPU_RUN, "num-links": 2, "rounds-per-link": 2, **(CPU_RUN if cpu else {})}
    base |= {"model-name": str(model), "dataset": str(data), "output-dir": str(out)}
    base, rows = h.with_sets(base, args), []
    for spec in args.configs.split(","):
        nodes, per_gpu = (int(x) for x in spec.split("x"))
        ov = {**base, "run-name": f"{args.label}-{shape}-{spec}-{int(time.time())}"}
        run = launch(ov, nodes, per_gpu, gpus)
        row = gpu_summary(run, nodes, per_gpu, gpus, ov, facts["params"] * 4)
        rows.append({"label": args.label, "config": spec, **row})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "rounds"}), flush=True)
    passes = floor_tokens_per_s({**base, "device": "auto"})
    for row in rows:
        row |= {"floor_tokens_per_s": statistics.fmean(passes), "floor_passes": passes}
        row["tokens_per_s_over_floor"] = h.ratio(row["tokens_per_s_per_gpu"], h.mean(passes))
    payload = dict(shape=shape, model=facts, run_config=base, rows=rows)
    name = args.name or f"gpu_sim-{args.label}-{shape}"
    h.write_result(name, payload | {"gpu": h.environment().get("gpu")}, out)
    series = {"round / critical path": [r["round_over_critical_path"] or 0 for r in rows]}
    for who in ("clients", "server"):
        series[f"{who} PSS / master"] = [r["host_pss"][who]["peak_over_master"] or 0 for r in rows]
    h.plot(out / f"{name}.png", f"{shape} (goals 1.25, 1.3)", series, [r["config"] for r in rows])
    return payload


# --- gpu-clients ----------------------------------------------------------------------
GPU_CLIENTS_RUN = {**h.THROUGHPUT_RUN, "rounds-per-link": 3, "local-steps": 10, "rank": 16}
GPU_CLIENTS_RUN |= {"batch-size": 4, "seq-len": 512, "precision": "bf16", "device": "auto"}
GPU_CLIENTS_RUN["min-available-nodes"] = 1  # with N = 1 the default 2 would wait for ever
TINY_CLIENTS_RUN = {"rounds-per-link": 2, "local-steps": 2, "batch-size": 2, "seq-len": 64}
TINY_CLIENTS_RUN["rank"] = 4
MODELS = {"qwen2.5-0.5b-shape": {**SHAPES["qwen-0.36b"], "rope_theta": 1e6, "rms_norm_eps": 1e-6}}
MODELS["tiny"] = {**h.TINY_SHAPE, "tie_word_embeddings": True}
GROWTH_TOLERANCE = 16 * h.MIB  # allocator rounding; a kept model would be hundreds of MiB


def trained_tokens(examples: int, batch: int, steps: int, seq_len: int) -> int:
    """Tokens of `steps` batches cycling over `examples` blocks (the last may be short)."""
    sizes = [min(batch, examples - i) for i in range(0, examples, batch)]
    return seq_len * sum(sizes[k % len(sizes)] for k in range(steps)) if sizes else 0


def union_length(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: the time some client was computing."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total, reach = total + end - max(start, reach), end
    return total


def probe_round(entry: dict, records: list[dict], ov: dict) -> dict[str, Any]:
    """One round from the probe: tokens, the split of its time, GPU memory per client."""
    r, wall = entry["round"], entry["wall_time"]
    calls = [c for c in records if c["kind"] == "client" and c["round"] == r]
    calls = [c for c in calls if c["message_type"] == "train"]
    grid_s = sum(g["end"] - g["start"] for g in records if g["kind"] == "grid" and g["round"] == r)
    busy = union_length([(c["start"], c["end"]) for c in calls])
    batch, steps, seq = ov["batch-size"], ov["local-steps"], ov["seq-len"]
    tokens = sum(trained_tokens(int(c.get("num_examples") or 0), batch, steps, seq) for c in calls)
    gpu = [c for c in calls if c.get("gpu")]
    train = [c["train_time"] for c in calls if c.get("train_time") is not None]
    out = dict(round=r, round_s=wall, clients=len(calls), accepted=entry["accepted"])
    out |= dict(errors=[c["error"] for c in calls if c["error"]], tokens=tokens)
    out["tokens_per_s"] = tokens / wall
    out["split_s"] = dict(client_compute=busy, flower_ray_overhead=grid_s - busy)
    out["split_s"]["server_and_aggregation"] = wall - grid_s
    out["client_train_time_s"] = {"mean": h.mean(train), "max": max(train, default=None)}
    out["peak_gpu_mb_per_client"] = [c["gpu"]["peak_allocated"] / h.MIB for c in gpu]
    out["gpu_mb_after_call"] = {str(c["pid"]): c["gpu"]["allocated_after"] / h.MIB for c in gpu}
    gpu_ids = {",".join((c.get("ray") or {}).get("gpu_ids", [])) for c in calls}
    return out | {"ray_gpu_ids": sorted(gpu_ids), "pids": sorted({c["pid"] for c in calls})}


def probed_run(args: Any, spec: dict[str, Any], work: Path, tag: str) -> dict[str, Any]:
    """One probed run in a child process: per round figures and their steady means."""
    from simulation.launch import OFFLINE_ENV, SIMULATION_ENV
    from testing.probe import read

    ov = {**args.base, "model-name": str(args.model_dir), "dataset": str(args.data)}
    ov["max-train-blocks"] = ov["local-steps"] * ov["batch-size"]
    ov |= {"round-timeout": args.timeout_s, "output-dir": str(work), "run-name": tag}
    spec = {**spec, "overrides": ov, "probe": str(work / f"{tag}.probe")}
    spec["cache_dir"] = str(work / "link-cache")
    env = {**OFFLINE_ENV, **SIMULATION_ENV, "HF_HUB_OFFLINE": "1", **spec.get("env", {})}
    if spec.get("cuda_visible_devices") is not None:
        env["CUDA_VISIBLE_DEVICES"] = spec["cuda_visible_devices"]
    run = h.run_child(spec, work, args.timeout_s, env)
    row = dict(mode=spec["mode"], clients=spec["nodes"], gpus=spec.get("gpus"))
    row["client_resources"] = {k: spec.get(k) for k in ("num_cpus", "num_gpus")}
    row["logical_gpus"] = bool(spec.get("init_args", {}).get("num_gpus"))
    row |= {"process_wall_s": run["process_wall_s"], "completed": run["completed"]}
    if not run["completed"]:
        return {**row, "why": run["why"], "log_tail": run["log_tail"]}
    records = read(Path(spec["probe"]))
    rounds = [probe_round(e, records, ov) for e in run["metrics"]["rounds"] if e["round"] > 0]
    steady = rounds[1:] or rounds
    after = {r["round"]: max(r["gpu_mb_after_call"].values(), default=0.0) for r in rounds}
    peaks = [m for r in steady for m in r["peak_gpu_mb_per_client"]]
    row |= dict(rounds=rounds, steady_rounds=[r["round"] for r in steady])
    row["tokens_per_s"] = sum(r["tokens"] for r in steady) / sum(r["round_s"] for r in steady)
    row["round_s"] = h.mean([r["round_s"] for r in steady])
    row["split_s"] = {k: h.mean([r["split_s"][k] for r in steady]) for k in steady[0]["split_s"]}
    row["client_train_time_s_mean"] = h.mean([r["client_train_time_s"]["mean"] for r in steady])
    row["peak_gpu_mb_per_client_max"] = max(peaks, default=None)
    row["gpu_mb_after_call_by_round"] = after
    grown = (after[rounds[-1]["round"]] - after[rounds[0]["round"]]) * h.MIB
    row["gpu_memory_grows"] = grown > GROWTH_TOLERANCE
    clean = all(r["accepted"] == spec["nodes"] and not r["errors"] for r in rounds)
    return row | {"all_accepted": clean}


def gpu_clients(args: Any) -> dict:
    """N clients sharing G GPUs under Ray against the same clients in turn in one process."""
    import torch

    from bench.exactness import digest_section
    from testing.tiny import save_random_lm, save_text_dataset

    clients = h.ints(args.clients or ("1,2" if args.tiny else "1,2,4,8"))
    gpus, model = h.ints(args.gpus), "tiny" if args.tiny else args.model
    args.timeout_s = args.timeout_s or (240.0 if args.tiny else 420.0)
    args.base = h.with_sets({**GPU_CLIENTS_RUN, **(TINY_CLIENTS_RUN if args.tiny else {})}, args)
    ids = [str(i) for i in range(torch.cuda.device_count())]
    ids = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(ids)).split(",") if ids else []
    if ids and max(gpus) > len(ids):
        raise SystemExit(f"--gpus {max(gpus)}: only {len(ids)} GPU(s) visible")
    options = {"clients": clients, "gpus": gpus, "model": model, "timeout_s": args.timeout_s}
    payload = dict(benchmark="gpu_clients", options=options, run_config=args.base, gpu_ids=ids)
    payload |= {"floor": {}, "ray": {str(g): {} for g in gpus}}
    work, began = Path(tempfile.mkdtemp(prefix="bench-gpu-")), time.time()
    cpus = os.cpu_count() or 1
    try:
        args.model_dir, ov = work / f"model-{model}", args.base
        info = save_random_lm(args.model_dir, MODELS[model], max(ov["seq-len"], 512))
        payload["model"] = {"shape": model, "config": MODELS[model], **info}
        chars = max(clients) * ov["local-steps"] * ov["batch-size"] * ov["seq-len"] * 8
        args.data = save_text_dataset(work / "text", min_chars=max(chars, 400_000), chunk=2000)
        for n in clients:
            floor = {"mode": "floor", "nodes": n, "gpus": 1}
            floor |= {"cuda_visible_devices": ids[0]} if ids else {}
            runs = [(payload["floor"], floor, f"floor-n{n}")]
            for g in gpus:  # 1/N of G GPUs each; without a GPU, Ray gets logical ones
                spec = {"mode": "ray", "nodes": n, "gpus": g, "num_cpus": max(1, cpus // n)}
                spec["num_gpus"] = g / n if n >= g else 1.0
                logical = {"init_args": {"num_gpus": g, "num_cpus": max(cpus, n)}}
                spec |= {"cuda_visible_devices": ",".join(ids[:g])} if ids else logical
                runs.append((payload["ray"][str(g)], spec, f"ray-g{g}-n{n}"))
            for into, spec, tag in runs:
                into[str(n)] = row = probed_run(args, spec, work, tag)
                print(tag, row.get("tokens_per_s") or row.get("why"), flush=True)
                h.write_result(args.name, payload, args.out)
        payload["a_digests"] = digest_section("cuda:0" if ids else "cpu")
        payload["comparison"] = []
        for n in clients:
            row = {"clients": n, "floor_tokens_per_s": payload["floor"][str(n)].get("tokens_per_s")}
            for g in gpus:
                tps = payload["ray"][str(g)][str(n)].get("tokens_per_s")
                row[f"ray_{g}gpu_tokens_per_s"] = tps
                per_gpu = h.ratio(tps, g * (row["floor_tokens_per_s"] or 0))
                row[f"ray_{g}gpu_per_gpu_over_floor"] = per_gpu
                if g > 1:
                    row[f"ray_{g}gpu_over_1gpu"] = h.ratio(tps, row.get("ray_1gpu_tokens_per_s"))
            payload["comparison"].append(row)
        payload["total_wall_s"] = time.time() - began
        h.write_result(args.name, payload, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return payload


ap, subs = h.cli(__doc__)
p = h.command(subs, "sim", sim, "sim_overhead")
p.add_argument("--clients", type=int, default=8)
p.add_argument("--variants", default="plain-1-thread,plain,ray,ray-nice0")
p.add_argument("--timeout-s", type=float, default=600.0, help="per run")
p = h.command(subs, "deploy", deploy, "")
p.add_argument("--preset", choices=sorted(DEPLOY_PRESETS), default="cpu-default")
p.add_argument("--nodes", default="2", help="N,... nodes (one partition each)")
p.add_argument("--layout", default="partition", help="partition,host,node (see above)")
p.add_argument("--client-eval", default="with-train", help="with-train,separate")
p.add_argument("--floors", default="floor,floor_fast_poll", help="floor (Flower's poll) ...")
p.add_argument("--work", type=Path, default=Path("/tmp/seedlora-bench-deploy"))
p.add_argument("--resume", action="store_true", help="run only the parts the file lacks")
p = h.command(subs, "gpu-sim", gpu_sim, "")
p.add_argument("--configs", default="16x4,16x8,64x4,64x8", help="NxK,... (K clients per GPU)")
p.add_argument("--shape", choices=sorted(SHAPES), default="qwen-0.36b")
p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all)")
p.add_argument("--label", default="after", help="row label, in the file name")
p.add_argument("--cpu", action="store_true", help="CPU run settings (fp32, short steps)")
p = h.command(subs, "gpu-clients", gpu_clients, "gpu_clients")
p.add_argument("--clients", help="client counts (default 1,2,4,8; --tiny 1,2)")
p.add_argument("--gpus", default="1", help="GPU counts of the Ray series, e.g. 1,2")
p.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-0.5b-shape")
p.add_argument("--timeout-s", type=float, help="per run (default 420; --tiny 240)")
main = h.main_of(ap)

if __name__ == "__main__":
    main()
