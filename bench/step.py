"""One client's training step: time and memory against the frozen model, capture cost per
round, memory of a quantized base.

    python -m bench.step overhead --device cuda [--liger]   # step_time_<device>.json
    python -m bench.step graph-reuse --preset llama2-7b      # graph_reuse-<preset>.json (CUDA)
    python -m bench.step quant-memory                        # quant_memory.json (CUDA, bnb)

overhead: fwd + bwd + AdamW of each variant on a fresh model, one seed and batch, all seven
projections adapted: `floor` (frozen), PEFT LoRA (and with A frozen), seedlora fused,
`-reference`, `-grouped`, `-graphed` (one CUDA graph), `-liger`. Goals: <= PEFT in time and
memory; fused <= 1.25x floor, <= 0.6x PEFT; grouped/graphed <= 1.25x the floor's GPU-busy
time, <= 0.35x PEFT. graph-reuse: a graph captured every round against one kept for the link
(goal: kept setup after round 1 <= 0.05 s). quant-memory: bf16 / 8bit / 4bit bases.
"""

from __future__ import annotations

import gc
import json
import statistics
import tempfile
import time
from argparse import BooleanOptionalAction
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.harness import MIB, cli, command, main_of, pick, plot, ratio, write_result

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SEED_KINDS = ("gaussian", "circulant", "random-block")
FLOOR, PEFT, PEFT_FROZEN_A = "floor", "peft-lora", "peft-lora-frozen-a"
REFERENCE, GROUPED, GRAPHED, LIGER = "-reference", "-grouped", "-graphed", "-liger"
SEEDLORA = tuple(f"seedlora-{k}{m}" for m in (REFERENCE, "", GROUPED) for k in SEED_KINDS)
VARIANTS = (FLOOR, PEFT, PEFT_FROZEN_A, *SEEDLORA)
CUDA_VARIANTS = (f"{FLOOR}{GRAPHED}", *(f"seedlora-{k}{GRAPHED}" for k in SEED_KINDS))
LIGER_VARIANTS = tuple(f"{v}{LIGER}" for v in (FLOOR, *CUDA_VARIANTS[:1], *SEEDLORA[6:]))
LIGER_VARIANTS += tuple(f"{v}{LIGER}" for v in CUDA_VARIANTS[1:])
ALL_VARIANTS = (*VARIANTS, *CUDA_VARIANTS, *LIGER_VARIANTS)
FAST_FLOOR, FAST_PEFT, STEP_BUSY, STEP_PEFT = 1.25, 0.6, 1.25, 0.35  # the goals above
STEP_FLOOR_7B = 1.05  # and at the 7B shape: the step modes' wall over the eager floor's
CAPTURE_GOAL_S = 0.05


@dataclass(frozen=True)
class Shape:
    """The model and batch of one run."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    rank: int
    alpha: float
    dtype: str
    arch: str = "qwen2"  # qwen2 (tied embeddings) or llama


PRESETS = {"qwen2.5-0.5b": Shape(896, 4864, 24, 14, 2, 151936, 8, 512, 16, 32.0, "bfloat16")}
PRESETS["qwen2-0.36b"] = Shape(896, 4864, 24, 14, 2, 4096, 4, 512, 16, 32.0, "bfloat16")
PRESETS["llama2-7b"] = Shape(4096, 11008, 32, 32, 32, 32000, 4, 512, 16, 32.0, "bfloat16", "llama")
PRESETS["small"] = Shape(256, 1024, 4, 4, 2, 4096, 4, 128, 16, 32.0, "float32")
PRESETS["tiny"] = Shape(64, 128, 2, 4, 2, 256, 2, 32, 4, 8.0, "float32")


def base_variant(variant: str) -> str:
    """The variant without its step-mode and kernel suffixes."""
    return variant.removesuffix(LIGER).removesuffix(GROUPED).removesuffix(GRAPHED)


def build_model(shape: Shape, device: torch.device | str, seed: int) -> nn.Module:
    """A random-init Qwen2 or Llama causal LM of `shape`, built in its dtype on `device`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    kw = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers)
    kw["intermediate_size"] = shape.intermediate
    kw |= dict(num_attention_heads=shape.heads, use_cache=False)
    kw |= dict(num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.arch == "qwen2")
    kw |= dict(max_position_embeddings=max(shape.seq, 32768), attn_implementation="sdpa")
    config = (Qwen2Config if shape.arch == "qwen2" else LlamaConfig)(**kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, shape.dtype))
    return model.to(getattr(torch, shape.dtype)).train()


def prepare(variant: str, model: nn.Module, shape: Shape, seed: int) -> nn.Module:
    """Freeze `model` and attach the variant's adapter; returns the module to call."""
    if variant.endswith(LIGER):
        from runtime.kernels import use_liger

        return use_liger(prepare(variant.removesuffix(LIGER), model, shape, seed))
    if variant != base_variant(variant):
        model = prepare(base_variant(variant), model, shape, seed)
        if variant.startswith("seedlora-"):
            from seedlora.grouped import group_siblings

            group_siblings(model)
        return model
    if variant == FLOOR:
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())
        return model
    if variant in (PEFT, PEFT_FROZEN_A):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=shape.rank, lora_alpha=shape.alpha, target_modules=list(PROJECTIONS))
        config.lora_dropout, config.bias, config.task_type = 0.0, "none", "CAUSAL_LM"
        peft_model = get_peft_model(model, config)
        for name, param in peft_model.named_parameters():
            if variant == PEFT_FROZEN_A and "lora_A" in name:
                param.requires_grad_(False)
        return peft_model.train()
    kind = variant.removesuffix(REFERENCE).removeprefix("seedlora-")
    if kind not in SEED_KINDS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {ALL_VARIANTS}")
    from seedlora.injection import adapter_layers, inject

    inject(model, list(PROJECTIONS), kind=kind, seed=seed, rank=shape.rank, alpha=shape.alpha)
    for _, layer in adapter_layers(model):
        layer.fused = not variant.endswith(REFERENCE)
    return model.train()


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or viewed tensors count once)."""
    seen = {(str(t.device), t.untyped_storage().data_ptr()): t.untyped_storage() for t in tensors}
    return sum(s.nbytes() for s in seen.values())


def resident(model: nn.Module, opt: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """What stays allocated between steps: parameters, buffers, the optimizer's state."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b is not None)]
    for state in opt.state.values() if opt is not None else ():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def saved_for_backward_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of activation storages autograd keeps for backward in one forward (parameter
    and buffer storages left out: what a variant adds per step)."""
    static = {t.untyped_storage().data_ptr() for t in resident(model, None)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in static:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t.detach()  # not `t`: a node holding its own output is a cycle gc never frees

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(seen.values())


def profile_step(step: Callable[[], Any], cuda: bool) -> dict[str, Any]:
    """One `step()` under torch.profiler: aten self time (kernel time on CUDA: what the GPU
    does, whatever the host), aten op calls and (CPU) the allocator's peak above
    the start (its "[memory]" events carry the running total)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=acts, profile_memory=not cuda) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    ops = [a for a in prof.key_averages() if a.key.startswith("aten::")]
    busy = sum(a.self_device_time_total if cuda else a.self_cpu_time_total for a in ops) / 1e3
    out = {"busy_ms": busy, "aten_op_calls": sum(a.count for a in ops), "cpu_peak": 0}
    if not cuda:
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/t.json")
            events = json.loads(Path(f"{tmp}/t.json").read_text())["traceEvents"]
        mem = [e["args"] for e in events if e.get("name") == "[memory]"]
        mem = sorted((m for m in mem if m.get("Device Type") == 0), key=lambda m: m["Ev Idx"])
        if mem:
            start = mem[0]["Total Allocated"] - mem[0]["Bytes"]
            out["cpu_peak"] = max(0, max(m["Total Allocated"] for m in mem) - start)
    return out


def measure(variant: str, shape: Shape, ids: torch.Tensor, args: Any) -> dict[str, Any]:
    """Build, adapt and time one variant on a fresh model: its row of the result."""
    cuda = ids.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    model = prepare(variant, build_model(shape, ids.device, args.seed), shape, args.seed)
    graphed = variant.removesuffix(LIGER).endswith(GRAPHED)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = cuda and variant != base_variant(variant)  # the step modes: a fused AdamW on CUDA
    opt_kw = {"fused": True, "capturable": graphed} if fused else {}
    opt = torch.optim.AdamW(params, lr=args.lr, **opt_kw) if params else None

    def forward(batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        x = ids if batch is None else batch["x"]
        return model(input_ids=x, labels=x, use_cache=False).loss

    def step() -> torch.Tensor:
        loss = forward()
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    capture_ms = None
    if graphed:
        from seedlora.capture import CapturedStep

        start = time.perf_counter()
        captured = CapturedStep(forward, params, opt, {"x": ids})
        sync()
        capture_ms = (time.perf_counter() - start) * 1e3
        step = lambda: captured({"x": ids}).clone()  # noqa: E731
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for _ in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        losses.append(step())
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    times, kept = times[args.warmup :], unique_bytes(resident(model, opt))
    prof = profile_step(lambda: losses.append(step()), cuda) if not cuda or args.profile else {}
    peak = torch.cuda.max_memory_allocated() if cuda else kept + prof["cpu_peak"]
    row = {"variant": variant, "trainable_params": sum(p.numel() for p in params)}
    row |= {"times_ms": times, "median_ms": statistics.median(times), "capture_ms": capture_ms}
    row |= {"peak_bytes": peak, "resident_bytes": kept}
    row["saved_for_backward_bytes"] = saved_for_backward_bytes(model, forward)
    row |= {"loss_first": float(losses[0]), "loss_last": float(losses[-1])}
    row["busy_ms"] = None if graphed else prof.get("busy_ms")  # replays go unattributed
    return row | {"aten_op_calls": prof.get("aten_op_calls")}


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios to the floor and PEFT into each row; each seedlora row's goals (docstring)."""
    by = {r["variant"]: r for r in rows}
    floor, peft, graphed = by.get(FLOOR, {}), by.get(PEFT, {}), by.get(FLOOR + GRAPHED, {})
    for r in rows:
        t, m = r["median_ms"], r["peak_bytes"]
        r["time_x_floor"] = ratio(t, floor.get("median_ms"))
        r["time_x_peft"] = ratio(t, peft.get("median_ms"))
        r["time_x_floor_busy"] = ratio(t, floor.get("busy_ms"))
        r["time_x_floor_graphed"] = ratio(t, graphed.get("median_ms"))
        r["memory_x_floor"] = ratio(m, floor.get("peak_bytes"))
        r["memory_x_peft"] = ratio(m, peft.get("peak_bytes"))
    out: dict[str, Any] = {}
    for r in rows:
        v = r["variant"]
        if not v.startswith("seedlora-") or not peft:
            continue
        g = out[v] = {"time_le_peft": r["time_x_peft"] <= 1}
        g["memory_le_peft"] = r["memory_x_peft"] <= 1
        if not v.endswith(REFERENCE):
            g["time_le_0.6_peft"] = r["time_x_peft"] <= FAST_PEFT
            if r["time_x_floor"] is not None:
                g["time_le_1.25_floor"] = r["time_x_floor"] <= FAST_FLOOR
        if v != base_variant(v):
            g["time_le_0.35_peft"] = r["time_x_peft"] <= STEP_PEFT
            if r["time_x_floor_busy"] is not None:
                g["time_le_1.25_floor_busy"] = r["time_x_floor_busy"] <= STEP_BUSY
            if r["time_x_floor"] is not None:
                g["time_le_1.05_floor"] = r["time_x_floor"] <= STEP_FLOOR_7B
        kind = next(k for k in SEED_KINDS if v.startswith(f"seedlora-{k}"))
        gaussian = by.get(v.replace(f"seedlora-{kind}", "seedlora-gaussian"))
        if kind != "gaussian" and gaussian is not None:
            g["faster_than_gaussian"] = r["median_ms"] < gaussian["median_ms"]
    return out


def overhead(args: Any) -> dict[str, Any]:
    """Step time and peak memory of every variant against the frozen model and PEFT."""
    if args.tiny:
        args.device, args.preset, args.warmup, args.steps, args.threads = "cpu", "tiny", 1, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    preset = args.preset or ("qwen2.5-0.5b" if cuda else "small")
    shape, extra = PRESETS[preset], (*(CUDA_VARIANTS * cuda), *(LIGER_VARIANTS * args.liger))
    variants = args.variants or [*VARIANTS, *extra]
    if not cuda and any(v.endswith(LIGER) or v.endswith(GRAPHED) for v in variants):
        raise SystemExit("--variants: the -liger and -graphed variants are CUDA only")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)
    passes: dict[str, list[dict]] = {v: [] for v in variants}
    failed: dict[str, str] = {}
    for rnd in range(args.rounds):
        for v in variants if rnd % 2 == 0 else variants[::-1]:
            try:
                passes[v].append(row := measure(v, shape, ids, args))
                print(f"pass {rnd} {v:<36} {row['median_ms']:9.2f} ms", flush=True)
            except RuntimeError as err:  # a failed capture must not lose the other rows
                if v in VARIANTS:
                    raise
                failed[v] = f"{type(err).__name__}: {err}"[:2000]
            gc.collect()
            torch.cuda.empty_cache() if cuda else None
    rows = []
    for v in (v for v in variants if passes[v] and v not in failed):  # passes pooled
        times = [t for p in passes[v] for t in p["times_ms"]]
        row = {**passes[v][-1], "times_ms": times, "median_ms": statistics.median(times)}
        row["peak_bytes"] = max(p["peak_bytes"] for p in passes[v])
        rows.append(row | {"loss_first": passes[v][0]["loss_first"]})
    config = {"preset": preset, "device": str(device), **asdict(shape), "targets": PROJECTIONS}
    config |= pick(args, "warmup", "steps", "rounds", "lr")
    payload = {"benchmark": "step_time", "config": config, "variants": rows, "failed": failed}
    name = args.name or f"step_time_{device.type}"
    write_result(name, payload | {"goals": goals(rows)}, args.out)
    series = {"median step (ms)": [r["median_ms"] for r in rows]}
    series["peak memory (MiB)"] = [r["peak_bytes"] / MIB for r in rows]
    title = f"fwd+bwd+AdamW, {preset}, batch {shape.batch} x {shape.seq}, rank {shape.rank}"
    plot(args.out / f"{name}.png", title, series, [r["variant"] for r in rows], yscale="log")
    return payload


def graph_reuse(args: Any) -> dict[str, Any]:
    """Capture cost per round: one graph kept for a link's rounds vs one captured per round."""
    from seedlora.capture import CapturedStep, kept_step

    if not torch.cuda.is_available():
        raise SystemExit("bench.step graph-reuse captures CUDA graphs: no CUDA device is visible")
    preset, variant = "tiny" if args.tiny else args.preset, f"seedlora-circulant{GRAPHED}"
    shape, dev = PRESETS[preset], "cuda"
    model = prepare(variant, build_model(shape, dev, args.seed), shape, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    on = {"device": dev, "generator": torch.Generator(dev).manual_seed(args.seed)}
    size = (shape.batch, shape.seq)
    batches = [{"x": torch.randint(shape.vocab, size, **on)} for _ in range(args.steps)]
    received = [[0.01 * torch.randn(p.shape, **on) for p in params] for _ in range(args.rounds)]
    lrs = [args.lr * 0.7**r for r in range(args.rounds)]
    loss_of = lambda b: model(input_ids=b["x"], labels=b["x"], use_cache=False).loss  # noqa: E731
    clip = lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)  # noqa: E731
    adamw = lambda lr: torch.optim.AdamW(params, lr=lr, fused=True, capturable=True)  # noqa: E731
    rows: dict[str, list[dict]] = {"fresh": [], "kept": []}
    trained: dict[str, list[list[torch.Tensor]]] = {"fresh": [], "kept": []}
    for mode, r in ((m, r) for m in rows for r in range(args.rounds)):
        with torch.no_grad():
            for p, b in zip(params, received[r], strict=True):
                p.copy_(b)  # the round's received B
        torch.cuda.synchronize()
        start = time.perf_counter()
        if mode == "kept":
            kept = kept_step(model, "bench", params, lambda: adamw(torch.ones((), device=dev)))
            kept.begin(lrs[r])
            step, captures = kept.ready(loss_of, batches[0], clip), kept.captures
        else:
            step = CapturedStep(loss_of, params, adamw(lrs[r]), batches[0], before_step=clip)
            captures = r + 1
        torch.cuda.synchronize()
        setup = time.perf_counter() - start
        loss = sum(float(step(b)) for b in batches) / args.steps
        torch.cuda.synchronize()
        steps_s = time.perf_counter() - start - setup
        trained[mode].append([p.detach().clone() for p in params])
        del step
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        row = dict(round=r, lr=lrs[r], setup_s=setup, steps_s=steps_s, round_s=setup + steps_s)
        row |= dict(loss=loss, captures=captures)
        row["allocated_after_bytes"] = torch.cuda.memory_allocated()
        rows[mode].append(row)
    for r, row in enumerate(rows["kept"]):
        pairs = list(zip(trained["kept"][r], trained["fresh"][r], strict=True))
        row["max_abs_b_diff"] = max(float((a - b).abs().max()) for a, b in pairs)
        row["bitwise"] = all(torch.equal(a, b) for a, b in pairs)
        row["loss_diff"] = row["loss"] - rows["fresh"][r]["loss"]
    later = {m: [x["setup_s"] for x in rows[m][1:]] or [float("nan")] for m in rows}
    summary = {"kept_setup_after_first_round_max_s": max(later["kept"]), "kept_captures": captures}
    summary["fresh_setup_after_first_round_median_s"] = statistics.median(later["fresh"])
    summary |= {"goal_s": CAPTURE_GOAL_S, "goal_met": max(later["kept"]) <= CAPTURE_GOAL_S}
    config = {"preset": preset, **asdict(shape), "variant": variant, "lrs": lrs, "max_grad_norm": 1}
    config |= pick(args, "rounds", "steps", "seed")
    payload = {"benchmark": "graph_reuse", "config": config, "rounds": rows, "summary": summary}
    write_result(args.name or f"graph_reuse-{preset}", payload, args.out)
    return payload


def quant_row(preset: str, base: str, args: Any) -> dict[str, Any]:
    """One client's GPU memory on a `base` base: weights (the target layers made bitsandbytes
    nf4 + double quantization or LLM.int8() from bf16 weights, as transformers' loader makes
    them), adapted with `--links` merged links of random B, and one B-only step's peak."""
    import bitsandbytes as bnb

    from seedlora import adapter_layers, inject, trainable_state
    from seedlora.chain import Link, apply_link

    shape, gib = PRESETS[preset], 2**30
    gc.collect()
    torch.cuda.empty_cache()
    start, t0 = torch.cuda.memory_allocated(), time.perf_counter()
    model = build_model(shape, "cuda", 0).eval()
    params = sum(p.numel() for p in model.parameters())
    for name in (
        [n for n, _ in model.named_modules() if n.split(".")[-1] in PROJECTIONS]
        if base != "bf16"
        else []
    ):
        lin = model.get_submodule(name)
        dims, w, bias = (lin.in_features, lin.out_features), lin.weight.data, lin.bias is not None
        nf4 = {"compress_statistics": True, "quant_type": "nf4"}
        if base == "4bit":
            q = bnb.nn.Linear4bit(
                *dims, bias=bias, compute_dtype=torch.bfloat16, device="meta", **nf4
            )
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, module=q, **nf4)
        else:  # int8 weights, outliers above 6 in 16 bits (LLM.int8's threshold)
            q = bnb.nn.Linear8bitLt(
                *dims, bias=bias, has_fp16_weights=False, threshold=6.0, device="meta"
            )
            q.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
        if bias:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q.to("cuda"))
    gc.collect()
    torch.cuda.empty_cache()
    weights, build_s = torch.cuda.memory_allocated() - start, time.perf_counter() - t0
    alpha, kw = 2.0 * args.rank, {"kind": "circulant", "seed": 0, "chain_index": args.links}
    inject(model, list(PROJECTIONS), rank=args.rank, alpha=alpha, **kw)
    layers, gen = [m for _, m in adapter_layers(model)], torch.Generator().manual_seed(1)
    for c in range(args.links):  # side paths on a quantized base, merged into a bf16 one
        specs = tuple(replace(m.spec, chain_index=c) for m in layers)
        factors = {m.spec.layer: 0.01 * torch.randn(m.lora_B.shape, generator=gen) for m in layers}
        apply_link(model, Link(alpha, specs, factors))
    side = sum(unique_bytes(m.aside.buffers()) for m in layers if m.aside is not None)
    adapted = torch.cuda.memory_allocated() - start
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device="cuda")
    model.train()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    row = {"shape": preset, "base": base, "params": params, "build_s": round(build_s, 2)}
    row["trainable"] = sum(t.numel() for t in trainable_state(model).values())
    row |= {"weights_gib": round(weights / gib, 3), "adapted_gib": round(adapted / gib, 3)}
    row |= {"side_path_mib": round(side / MIB, 2), "step_s": round(min(times[1:] or times), 4)}
    row["step_peak_gib"] = round((torch.cuda.max_memory_allocated() - start) / gib, 3)
    row["losses"] = losses
    others = [p for n, p in model.named_parameters() if "lora_B" not in n]
    row["only_b_has_gradients"] = all(p.grad is None for p in others)
    print(row, flush=True)
    del model, opt
    return row


def quant_memory(args: Any) -> dict[str, Any]:
    """GPU memory of one client on a bf16, 8bit and 4bit base (CUDA and bitsandbytes)."""
    if not torch.cuda.is_available():
        raise SystemExit("bench.step quant-memory measures GPU memory: no CUDA device is visible")
    import bitsandbytes

    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    rows = [quant_row(s, b, args) for s in shapes for b in args.bases.split(",")]
    setup = pick(args, "rank", "links", "steps")
    payload = {"setup": setup, "bitsandbytes": bitsandbytes.__version__}
    write_result(args.name, payload | {"rows": rows}, args.out)
    return payload


ap, subs = cli(__doc__)
p = command(subs, "overhead", overhead, "", "step time and memory vs the frozen model and PEFT")
p.add_argument("--device", default="cpu", help="cpu or cuda")
p.add_argument("--preset", choices=sorted(PRESETS), help="default: qwen2.5-0.5b (cuda), small")
p.add_argument("--variants", nargs="+", choices=ALL_VARIANTS, help="default: all the device runs")
p.add_argument("--liger", action="store_true", help="add the -liger variants (CUDA)")
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
p.add_argument("--rounds", type=int, default=1, help="passes over the variants, odd ones reversed")
p.add_argument("--profile", action=BooleanOptionalAction, default=True, help="GPU-busy time (CUDA)")
p.add_argument("--threads", type=int, help="torch CPU threads")
g = command(subs, "graph-reuse", graph_reuse, "", "capture cost per round (CUDA)")
for q in (p, g):
    q.add_argument("--lr", type=float, default=1e-3)
    q.add_argument("--seed", type=int, default=0)
p = g
p.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
p.add_argument("--rounds", type=int, default=4, help="rounds of one link, per mode")
p.add_argument("--steps", type=int, default=10, help="optimizer steps per round")
p = command(subs, "quant-memory", quant_memory, "quant_memory", "GPU memory of quantized bases")
p.add_argument("--shapes", default="qwen2-0.36b,llama2-7b")
p.add_argument("--bases", default="bf16,8bit,4bit")
p.add_argument("--rank", type=int, default=16)
p.add_argument("--links", type=int, default=3, help="merged links (side paths if quantized)")
p.add_argument("--steps", type=int, default=3)
main = main_of(ap)

if __name__ == "__main__":
    main()
