"""What the math promises: exact averages, half the bytes, the same A everywhere.

    python -m bench.exactness exactness   # exactness.json: the aggregate vs the exact mean
    python -m bench.exactness bytes       # bytes.json: upload per client-round, a real reply
    python -m bench.exactness a-draw      # a_draw.json: A's draw time and digests

mean_i(B_i) A == mean_i(B_i A) since clients share A; FedIT's mean(B_i) mean(A_i) is not
mean(B_i A_i) (relative Frobenius error, float32, bfloat16, through Flower; goal <= 1e-6).
ours/fedit bytes = n_out / (n_in + n_out) per layer. A's golden digests hold on every CPU
(run a-draw under ATEN_CPU_CAPABILITY=default too) and on the GPU (a_digests_cpu.json).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from typing import Any

import torch
from torch import nn

from bench import harness as h
from seedlora import KINDS, ASpec

GOAL = 1e-6
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
B_STD = 0.02  # size of a trained B entry; relative errors do not depend on it
SHIPPED, FLOAT32, METHODS = "shipped", 4, ("seedlora", "ffa", "fedit", "full")
UNTIED = {"tie_word_embeddings": False}
QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, vocab_size=152064)
QWEN25_7B |= dict(num_attention_heads=28, num_key_value_heads=4, **UNTIED)
CONFIGS = {"qwen2.5-0.5b": {"model_type": "qwen2", **h.QWEN25_05B}}
CONFIGS["llama2-7b"] = {"model_type": "llama", **h.LLAMA2_7B, "vocab_size": 32000, **UNTIED}
CONFIGS["qwen2.5-7b"] = {"model_type": "qwen2", **QWEN25_7B}
DIGEST_REFERENCE = h.RESULTS / "a_digests_cpu.json"
# tests/test_spec.py's golden digests: ASpec(kind, 1234, 2, 4, GOLDEN_LAYER, 64, 192)
GOLDEN_LAYER = "transformer.h.0.attn.c_attn"
DIGEST_LAYERS = [(16, "model.layers.0.self_attn.q_proj", 896, 896), (8, GOLDEN_LAYER, 192, 576)]
DIGEST_LAYERS[1:1] = [(16, "model.layers.0.self_attn.k_proj", 896, 128)]
DIGEST_LAYERS[2:2] = [(8, "model.layers.23.mlp.down_proj", 4864, 896)]
DIGEST_SPECS = [(k, s, c, *x) for k in KINDS for s, c in ((0, 0), (1, 3)) for x in DIGEST_LAYERS]
GOLDEN = {"gaussian": "9573cde1e9648a010d586daa346e65ad996e3bd0915a447bc54bc50c8a3fb61e"}
GOLDEN["random-block"] = "85e5a8664ebaf69898a5496668eebe8418a38548b7a65a6c521fa990a966f0e5"
LLAMA_7B = [(f"self_attn.{p}_proj", 4096) for p in "qkvo"]  # (module, n_in): A is r x n_in
LLAMA_7B += [("mlp.gate_proj", 4096), ("mlp.up_proj", 4096), ("mlp.down_proj", 11008)]


# --- exactness ------------------------------------------------------------------------
def mean_in_dtype(tensors: list[torch.Tensor], factors: list[float]) -> torch.Tensor:
    """sum_i f_i x_i accumulated in the tensors' own dtype, as a plain client/server would."""
    acc = tensors[0] * factors[0]
    for f, x in zip(factors[1:], tensors[1:], strict=True):
        acc = acc + x * f
    return acc


def flower_mean(states: list[dict], weights: list[float]) -> dict[str, torch.Tensor]:
    """The server's FedAvg: Flower's `aggregate_arrayrecords` over float32 ArrayRecords."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    pairs = zip(states, weights, strict=True)
    records = [RecordDict({"a": ArrayRecord(s), "m": MetricRecord({"w": w})}) for s, w in pairs]
    return {k: torch.from_numpy(a.numpy()) for k, a in aggregate_arrayrecords(records, "w").items()}


def trial(
    layers: list[tuple[str, int, int]], n: int, seed: int, rank: int, alpha: float
) -> list[dict]:
    """Every method's error on every layer for one draw of n clients. Each client's B is a
    shared direction plus as large a part of its own (clients of one task agree in part)."""
    from seedlora import merge_delta
    from seedlora.aggregate import mean_update, normalized, relative_error

    gen, scaling = torch.Generator().manual_seed(seed * 1000 + n), alpha / rank
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for name, _, n_out in layers:
        shared = torch.randn(n_out, rank, generator=gen) * B_STD
        for state in states:
            state[name] = shared + torch.randn(n_out, rank, generator=gen) * B_STD
    weights = [float(w) for w in torch.randint(1, 1001, (n,), generator=gen)]
    flower, factors, rows = flower_mean(states, weights), normalized(weights), []
    for name, n_in, n_out in layers:
        bs32 = [s[name] for s in states]
        bound = 1.0 / math.sqrt(n_in)  # FedIT: independent A_i as PEFT's kaiming_uniform(a=sqrt 5)
        fedit_a = [(torch.rand(rank, n_in, generator=gen) * 2 - 1) * bound for _ in range(n)]
        results = []
        for dname, dtype in DTYPES.items():
            a_d, b_d = [x.to(dtype) for x in fedit_a], [b.to(dtype) for b in bs32]
            approx = scaling * mean_in_dtype(b_d, factors) @ mean_in_dtype(a_d, factors)
            exact = mean_update(a_d, b_d, weights, scaling)
            results.append(("fedit", dname, relative_error(approx, exact)))
        for kind in KINDS:
            spec = ASpec(kind, seed, 0, rank, name, n_in, n_out)
            a = spec.dense()
            exact32 = mean_update([a] * n, bs32, weights, scaling)
            base = nn.Linear(n_in, n_out, bias=False)
            nn.init.zeros_(base.weight)
            merge_delta(base, spec, flower[name], scaling)  # what the server folds into W0 = 0
            error = relative_error(base.weight.detach(), exact32)
            results.append((f"seedlora-{kind}+flower", "float32", error))
            for dname, dtype in DTYPES.items():
                bs, a_d = [b.to(dtype) for b in bs32], a.to(dtype)
                exact = exact32
                if dtype != torch.float32:
                    exact = mean_update([a_d] * n, bs, weights, scaling)
                ours = scaling * mean_in_dtype(bs, factors) @ a_d
                results.append((f"seedlora-{kind}", dname, relative_error(ours, exact)))
        where = {"clients": n, "seed": seed, "layer": name}
        rows += [{"method": m, "dtype": d, "error": e, **where} for m, d, e in results]
    return rows


def exactness(args: Any) -> dict:
    """Aggregated update against the exact weighted mean of the clients' updates."""
    clients, n_seeds = ([2, 8], 1) if args.tiny else (h.ints(args.clients), args.seeds)
    rank, alpha = (8, 16.0) if args.tiny else (args.rank, args.alpha)
    shapes = ["64x96", "96x64"] if args.tiny else args.shapes.split(",")
    layers = [(f"synthetic.{s}", int(s.split("x")[1]), int(s.split("x")[0])) for s in shapes]
    if not args.tiny:
        shipped = adapted_layers(load_config(SHIPPED), rank)
        layers += [(x["name"], x["n_in"], x["n_out"]) for x in shipped]
    rows = [r for n in clients for s in range(n_seeds) for r in trial(layers, n, s, rank, alpha)]
    worst: dict[tuple, dict] = {}
    per_layer: dict[tuple, float] = {}
    for r in rows:
        key = (r["method"], r["dtype"], r["clients"])
        if key not in worst or r["error"] > worst[key]["max_error"]:
            worst[key] = dict(zip(("method", "dtype", "clients"), key, strict=True))
            worst[key] |= dict(max_error=r["error"], at_layer=r["layer"], at_seed=r["seed"])
        k = (*key, r["layer"])
        per_layer[k] = max(per_layer.get(k, 0.0), r["error"])
    summary = list(worst.values())
    f32 = [s for s in summary if s["dtype"] == "float32"]
    ours = max(s["max_error"] for s in f32 if s["method"].startswith("seedlora"))
    fedit = min(s["max_error"] for s in f32 if s["method"] == "fedit")
    goal = {"threshold": GOAL, "max_seedlora_float32": ours, "pass": ours <= GOAL}
    goal["min_fedit_float32"] = fedit
    print(goal)
    config = dict(clients=clients, seeds=n_seeds, rank=rank, alpha=alpha, b_std=B_STD)
    config["weights"] = "num-examples ~ U{1..1000}"
    config["layers"] = [{"name": n, "n_in": i, "n_out": o} for n, i, o in layers]
    keys = ("method", "dtype", "clients", "layer")
    per = [dict(zip(keys, k, strict=True), max_error=v) for k, v in per_layer.items()]
    payload = {"config": config, "goal": goal, "summary": summary, "per_layer": per}
    h.write_result(args.name, payload, args.out)
    curves = {}
    for method, dtype in sorted({(s["method"], s["dtype"]) for s in summary}):
        mine = [s for s in summary if (s["method"], s["dtype"]) == (method, dtype)]
        curves[f"{method} ({dtype})"] = zip(*sorted((s["clients"], s["max_error"]) for s in mine))  # noqa: B905
    kw = {"xscale": "log", "yscale": "log", "xlabel": "clients", "line": GOAL}
    h.plot(args.out / f"{args.name}.png", "max relative error vs the exact mean", curves, **kw)
    return payload


# --- bytes ----------------------------------------------------------------------------
def load_config(name: str) -> Any:
    """The shipped model's config, or one of the written-out configs."""
    from transformers import AutoConfig

    from tasks.models import EMBEDDED, resolve_model_path

    if name == SHIPPED:
        return AutoConfig.from_pretrained(resolve_model_path(EMBEDDED))
    spec = dict(CONFIGS[name])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def meta_model(config: Any) -> nn.Module:
    """The model's structure with no storage: a 7B model costs nothing to build."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def adapted_layers(config: Any, rank: int) -> list[dict[str, Any]]:
    """Name, n_in, n_out of the layers `seedlora.inject` adapts with the task's targets."""
    from seedlora import adapter_layers, inject
    from tasks.models import target_modules_for

    model = meta_model(config)
    targets = target_modules_for(config.model_type)
    inject(model, targets, kind="circulant", seed=0, rank=rank, alpha=1.0)
    return [dict(name=n, n_in=m.spec.n_in, n_out=m.spec.n_out) for n, m in adapter_layers(model)]


def count_model(name: str, rank: int) -> dict[str, Any]:
    """Analytic bytes per client-round of every method on one model at one rank, and the
    trainable numbers of each method as the pipeline prepares the model."""
    from seedlora.methods import prepare
    from tasks.models import target_modules_for

    config = load_config(name)
    layers = adapted_layers(config, rank)
    b = sum(x["n_out"] * rank for x in layers)
    numbers = {"seedlora": b, "ffa": b, "fedit": sum(x["n_in"] + x["n_out"] for x in layers) * rank}
    numbers["full"] = sum(p.numel() for p in meta_model(config).parameters())
    prepared = {}
    for method, kind in [("seedlora", k) for k in KINDS] + [(m, "gaussian") for m in METHODS[1:]]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice on GPT-2
            targets, kw = target_modules_for(config.model_type), {"kind": kind, "seed": 0}
            model = prepare(meta_model(config), method, targets, rank=rank, alpha=2.0 * rank, **kw)
        key = f"seedlora-{kind}" if method == "seedlora" else method
        prepared[key] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = {f"seedlora-{k}": b for k in KINDS} | {m: numbers[m] for m in METHODS[1:]}
    groups: dict[tuple[str, int, int], int] = {}
    for x in layers:
        key = (".".join(x["name"].split(".")[-2:]), x["n_in"], x["n_out"])
        groups[key] = groups.get(key, 0) + 1
    row = dict(model=name, model_type=config.model_type, rank=rank, num_adapted_layers=len(layers))
    row |= dict(num_params=numbers["full"], numbers=numbers, layers=layers)
    row["bytes"] = {m: {"up": v * FLOAT32} for m, v in numbers.items()}
    for m in row["bytes"].values():
        m["down_per_round"] = m["up"]
    row["seedlora_join_at_link_k_extra_bytes_per_link"] = b * FLOAT32
    row |= dict(ratio_up_ours_fedit=b / numbers["fedit"], ratio_up_ours_full=b / numbers["full"])
    types = [dict(group=g, n_in=i, n_out=o, count=c) for (g, i, o), c in groups.items()]
    row["layer_types"] = types
    for t in types:
        t["ratio_ours_fedit"] = t["n_out"] / (t["n_in"] + t["n_out"])
        t["exactly_half"] = t["n_in"] == t["n_out"]
    return row | dict(prepared_trainable_numbers=prepared, prepared_agree=prepared == expected)


def measured_reply(rank: int) -> dict[str, Any]:
    """Bytes of one real Flower reply of the shipped model against the analytic B count."""
    from flwr.app import ArrayRecord
    from flwr.common.serde import array_record_to_proto
    from transformers import AutoModelForCausalLM

    from seedlora import inject, record_link, trainable_state
    from seedlora.serialize import links_to_bytes
    from tasks.models import target_modules_for

    config = load_config(SHIPPED)
    model = AutoModelForCausalLM.from_config(config)  # shapes are all that count
    targets = target_modules_for(config.model_type)
    inject(model, targets, kind="circulant", seed=0, rank=rank, alpha=16.0)
    record = ArrayRecord({k: v.float().contiguous() for k, v in trainable_state(model).items()})
    analytic = sum(x["n_out"] * rank for x in adapted_layers(config, rank)) * FLOAT32
    counted = record.count_bytes()
    row = dict(model=SHIPPED, rank=rank, arrays=len(record), analytic_bytes=analytic)
    row |= dict(arrayrecord_count_bytes=counted, overhead_bytes=counted - analytic)
    row["arrayrecord_proto_bytes"] = array_record_to_proto(record).ByteSize()
    row["overhead_fraction"] = (counted - analytic) / analytic
    return row | {"one_link_safetensors_bytes": len(links_to_bytes([record_link(model)]))}


def bytes_(args: Any) -> dict:
    """Upload and download bytes per client-round: seedlora, FFA-LoRA, FedIT, full FedAvg."""
    models, ranks = ([SHIPPED], [4]) if args.tiny else (args.models.split(","), h.ints(args.ranks))
    rows = [count_model(m, r) for m in models for r in ranks]
    reply = measured_reply(4 if args.tiny else args.reply_rank)
    for r in rows:
        print(r["model"], r["rank"], r["numbers"], r["ratio_up_ours_fedit"])
    notes = {"ratio_ours_fedit": "per layer n_out/(n_in+n_out): 0.5 iff n_in == n_out"}
    notes["seedlora_download"] = "the global B; a client joining at link k also k*|B| once"
    config = {"models": models, "ranks": ranks, "bytes_per_number": FLOAT32}
    payload = {"config": config, "notes": notes, "rows": rows, "measured_reply": reply}
    h.write_result(args.name, payload, args.out)
    labels, series = [f"{r['model']} r{r['rank']}" for r in rows], {}
    series = {m: [r["bytes"][m]["up"] for r in rows] for m in METHODS}
    h.plot(args.out / f"{args.name}.png", "upload B per client-round", series, labels, yscale="log")
    return payload


# --- A -------------------------------------------------------------------------------
def a_digests(device: str) -> dict[str, dict[str, str]]:
    """Per spec: sha256 of A drawn here (ASpec.digest) and of A moved to `device` and back."""
    found = {}
    for fields in DIGEST_SPECS:
        spec = ASpec(*fields)
        moved = hashlib.sha256(repr(spec).encode())
        moved.update(spec.dense().to(device).cpu().numpy().tobytes())
        found["/".join(map(str, fields))] = {"digest": spec.digest(), "moved": moved.hexdigest()}
    return found


def digest_section(device: str) -> dict[str, Any]:
    """This machine's digests against the committed CPU reference."""
    here = a_digests(device)
    section: dict[str, Any] = {"device": device, "specs": len(here), "digests": here}
    section["moved_equal"] = all(d["digest"] == d["moved"] for d in here.values())
    if DIGEST_REFERENCE.exists():
        ref = json.loads(DIGEST_REFERENCE.read_text())
        section["reference"] = str(DIGEST_REFERENCE.relative_to(h.REPO))
        section["reference_environment"] = ref["environment"]
        ref_digests = {k: v["digest"] for k, v in ref["digests"].items()}
        section["equal_to_reference"] = ref_digests == {k: v["digest"] for k, v in here.items()}
    return section


def a_draw(args: Any) -> dict:
    """A's draw time (exact rule vs legacy randn) and the golden digests on this machine."""
    from seedlora import derive_seed, draws

    if args.write_digest_reference:
        ref = {"environment": h.environment(), "device": "cpu", "digests": a_digests("cpu")}
        DIGEST_REFERENCE.write_text(json.dumps(ref, indent=1) + "\n")
        return ref

    def legacy(spec: ASpec) -> torch.Tensor:  # the old rule: float32 randn of a torch.Generator
        gen = torch.Generator().manual_seed(derive_seed("gaussian", spec.seed, 0, spec.layer))
        return torch.randn((spec.rank, spec.n_in), generator=gen) * spec.std

    rank = 4 if args.tiny else args.rank
    sets = {f"4096x{rank}": [ASpec("gaussian", 0, 0, rank, "layer", 4096, 4096)]}
    blocks = 1 if args.tiny else 32
    layers = [(f"model.layers.{i}.{n}", n_in) for i in range(blocks) for n, n_in in LLAMA_7B]
    sets["llama-7b"] = [ASpec("gaussian", 0, 0, rank, name, n_in, 4096) for name, n_in in layers]
    rows, repeats = [], 1 if args.tiny else args.repeats
    for label, specs in sets.items():
        row = {"set": label, "layers": len(specs), "entries": sum(s.rank * s.n_in for s in specs)}
        row["legacy_s"] = h.best_time(lambda s=specs: [legacy(x) for x in s], repeats)
        row["exact_s"] = h.best_time(lambda s=specs: [x.dense() for x in s], repeats)
        row["ratio"] = row["exact_s"] / row["legacy_s"]
        rows.append(row)
        print(row, flush=True)
    found = {k: ASpec(k, 1234, 2, 4, GOLDEN_LAYER, 64, 192).digest() for k in GOLDEN}
    stream = hashlib.sha256(draws.normals(99, 1_000_001).tobytes()).hexdigest()
    payload = dict(rank=rank, workers=draws.default_workers(), rows=rows)
    payload["golden_equal"] = found == GOLDEN
    payload |= dict(normals_99_1000001_sha256=stream, digests=digest_section("cpu"))
    payload["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    payload["npy_disable_cpu_features"] = os.environ.get("NPY_DISABLE_CPU_FEATURES", "")
    h.write_result(args.name, payload, args.out)
    return payload


ap, subs = h.cli(__doc__)
p = h.command(subs, "exactness", exactness, "exactness")
p.add_argument("--clients", default="2,8,32")
p.add_argument("--seeds", type=int, default=3, help="independent draws per setting")
p.add_argument("--rank", type=int, default=16)
p.add_argument("--alpha", type=float, default=32.0)
p.add_argument("--shapes", default="896x896,128x896", help="extra layers as n_out x n_in")
p = h.command(subs, "bytes", bytes_, "bytes")
p.add_argument("--models", default=",".join([SHIPPED, *CONFIGS]))
p.add_argument("--ranks", default="8,16")
p.add_argument("--reply-rank", type=int, default=8, help="rank of the measured reply")
p = h.command(subs, "a-draw", a_draw, "a_draw")
p.add_argument("--repeats", type=int, default=3)
p.add_argument("--rank", type=int, default=16)
p.add_argument("--write-digest-reference", action="store_true", help="write a_digests_cpu.json")
main = h.main_of(ap)

if __name__ == "__main__":
    main()
