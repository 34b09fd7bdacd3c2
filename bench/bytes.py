"""Upload and download bytes per client-round: seedlora vs FFA-LoRA, FedIT and full FedAvg.

Why: the pitch is that B-only adapters halve what a client sends compared with LoRA
(FedIT). Per adapted layer, ours/fedit = n_out / (n_in + n_out): exactly 0.5 only when
n_in == n_out, below it when n_in > n_out (down-proj, GQA k/v), above it otherwise
(up/gate, fused qkv). So the ratio is counted from real model structures, built on the
meta device (no weights, nothing downloaded), cross-checked against what
`seedlora.methods.prepare` actually marks trainable, and one real Flower reply is
measured to show the wire overhead the analytic count leaves out.

    python -m bench.bytes [--models shipped qwen2.5-0.5b ...] [--ranks 8 16] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from bench.common import QWEN25_05B, RESULTS, figure, write_result
from seedlora import KINDS, adapter_layers, inject
from tasks.models import EMBEDDED, resolve_model_path, target_modules_for

FLOAT32 = 4  # bytes per number: the global state and every reply are float32
METHODS = ("seedlora", "ffa", "fedit", "full")
SHIPPED = "shipped"
# Public configs written out, so nothing is fetched: (hidden, intermediate, heads, kv heads,
# layers, vocab) as in each model's config.json on the hub.
CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", **QWEN25_05B),
    "llama2-7b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        num_hidden_layers=28,
        vocab_size=152064,
        tie_word_embeddings=False,
    ),
}
DEFAULT_MODELS = (SHIPPED, *CONFIGS)


@dataclass(frozen=True)
class LayerShape:
    """One adapted layer: its module name and (n_in, n_out) in nn.Linear orientation."""

    name: str
    n_in: int
    n_out: int

    @property
    def group(self) -> str:
        """Layer type without the block index, e.g. 'self_attn.q_proj' or 'mlp.c_proj'."""
        return ".".join(self.name.split(".")[-2:])


def load_config(name: str) -> PretrainedConfig:
    """The shipped model's config from its directory, or one of the written-out configs."""
    if name == SHIPPED:
        return AutoConfig.from_pretrained(resolve_model_path(EMBEDDED))
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; expected {SHIPPED} or one of {list(CONFIGS)}")
    spec = dict(CONFIGS[name])
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model's structure with no storage: a 7B model costs nothing to build."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def num_params(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings once), i.e. what full FedAvg ships."""
    return sum(p.numel() for p in model.parameters())


def adapted_layers(
    config: PretrainedConfig, rank: int, kind: str = "circulant"
) -> list[LayerShape]:
    """Shapes of the layers `seedlora.injection` adapts with the task default targets."""
    model = meta_model(config)
    inject(model, target_modules_for(config.model_type), kind=kind, seed=0, rank=rank, alpha=1.0)
    return [LayerShape(n, m.spec.n_in, m.spec.n_out) for n, m in adapter_layers(model)]


def prepared_counts(config: PretrainedConfig, rank: int) -> dict[str, int]:
    """Trainable numbers per method as the pipeline prepares the model (what it ships)."""
    from seedlora.methods import prepare

    targets = target_modules_for(config.model_type)
    variants = [("seedlora", k) for k in KINDS] + [(m, "gaussian") for m in METHODS[1:]]
    counts = {}
    for method, kind in variants:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice on GPT-2
            model = prepare(
                meta_model(config), method, targets, kind=kind, seed=0, rank=rank, alpha=2.0 * rank
            )
        key = f"seedlora-{kind}" if method == "seedlora" else method
        counts[key] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def count_model(name: str, rank: int) -> dict[str, Any]:
    """Analytic bytes per client-round for every method on one model at one rank."""
    config = load_config(name)
    layers = adapted_layers(config, rank)
    b_numbers = sum(x.n_out * rank for x in layers)
    ab_numbers = sum((x.n_in + x.n_out) * rank for x in layers)
    full_numbers = num_params(meta_model(config))
    numbers = {"seedlora": b_numbers, "ffa": b_numbers, "fedit": ab_numbers, "full": full_numbers}
    prepared = prepared_counts(config, rank)
    expected = {f"seedlora-{k}": b_numbers for k in KINDS} | {m: numbers[m] for m in METHODS[1:]}
    groups: dict[tuple[str, int, int], int] = {}
    for x in layers:
        groups[(x.group, x.n_in, x.n_out)] = groups.get((x.group, x.n_in, x.n_out), 0) + 1
    return {
        "model": name,
        "model_type": config.model_type,
        "rank": rank,
        "num_adapted_layers": len(layers),
        "num_params": full_numbers,
        "numbers": numbers,
        "bytes": {
            m: {"up": numbers[m] * FLOAT32, "down_per_round": numbers[m] * FLOAT32} for m in METHODS
        },
        "seedlora_join_at_link_k_extra_bytes_per_link": b_numbers * FLOAT32,
        "ratio_up_ours_fedit": b_numbers / ab_numbers,
        "ratio_up_ours_full": b_numbers / full_numbers,
        "layer_types": [
            {
                "group": g,
                "n_in": i,
                "n_out": o,
                "count": c,
                "ratio_ours_fedit": o / (i + o),
                "exactly_half": i == o,
            }
            for (g, i, o), c in groups.items()
        ],
        "prepared_trainable_numbers": prepared,
        "prepared_agree": prepared == expected,
        "layers": [asdict(x) for x in layers],
    }


def measured_reply(rank: int = 8) -> dict[str, Any]:
    """Bytes of one real Flower reply of the shipped model vs the analytic B count."""
    from flwr.app import ArrayRecord
    from flwr.common.serde import array_record_to_proto

    from seedlora import record_link, trainable_state
    from seedlora.serialize import links_to_bytes

    # Shapes are all that count (B starts at zero), so the weights need not be loaded.
    config = load_config(SHIPPED)
    model = AutoModelForCausalLM.from_config(config)
    inject(
        model, target_modules_for(config.model_type), kind="circulant", seed=0, rank=rank, alpha=16
    )
    state = {k: v.float().contiguous() for k, v in trainable_state(model).items()}
    record = ArrayRecord(state)
    analytic = sum(x.n_out * rank for x in adapted_layers(config, rank)) * FLOAT32
    counted = record.count_bytes()
    return {
        "model": SHIPPED,
        "rank": rank,
        "arrays": len(state),
        "analytic_bytes": analytic,
        "arrayrecord_count_bytes": counted,
        "arrayrecord_proto_bytes": array_record_to_proto(record).ByteSize(),
        "overhead_bytes": counted - analytic,
        "overhead_fraction": (counted - analytic) / analytic,
        "one_link_safetensors_bytes": len(links_to_bytes([record_link(model)])),
    }


def fmt_bytes(n: float) -> str:
    """Human-readable decimal bytes (kB = 1000 B), short enough for a table cell."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1000
    return f"{n} B"


def print_tables(rows: Sequence[dict[str, Any]], reply: dict[str, Any]) -> None:
    """Totals per model/rank, the per-layer-type ratios, and the measured Flower reply."""
    head = f"{'model':14} {'r':>3} {'layers':>6} " + " ".join(f"{m + ' up':>11}" for m in METHODS)
    print(head + f" {'ours/fedit':>10} {'ours/full':>10} {'checks':>6}")
    for r in rows:
        cells = " ".join(f"{fmt_bytes(r['bytes'][m]['up']):>11}" for m in METHODS)
        print(
            f"{r['model']:14} {r['rank']:>3} {r['num_adapted_layers']:>6} {cells} "
            f"{r['ratio_up_ours_fedit']:>10.4f} {r['ratio_up_ours_full']:>10.2e} "
            f"{'ok' if r['prepared_agree'] else 'DIFFER':>6}"
        )
    print(
        "download per round = upload for every method; seedlora: a client up to date "
        "receives the global B only, a client joining at link k receives k*|B| once."
    )
    seen = set()
    print(f"\n{'model':14} {'layer type':18} {'n_in':>6} {'n_out':>6} {'ours/fedit':>10}")
    for r in rows:
        for t in r["layer_types"] if r["model"] not in seen else []:
            half = "  (exactly 0.5: n_in == n_out)" if t["exactly_half"] else ""
            print(
                f"{r['model']:14} {t['group']:18} {t['n_in']:>6} {t['n_out']:>6} "
                f"{t['ratio_ours_fedit']:>10.4f}{half}"
            )
        seen.add(r["model"])
    print(
        f"\nmeasured: one Flower reply, {SHIPPED} model, rank {reply['rank']}: "
        f"ArrayRecord.count_bytes() = {reply['arrayrecord_count_bytes']} B, protobuf "
        f"{reply['arrayrecord_proto_bytes']} B, analytic {reply['analytic_bytes']} B "
        f"(+{100 * reply['overhead_fraction']:.2f}% for {reply['arrays']} arrays); one link "
        f"as safetensors {reply['one_link_safetensors_bytes']} B"
    )


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Grouped bars: upload bytes per method per model, one panel per rank, log y."""
    ranks = sorted({r["rank"] for r in rows})
    with figure(path, 1, len(ranks), figsize=(6 * len(ranks), 4.5), squeeze=False) as (_, axes):
        for ax, rank in zip(axes[0], ranks, strict=True):
            sub = [r for r in rows if r["rank"] == rank]
            width = 0.8 / len(METHODS)
            for j, method in enumerate(METHODS):
                xs = [i + (j - (len(METHODS) - 1) / 2) * width for i in range(len(sub))]
                ax.bar(xs, [r["bytes"][method]["up"] for r in sub], width, label=method)
            ax.set_xticks(range(len(sub)), [r["model"] for r in sub])
            ax.set_yscale("log")
            ax.set_ylabel("upload bytes per client-round (float32)")
            ax.set_title(
                f"rank {rank}: ours/fedit "
                + ", ".join(f"{r['ratio_up_ours_fedit']:.3f}" for r in sub)
            )
            ax.grid(axis="y", which="both", alpha=0.3)
            ax.legend()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), choices=list(DEFAULT_MODELS)
    )
    parser.add_argument("--ranks", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--reply-rank", type=int, default=8, help="rank of the measured reply")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [count_model(m, r) for m in args.models for r in args.ranks]
    reply = measured_reply(args.reply_rank)
    print_tables(rows, reply)
    payload = {
        "config": {
            "models": args.models,
            "ranks": args.ranks,
            "bytes_per_number": FLOAT32,
            "configs": {m: CONFIGS[m] for m in args.models if m in CONFIGS},
        },
        "notes": {
            "seedlora_download": "a client up to date receives the global B only; a client "
            "that joins at link k receives k*|B| once (the merged links it lacks)",
            "ffa": "B only both ways; the fixed A is derived from a seed (or sent once)",
            "ratio_ours_fedit": "per layer n_out/(n_in+n_out): exactly 0.5 iff n_in == n_out",
        },
        "rows": rows,
        "measured_reply": reply,
    }
    write_result("bytes", payload, args.out_dir)
    plot(rows, args.out_dir / "bytes.png")
    return payload


if __name__ == "__main__":
    main()
