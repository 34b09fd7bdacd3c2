"""Client step time and peak memory: seedlora's B-only layer against PEFT LoRA, at equal rank.

Why: a client of this project trains only B (n_out x r) on a frozen, seed-defined A. That
should cost no more than PEFT LoRA per local step (it trains fewer parameters and, for the
block kinds, replaces the A matmul by a slice), and this script checks that claim with one
forward + backward + AdamW step per iteration, for these variants side by side in one process:

  floor                  the frozen model, no adapter, backward to the input embeddings (the
                         least a step that trains anything inside the model can cost)
  peft-lora              peft.get_peft_model, LoraConfig(r, alpha, same targets, dropout 0)
  peft-lora-frozen-a     the same with every lora_A frozen (B-only, PEFT's code path)
  seedlora-<kind>        this project's `inject(...)` for gaussian / circulant / random-block,
                         on its fused fast path (seedlora.fused)
  seedlora-<kind>-reference  the same layers on the straightforward path (fused = False)
  seedlora-<kind>-grouped    q/k/v and gate/up as one node each, sharing one `A x`
                         (seedlora.grouped), and a fused AdamW on CUDA
  seedlora-<kind>-graphed    the grouped layers with the whole step (forward, backward,
                         fused capturable AdamW) captured once as a CUDA graph and replayed
                         (seedlora.capture); CUDA only
  floor-graphed          the floor under the same capture, so the comparison stays fair
  <variant>-liger        the same with Liger's RMSNorm and SwiGLU kernels in the frozen
                         base, as a client with `base-kernels = "liger"` has them
                         (runtime.kernels); CUDA only

Every variant gets a fresh model from the same seed (so all start from the same loss), the
same token batch and all seven projection types of a Qwen2 block as targets. Times are the
median over timed steps after warm-up steps, with the device synchronized around each step.

Memory. On CUDA: `torch.cuda.max_memory_allocated`, reset after the model is built and
adapted, so the peak is weights + optimizer state + the step's activations and temporaries.
On the CPU there is no allocator high-water mark and `ru_maxrss` never goes down, so one
extra (untimed) step runs under `torch.profiler` with `profile_memory=True`: the CPU
allocator reports every allocation and free with a running total, whose maximum above the
start is the step's peak; the bytes already resident (parameters, buffers, optimizer
state) are added by walking those tensors. Both devices also report the bytes autograd
saves for backward in one forward (via `saved_tensors_hooks`, parameters excluded), which
says directly whether a layer keeps an extra copy of its input alive.

Only torch, transformers, peft and seedlora's core are imported (no Flower), so the script
also runs on a GPU box that lacks Flower, Ray and datasets.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.common import RESULTS, figure, write_result

PROJECTIONS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
SEED_KINDS: tuple[str, ...] = ("gaussian", "circulant", "random-block")
FLOOR = "floor"
PEFT = "peft-lora"
PEFT_FROZEN_A = "peft-lora-frozen-a"
REFERENCE = "-reference"  # the straightforward layer (autograd over plain torch ops)
GROUPED = "-grouped"  # sibling layers as one node (seedlora.grouped)
GRAPHED = "-graphed"  # grouped, and the whole step one CUDA graph (seedlora.capture)
LIGER = "-liger"  # Liger's Triton kernels in the frozen base (last suffix)
VARIANTS: tuple[str, ...] = (
    FLOOR,
    PEFT,
    PEFT_FROZEN_A,
    *(f"seedlora-{k}{REFERENCE}" for k in SEED_KINDS),
    *(f"seedlora-{k}" for k in SEED_KINDS),
    *(f"seedlora-{k}{GROUPED}" for k in SEED_KINDS),
)
# Only on CUDA (the default set there adds them).
CUDA_VARIANTS: tuple[str, ...] = (
    f"{FLOOR}{GRAPHED}",
    *(f"seedlora-{k}{GRAPHED}" for k in SEED_KINDS),
)
# Liger kernels: CUDA only and not in the default set (`--variants`, or `--liger`).
LIGER_VARIANTS: tuple[str, ...] = (
    f"{FLOOR}{LIGER}",
    f"{FLOOR}{GRAPHED}{LIGER}",
    *(f"seedlora-{k}{GROUPED}{LIGER}" for k in SEED_KINDS),
    *(f"seedlora-{k}{GRAPHED}{LIGER}" for k in SEED_KINDS),
)
# Diagnostic, not in the default set: circulant with B cast to the model's dtype (bf16 on the
# GPU) instead of a float32 master copy, to price the casts that the float32 B costs.
B_MODEL_DTYPE = "seedlora-circulant-b16"
ALL_VARIANTS: tuple[str, ...] = (*VARIANTS, *CUDA_VARIANTS, *LIGER_VARIANTS, B_MODEL_DTYPE)


def base_variant(variant: str) -> str:
    """The variant without its step-mode and kernel suffixes (`-grouped`, `-graphed`,
    `-liger`)."""
    return variant.removesuffix(LIGER).removesuffix(GROUPED).removesuffix(GRAPHED)


def is_graphed(variant: str) -> bool:
    return variant.removesuffix(LIGER).endswith(GRAPHED)


MIB = 1024.0 * 1024.0
PHASES = ("forward", "backward", "optimizer")


@dataclass(frozen=True)
class Shape:
    """The model and batch of one run; presets below, every field overridable on the CLI."""

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
    arch: str = "qwen2"  # the transformers model class: qwen2 (tied embeddings) or llama


PRESETS: dict[str, Shape] = {
    # Qwen2.5-0.5B's shape (random init, never downloaded) at a client's batch.
    "qwen2.5-0.5b": Shape(896, 4864, 24, 14, 2, 151936, 8, 512, 16, 32.0, "bfloat16"),
    # Llama-2-7B's config.json (no GQA, untied embeddings) at a 7B client's batch.
    "llama2-7b": Shape(4096, 11008, 32, 32, 32, 32000, 4, 512, 16, 32.0, "bfloat16", "llama"),
    # Small enough for a 2-core CPU to time all variants in well under a minute.
    "small": Shape(256, 1024, 4, 4, 2, 4096, 4, 128, 16, 32.0, "float32"),
    # For the test: seconds, but every code path of the full run.
    "tiny": Shape(64, 128, 2, 4, 2, 256, 2, 32, 4, 8.0, "float32"),
}


def layer_dims(shape: Shape) -> list[tuple[str, int, int]]:
    """(projection, n_in, n_out) of one decoder block, the shapes every adapter sees."""
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    h, i = shape.hidden, shape.intermediate
    return [
        ("q_proj", h, h),
        ("k_proj", h, kv),
        ("v_proj", h, kv),
        ("o_proj", h, h),
        ("gate_proj", h, i),
        ("up_proj", h, i),
        ("down_proj", i, h),
    ]


def expected_trainable(shape: Shape, variant: str) -> int:
    """Trainable parameters each variant should have: B is n_out*r, A is r*n_in per layer."""
    r = shape.rank
    variant = base_variant(variant)
    if variant == FLOOR:
        return 0
    per_block = sum(n_out * r for _, _, n_out in layer_dims(shape))
    if variant == PEFT:
        per_block += sum(n_in * r for _, n_in, _ in layer_dims(shape))
    return per_block * shape.layers


def build_model(shape: Shape, device: torch.device, seed: int) -> nn.Module:
    """A Qwen2 or Llama causal LM from a config written here, random init on `device` in the
    preset's dtype (a 7B model initialised in float32 would need 27 GB more)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config = (Qwen2Config if shape.arch == "qwen2" else LlamaConfig)(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=max(shape.seq, 32768),
        tie_word_embeddings=shape.arch == "qwen2",
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(dtype).train()


def _grad_to_embeddings(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: make the embedding output require grad, so backward visits every layer."""
    return output.requires_grad_(True)


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
        model.get_input_embeddings().register_forward_hook(_grad_to_embeddings)
        return model
    if variant in (PEFT, PEFT_FROZEN_A):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=shape.rank,
            lora_alpha=shape.alpha,
            target_modules=list(PROJECTIONS),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, config)
        if variant == PEFT_FROZEN_A:
            for name, param in peft_model.named_parameters():
                if "lora_A" in name:
                    param.requires_grad_(False)
        return peft_model.train()
    if variant.startswith("seedlora-"):
        from seedlora.injection import adapter_layers, inject

        name = variant.removesuffix(REFERENCE)
        kind = "circulant" if variant == B_MODEL_DTYPE else name.removeprefix("seedlora-")
        if kind not in SEED_KINDS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {ALL_VARIANTS}")
        inject(model, list(PROJECTIONS), kind=kind, seed=seed, rank=shape.rank, alpha=shape.alpha)
        for _, layer in adapter_layers(model):
            layer.fused = not variant.endswith(REFERENCE)
            if variant == B_MODEL_DTYPE:
                layer.lora_B.data = layer.lora_B.data.to(layer.base.weight.dtype)
        return model.train()
    raise ValueError(f"unknown variant {variant!r}; expected one of {ALL_VARIANTS}")


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or viewed tensors count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def resident_tensors(model: nn.Module, opt: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """What stays allocated between steps: parameters, buffers and the optimizer's state."""
    tensors = [*model.parameters(), *(b for b in model.buffers() if b is not None)]
    if opt is not None:
        for state in opt.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


def saved_for_backward_bytes(model: nn.Module, forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of activation storages autograd keeps for backward in one forward.

    Parameter and buffer storages are left out (they are resident anyway), so the number is
    what a variant adds per step: a layer that saves a full copy of x shows up here.
    """
    static = {t.untyped_storage().data_ptr() for t in resident_tensors(model, None)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in static:
            seen[storage.data_ptr()] = storage.nbytes()
        # Not `t` itself: a graph node holding its own output is a cycle that no gc frees
        # (it leaked a whole model per variant); a detached alias holds no graph.
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    del loss
    return sum(seen.values())


def profiled_step(step: Callable[[], None], device: torch.device) -> Any:
    """Run one `step()` under `torch.profiler`, CPU allocator memory events included."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=device.type == "cpu") as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return prof


def cpu_peak_bytes(prof: Any) -> int:
    """Peak CPU-allocator bytes above the start of a profiled step.

    With `profile_memory=True` every CPU allocation and free is an instant "[memory]" event
    carrying the allocator's running "Total Allocated"; its maximum minus the total before the
    first event is the step's high-water mark. Frees of older blocks are not reported, so
    the number can only err high, by what a step frees of memory made before it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = [
        e["args"]
        for e in sorted(
            (e for e in events if e.get("name") == "[memory]"),
            key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)),
        )
        if e["args"].get("Device Type") == 0
    ]
    if not memory:
        raise RuntimeError("the profiler reported no CPU memory events")
    start = memory[0]["Total Allocated"] - memory[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in memory) - start)


def busy_ms(prof: Any, device: torch.device) -> tuple[float, int]:
    """(Self time summed over the aten ops of the profiled step, number of aten op calls).

    On CUDA the time is kernel time (each kernel counts once, under the op that launched it;
    the profiler's own per-kernel rows are left out, or every kernel would count twice), so
    a step's wall time minus it is the time the GPU waited on the host (Python, dispatch,
    launches); the call count is what that host work scales with. On the CPU it is the ops'
    own CPU time.
    """
    cuda = device.type == "cuda"
    total, calls = 0.0, 0
    for avg in prof.key_averages():
        if avg.key.startswith("aten::"):
            total += avg.self_device_time_total if cuda else avg.self_cpu_time_total
            calls += avg.count
    return total / 1e3, calls


def top_ops(prof: Any, device: torch.device, n: int) -> list[dict[str, Any]]:
    """The `n` aten ops with the most self time (device time on CUDA): where a step goes.

    Casts show up as aten::copy_ / aten::_to_copy, the block slice's backward as
    aten::slice_backward / aten::zeros, the A matmul as aten::mm / aten::addmm.
    """
    cuda = device.type == "cuda"
    rows = []
    for avg in prof.key_averages():
        self_us = avg.self_device_time_total if cuda else avg.self_cpu_time_total
        if self_us > 0 and avg.key.startswith("aten::"):
            rows.append({"op": avg.key, "calls": avg.count, "self_ms": self_us / 1e3})
    return sorted(rows, key=lambda r: -r["self_ms"])[:n]


def sync_warnings(step: Callable[[], Any], timer: Any) -> list[str]:
    """The host-device synchronisations one step makes (`torch.cuda.set_sync_debug_mode`
    warns at each): a step that waits on the GPU mid-way cannot run ahead of it."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    timer.marks.clear()
    return sorted({str(w.message)[:160] for w in caught if "synchroniz" in str(w.message)})


class Timer:
    """Step and phase times: CUDA events on the GPU (no extra syncs), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def phases_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (call after `sync`); clears the marks."""
        m, self.marks = self.marks, []
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(m, m[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(m, m[1:], strict=False)]


def measure(
    variant: str, shape: Shape, ids: torch.Tensor, args: argparse.Namespace
) -> dict[str, Any]:
    """Build, adapt and time one variant on a fresh model; returns its row of the result."""
    device = ids.device
    cuda = device.type == "cuda"
    # What an earlier variant left behind would inflate this one's peak: record it.
    leftover = torch.cuda.memory_allocated() - unique_bytes([ids]) if cuda else 0
    model = prepare(variant, build_model(shape, device, args.seed), shape, args.seed)
    graphed = is_graphed(variant)
    params = [p for p in model.parameters() if p.requires_grad]
    # The new step modes take a fused AdamW on CUDA (one kernel for every B); a captured
    # step needs it capturable. The earlier rows keep torch's default (foreach).
    fused_opt = cuda and variant != base_variant(variant)
    opt_kwargs = {"fused": True, "capturable": graphed} if fused_opt else {}
    opt = torch.optim.AdamW(params, lr=args.lr, **opt_kwargs) if params else None
    adapter_dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})

    def forward() -> torch.Tensor:
        return model(input_ids=ids, labels=ids, use_cache=False).loss

    timer = Timer(device)

    def eager_step() -> torch.Tensor:
        timer.mark()
        loss = forward()
        timer.mark()
        loss.backward()
        timer.mark()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        timer.mark()
        return loss.detach()

    step = eager_step
    capture_ms: list[float] = []  # warm-up steps + capture, once per graphed variant
    if graphed:
        from seedlora.capture import CapturedStep

        def batch_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            x = batch["input_ids"]
            return model(input_ids=x, labels=x, use_cache=False).loss

        captured: list[CapturedStep] = []  # made after the peak reset below: its pool counts

        def step() -> torch.Tensor:
            if not captured:
                start = time.perf_counter()
                captured.append(CapturedStep(batch_loss, params, opt, {"input_ids": ids}))
                torch.cuda.synchronize()
                capture_ms.append((time.perf_counter() - start) * 1e3)
            timer.mark()
            loss = captured[0]({"input_ids": ids}).clone()
            timer.mark()
            return loss

    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model_bytes = unique_bytes(resident_tensors(model, None))
    losses: list[torch.Tensor] = []
    times: list[float] = []
    phases: list[list[float]] = []
    for i in range(args.warmup + args.steps):
        timer.sync()
        start = time.perf_counter()
        losses.append(step())
        timer.sync()
        elapsed = (time.perf_counter() - start) * 1e3
        split = timer.phases_ms()
        if i >= args.warmup:
            times.append(elapsed)
            phases.append(split)
    resident = unique_bytes(resident_tensors(model, opt))
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        memory_method = "torch.cuda.max_memory_allocated"
    ops: list[dict[str, Any]] = []
    busy, op_calls = None, None
    if not cuda or args.top_ops:
        prof = profiled_step(lambda: losses.append(step()), device)
        timer.marks.clear()
        ops = top_ops(prof, device, args.top_ops)
        busy, op_calls = busy_ms(prof, device)
        if graphed:  # the profiler did not attribute a replay's kernels (0.002 ms on an H200)
            busy = None
        if not cuda:
            peak = resident + cpu_peak_bytes(prof)
            memory_method = "resident tensors + torch.profiler CPU allocator high-water mark"
        del prof
    syncs = sync_warnings(step, timer) if cuda else None
    saved = saved_for_backward_bytes(model, forward)
    loss_values = [float(v) for v in losses]
    row = {
        "variant": variant,
        "trainable_params": sum(p.numel() for p in params),
        "expected_trainable_params": expected_trainable(shape, variant),
        "trainable_dtypes": adapter_dtypes,
        "times_ms": times,
        "median_ms": statistics.median(times),
        "optimizer": f"AdamW({', '.join(f'{k}={v}' for k, v in opt_kwargs.items())})",
        "phase_median_ms": {
            name: statistics.median(p[i] for p in phases)
            for i, name in enumerate(("replay",) if graphed else PHASES)
        },
        "capture_ms": capture_ms[0] if capture_ms else None,
        "peak_bytes": peak,
        "resident_bytes": resident,
        "peak_above_resident_bytes": peak - resident,
        "saved_for_backward_bytes": saved,
        "model_bytes": model_bytes,
        "leftover_bytes_at_start": leftover,
        "memory_method": memory_method,
        "loss_first": loss_values[0],
        "loss_last": loss_values[-1],
        "busy_ms": busy,
        "host_syncs": syncs,
        "aten_op_calls": op_calls,
        "top_ops": ops,
    }
    return row


def release(device: torch.device) -> None:
    """Free the last variant's model (PEFT wrappers hold reference cycles) before the next."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def merge_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's rows from several rounds: all timed steps pooled, peaks maxed."""
    merged = dict(rows[-1])
    merged["times_ms"] = [t for r in rows for t in r["times_ms"]]
    merged["median_ms"] = statistics.median(merged["times_ms"])
    merged["round_median_ms"] = [r["median_ms"] for r in rows]
    merged["peak_bytes"] = max(r["peak_bytes"] for r in rows)
    merged["peak_above_resident_bytes"] = merged["peak_bytes"] - merged["resident_bytes"]
    merged["loss_first"] = rows[0]["loss_first"]
    return merged


def _ratio(a: float, b: float | None) -> float | None:
    return None if not b else a / b


FAST_FLOOR, FAST_PEFT = 1.25, 0.6  # the fast path's goals (issue: fast path)
STEP_BUSY, STEP_PEFT = 1.25, 0.35  # the step modes' goals (issue 16: x floor busy, x PEFT)
STEP_FLOOR_7B = 1.05  # and at the 7B shape: wall x the (eager) floor's wall


def add_ratios(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios to the floor and to PEFT LoRA, and the goals beside each seedlora row.

    Every seedlora variant: time and memory <= PEFT's. The fused variants also: time <=
    1.25x the floor and <= 0.6x PEFT, and the block kinds faster than gaussian. The
    grouped and graphed ones (issue 16): wall <= 1.25x the floor's GPU-busy time and
    <= 0.35x PEFT's wall; block kinds no slower than gaussian in the same mode.
    """
    by = {r["variant"]: r for r in rows}
    floor, peft = by.get(FLOOR), by.get(PEFT)
    floor_busy = floor and floor["busy_ms"]
    floor_graphed = by.get(f"{FLOOR}{GRAPHED}")
    for r in rows:
        r["time_x_floor_busy"] = _ratio(r["median_ms"], floor_busy)
        r["time_x_floor_graphed"] = _ratio(
            r["median_ms"], floor_graphed and floor_graphed["median_ms"]
        )
        r["time_x_floor"] = _ratio(r["median_ms"], floor and floor["median_ms"])
        r["time_x_peft"] = _ratio(r["median_ms"], peft and peft["median_ms"])
        r["memory_x_floor"] = _ratio(r["peak_bytes"], floor and floor["peak_bytes"])
        r["memory_x_peft"] = _ratio(r["peak_bytes"], peft and peft["peak_bytes"])
    goals: dict[str, Any] = {}
    for r in rows:
        if not r["variant"].startswith("seedlora-") or peft is None:
            continue
        g = goals[r["variant"]] = {
            "time_le_peft": r["median_ms"] <= peft["median_ms"],
            "memory_le_peft": r["peak_bytes"] <= peft["peak_bytes"],
        }
        if not r["variant"].endswith(REFERENCE):
            g["time_le_0.6_peft"] = r["time_x_peft"] <= FAST_PEFT
            if floor is not None:
                g["time_le_1.25_floor"] = r["time_x_floor"] <= FAST_FLOOR
        if r["variant"] != base_variant(r["variant"]):
            g["time_le_0.35_peft"] = r["time_x_peft"] <= STEP_PEFT
            if r["time_x_floor_busy"] is not None:
                g["time_le_1.25_floor_busy"] = r["time_x_floor_busy"] <= STEP_BUSY
            if r["time_x_floor"] is not None:
                g["time_le_1.05_floor"] = r["time_x_floor"] <= STEP_FLOOR_7B
    for mode in ("", GROUPED, GRAPHED, f"{GROUPED}{LIGER}", f"{GRAPHED}{LIGER}"):
        gaussian = by.get(f"seedlora-gaussian{mode}")
        for kind in ("circulant", "random-block"):
            block = by.get(f"seedlora-{kind}{mode}")
            if gaussian is not None and block is not None:
                goals.setdefault(block["variant"], {})["faster_than_gaussian"] = (
                    block["median_ms"] < gaussian["median_ms"]
                )
    return goals


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(rows: list[dict[str, Any]], goals: dict[str, Any]) -> str:
    """The printed summary: one line a variant, goals beside the seedlora rows."""
    head = (
        f"{'variant':<30}{'trainable':>11}{'ms':>10}{'xfloor':>8}{'xPEFT':>7}{'busy ms':>9}"
        f"{'peak MiB':>10}{'xPEFT':>7}{'saved MiB':>11}  goals"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        g = goals.get(r["variant"], {})
        marks = []
        for key, label in (
            ("time_le_peft", "time"),
            ("memory_le_peft", "mem"),
            ("time_le_1.25_floor", "<=1.25floor"),
            ("time_le_0.6_peft", "<=0.6PEFT"),
            ("faster_than_gaussian", "<gauss"),
            ("time_le_1.25_floor_busy", "<=1.25busy"),
            ("time_le_0.35_peft", "<=0.35PEFT"),
            ("time_le_1.05_floor", "<=1.05floor"),
        ):
            if key in g:
                marks.append(f"{label} {'ok' if g[key] else 'MISS'}")
        lines.append(
            f"{r['variant']:<30}{r['trainable_params']:>11,}{r['median_ms']:>10.2f}"
            f"{_fmt(r['time_x_floor']):>8}{_fmt(r['time_x_peft']):>7}{_fmt(r['busy_ms'], '.1f'):>9}"
            f"{r['peak_bytes'] / MIB:>10.1f}{_fmt(r['memory_x_peft']):>7}"
            f"{r['saved_for_backward_bytes'] / MIB:>11.1f}  {', '.join(marks)}"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    """Bar charts of median step time and peak memory, PEFT LoRA's level dashed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is missing: no PNG (rerun with --plot-from on the JSON)")
        return None
    rows = result["variants"]
    names = [r["variant"] for r in rows]
    palette = {FLOOR: "0.6", PEFT: "tab:orange", PEFT_FROZEN_A: "tab:orange"}
    colors = [palette.get(n, "tab:blue") for n in names]
    with figure(path, 1, 2, figsize=(12, 0.5 * len(rows) + 1.8), dpi=110) as (fig, axes):
        panels = (
            ("median step time (ms)", [r["median_ms"] for r in rows], "time_x_peft"),
            ("peak memory (MiB)", [r["peak_bytes"] / MIB for r in rows], "memory_x_peft"),
        )
        for ax, (title, values, ratio_key) in zip(axes, panels, strict=True):
            bars = ax.barh(names, values, color=colors)
            ax.invert_yaxis()
            ax.set_title(title)
            for bar, r in zip(bars, rows, strict=True):
                if r.get(ratio_key) is not None:
                    ax.text(
                        bar.get_width(),
                        bar.get_y() + bar.get_height() / 2,
                        f" {r[ratio_key]:.2f}x PEFT",
                        va="center",
                        fontsize=8,
                    )
            peft = [v for n, v in zip(names, values, strict=True) if n == PEFT]
            if peft:
                ax.axvline(peft[0], color="tab:orange", linestyle="--", linewidth=1)
            ax.set_xlim(0, max(values) * 1.3)
        cfg = result["config"]
        env = result.get("environment", {})
        where = env.get("gpu") or env.get("cpu") or cfg["device"]
        fig.suptitle(
            f"client step (fwd+bwd+AdamW), {cfg['preset']} {cfg['dtype']}, batch {cfg['batch']} x "
            f"seq {cfg['seq']}, rank {cfg['rank']}, 7 projections - {where}",
            fontsize=10,
        )
    return path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--preset", choices=sorted(PRESETS), help="default: qwen on cuda, small on cpu")
    p.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=f"change a field of the preset: {', '.join(Shape.__dataclass_fields__)}",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="passes over all variants, order reversed on odd passes (order effects, spread)",
    )
    p.add_argument(
        "--discard-rounds",
        type=int,
        default=0,
        help="whole passes run first and thrown away (a process that is still warming up)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=ALL_VARIANTS,
        help="default: every variant the device runs (the -graphed ones on CUDA only)",
    )
    p.add_argument("--liger", action="store_true", help="add the -liger variants (CUDA)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--top-ops",
        type=int,
        default=12,
        help="keep the ops with most self time in one extra profiled step (0: none on CUDA)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for JSON and PNG")
    p.add_argument("--name", help="result file stem (default step_time_<device>)")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    p.add_argument("--plot-from", type=Path, help="only draw the PNG of an existing JSON")
    return p.parse_args(argv)


def resolve_shape(args: argparse.Namespace) -> tuple[str, Shape]:
    preset = args.preset or ("qwen2.5-0.5b" if args.device.startswith("cuda") else "small")
    shape = PRESETS[preset]
    fields = dict(item.split("=", 1) for item in args.shape)
    return preset, replace(shape, **{k: type(getattr(shape, k))(v) for k, v in fields.items()})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run every variant, print the table, write `<out>/<name>.json` and `.png`."""
    args = parse_args(argv)
    if args.plot_from is not None:
        result = json.loads(args.plot_from.read_text())
        plot(result, args.plot_from.with_suffix(".png"))
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    preset, shape = resolve_shape(args)
    if args.variants is None:
        args.variants = [*VARIANTS, *(CUDA_VARIANTS if device.type == "cuda" else ())]
        args.variants += list(LIGER_VARIANTS) if args.liger else []
    if device.type != "cuda" and any(v.endswith(LIGER) for v in args.variants):
        raise SystemExit("--variants: the -liger variants run Triton kernels, CUDA only")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)

    per_variant: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    failed: dict[str, str] = {}
    discarded: dict[str, list[float]] = {v: [] for v in args.variants}
    for rnd in range(args.discard_rounds + args.rounds):
        order = args.variants if rnd % 2 == 0 else args.variants[::-1]
        for variant in order:
            if variant in failed:
                continue
            try:
                row = measure(variant, shape, ids, args)
            except RuntimeError as err:  # a capture that fails must not lose the other rows
                if variant not in (*CUDA_VARIANTS, *LIGER_VARIANTS):
                    raise
                failed[variant] = f"{type(err).__name__}: {err}"[:2000]
                print(f"round {rnd} {variant}: FAILED {failed[variant]}", flush=True)
                release(device)
                continue
            release(device)
            if rnd < args.discard_rounds:
                discarded[variant].append(row["median_ms"])
            else:
                per_variant[variant].append(row)
            phases = " ".join(f"{k} {v:.2f}" for k, v in row["phase_median_ms"].items())
            ops = ", ".join(f"{o['op']} {o['self_ms']:.2f}" for o in row["top_ops"][:6])
            print(
                f"round {rnd} {variant:<24} {row['median_ms']:9.2f} ms ({phases}) "
                f"busy {_fmt(row['busy_ms'], '.1f')} ms in {row['aten_op_calls']} ops  "
                f"peak {row['peak_bytes'] / MIB:9.1f} MiB  "
                f"leftover {row['leftover_bytes_at_start'] / MIB:.1f} MiB  "
                f"syncs {row['host_syncs']}\n    top ops: {ops}",
                flush=True,
            )
    rows = [merge_rounds(per_variant[v]) for v in args.variants if v not in failed]
    for row in rows:
        row["discarded_round_median_ms"] = discarded[row["variant"]]
    goals = add_ratios(rows)
    print(table(rows, goals))
    payload = {
        "benchmark": "step_time",
        "command": " ".join(["python -m bench.step_time", *(argv or sys.argv[1:])]),
        "config": {
            "preset": preset,
            "device": str(device),
            **asdict(shape),
            "targets": list(PROJECTIONS),
            "layer_dims": layer_dims(shape),
            "warmup": args.warmup,
            "steps": args.steps,
            "rounds": args.rounds,
            "discard_rounds": args.discard_rounds,
            "lr": args.lr,
            "seed": args.seed,
            "optimizer": "torch.optim.AdamW over trainable params (none for the floor)",
        },
        "variants": rows,
        "failed": failed,
        "goals": goals,
    }
    name = args.name or f"step_time_{device.type}"
    path = write_result(name, payload, args.out)
    if not args.no_plot:
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
    return payload


if __name__ == "__main__":
    main()
