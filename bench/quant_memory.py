"""GPU memory of one client: bf16 vs 8bit vs 4bit frozen base (the `quantization` key).

For each model shape, random init built from its config on the GPU (nothing downloaded),
and each base: the weights on the device, then one B-only training step (rank 16 on all
seven projections, circulant A, AdamW on B, bf16 autocast, batch 4 x 512, no gradient
checkpointing) with `--links` merged links (random B) held as side paths on a quantized
base (a bf16 base merges them into its weights at no cost). Reported per client: weights,
the step's peak allocated memory (weights included), and the side paths' size.

A quantized base is made as transformers' BitsAndBytesConfig loader makes it: each target
`nn.Linear` becomes a bitsandbytes `Linear4bit` (nf4, double quantization, bf16 compute)
or `Linear8bitLt` (LLM.int8(), threshold 6) from its bf16 weights; embeddings, norms and
the LM head stay bf16. (The product loads pretrained weights with `from_pretrained(...,
quantization_config=...)`: runtime/quantized.py; a random model has no checkpoint to load.)

    python -m bench.quant_memory            # on a CUDA machine with bitsandbytes
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from torch import nn

from bench.common import parser, write_result
from seedlora import adapter_layers, inject, trainable_state
from seedlora.chain import Link, apply_link

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2-0.36b": (  # Qwen2.5-0.5B's body with a 4096-token vocabulary (bench/common.py)
        "qwen2",
        {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 4096,
            "tie_word_embeddings": True,
        },
    ),
    "llama2-7b": (  # Llama-2-7B's config.json
        "llama",
        {
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "vocab_size": 32000,
            "tie_word_embeddings": False,
        },
    ),
}
GIB = 2**30


def build(arch: str, shape: dict[str, Any]) -> nn.Module:
    """A random-init causal LM of `shape`, bf16, on the GPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    config_cls = Qwen2Config if arch == "qwen2" else LlamaConfig
    cfg = config_cls(max_position_embeddings=1024, **shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def quantize(model: nn.Module, quantization: str) -> int:
    """Replace every target nn.Linear by its bitsandbytes layer (module docstring)."""
    import bitsandbytes as bnb

    names = [n for n, m in model.named_modules() if n.split(".")[-1] in TARGETS]
    for name in names:
        lin = model.get_submodule(name)
        bias = lin.bias is not None
        if quantization == "4bit":
            q = bnb.nn.Linear4bit(
                lin.in_features, lin.out_features, bias=bias, compute_dtype=torch.bfloat16,
                compress_statistics=True, quant_type="nf4", device="meta",
            )  # fmt: skip
            q.weight = bnb.nn.Params4bit(
                lin.weight.data, requires_grad=False, compress_statistics=True,
                quant_type="nf4", module=q,
            )  # fmt: skip
        else:
            q = bnb.nn.Linear8bitLt(
                lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False,
                threshold=6.0, device="meta",
            )  # fmt: skip
            q.weight = bnb.nn.Int8Params(
                lin.weight.data.cpu(), requires_grad=False, has_fp16_weights=False
            )
        if bias:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        q = q.to("cuda")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
        del lin
    return len(names)


def add_links(model: nn.Module, count: int, alpha: float) -> int:
    """`count` merged links of random B, as the chain would have them; returns their
    side paths' bytes (0 for a bf16 base: merged into its weights)."""
    layers = list(adapter_layers(model))
    gen = torch.Generator().manual_seed(1)
    for c in range(count):
        specs = tuple(_at(m.spec, c) for _, m in layers)
        factors = {
            m.spec.layer: 0.01 * torch.randn(m.lora_B.shape, generator=gen) for _, m in layers
        }
        apply_link(model, Link(alpha, specs, factors))
    side = 0
    for _, layer in layers:
        if layer.aside is not None:
            side += sum(t.numel() * t.element_size() for t in layer.aside.buffers())
    return side


def _at(spec, chain_index: int):
    from seedlora.spec import ASpec

    s = spec
    return ASpec(s.kind, s.seed, chain_index, s.rank, s.layer, s.n_in, s.n_out)


def measure(name: str, base: str, args) -> dict[str, Any]:
    arch, shape = SHAPES[name]
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    model = build(arch, shape)
    params = sum(p.numel() for p in model.parameters())
    if base != "bf16":
        quantize(model, base)
    gc.collect()
    torch.cuda.empty_cache()
    weights = torch.cuda.memory_allocated() - start
    build_s = time.perf_counter() - t0
    inject(model, TARGETS, kind="circulant", seed=0, rank=args.rank, alpha=2.0 * args.rank,
           chain_index=args.links)  # fmt: skip
    side = add_links(model, args.links, 2.0 * args.rank)
    trainable = sum(t.numel() for t in trainable_state(model).values())
    adapted = torch.cuda.memory_allocated() - start
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), device="cuda")
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
    peak = torch.cuda.max_memory_allocated() - start
    grads_only_b = all(p.grad is None for n, p in model.named_parameters() if "lora_B" not in n)
    row = {
        "shape": name,
        "base": base,
        "params": params,
        "trainable": trainable,
        "weights_gib": round(weights / GIB, 3),
        "adapted_gib": round(adapted / GIB, 3),
        "side_path_mib": round(side / 2**20, 2),
        "step_peak_gib": round(peak / GIB, 3),
        "step_s": round(min(times[1:] or times), 4),
        "build_s": round(build_s, 2),
        "losses": losses,
        "only_b_has_gradients": grads_only_b,
    }
    print(row, flush=True)
    del model, opt
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, "quant_memory")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--bases", default="bf16,8bit,4bit")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--links", type=int, default=3, help="merged links (side paths if quantized)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    rows = [
        measure(shape, base, args)
        for shape in args.shapes.split(",")
        for base in args.bases.split(",")
    ]
    import bitsandbytes

    setup = {k: getattr(args, k) for k in ("rank", "links", "batch", "seq", "steps")}
    payload = {"setup": setup, "bitsandbytes": bitsandbytes.__version__, "rows": rows}
    write_result(args.name, payload, args.out)


if __name__ == "__main__":
    main()
