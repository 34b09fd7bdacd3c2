"""Pretrain the base model shipped in `tasks/assets/base-model` (`python -m tasks.pretrain`).

A byte-level BPE tokenizer and a GPT-2 style causal LM are trained from scratch on the pretraining
packages of the stdlib corpus only, so the federated (held-out) packages are unseen text.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from tasks.blocks import encode, pack
from tasks.corpus import SPLIT_SEED, corpus_info, load_corpus, split_corpus

EOS = "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / "base-model"


def train_tokenizer(texts: list[str], vocab_size: int, max_len: int) -> GPT2TokenizerFast:
    """Byte-level BPE (no unknown tokens) with `<|endoftext|>` as bos/eos/pad."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return GPT2TokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
        model_max_length=max_len,
    )


@torch.no_grad()
def lm_loss(model: torch.nn.Module, blocks: np.ndarray, batch_size: int = 64) -> float:
    """Mean next-token loss over equal-length blocks."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = torch.from_numpy(blocks[i : i + batch_size])
        out = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x)
        total += out.loss.item() * len(x)
        n += len(x)
    return total / max(n, 1)


def _subsample(blocks: np.ndarray, cap: int) -> np.ndarray:
    """Evenly spaced subset so every package is represented when evaluation is capped."""
    if len(blocks) <= cap:
        return blocks
    return blocks[np.linspace(0, len(blocks) - 1, cap).round().astype(int)]


def _lr_at(step: int, steps: int, warmup: int, lr: float, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-dir", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="model init and data order")
    p.add_argument("--split-seed", type=int, default=SPLIT_SEED, help="corpus package split")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--n-embd", type=int, default=192)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-positions", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-max-blocks", type=int, default=1024)
    return p.parse_args(argv)


def _texts(packages: tuple[str, ...]) -> list[str]:
    corpus = load_corpus()
    return [f.text for pkg in packages for f in corpus[pkg]]


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Train tokenizer and model, evaluate, and write the Hugging Face directory + stats."""
    args = _parse(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    split = split_corpus(args.split_seed)
    t0 = time.time()
    tokenizer = train_tokenizer(_texts(split.pretrain), args.vocab_size, args.n_positions)
    eos = tokenizer.eos_token_id
    train = pack(encode(tokenizer, _texts(split.pretrain)), args.seq_len, eos)
    val = pack(encode(tokenizer, _texts(split.validation)), args.seq_len, eos)
    held_texts = [f.text for pkg in split.federated for f in split.files(pkg, "eval")]
    held = pack(encode(tokenizer, held_texts), args.seq_len, eos)
    val_eval, held_eval = (_subsample(b, args.eval_max_blocks) for b in (val, held))
    print(f"train blocks {len(train)}, val {len(val)}, held-out eval {len(held)}", flush=True)

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=args.n_positions,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    random_held = lm_loss(model, held_eval)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay}],
        lr=args.lr,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=gen)
    pos, history = 0, []
    model.train()
    t_train = time.time()
    bar = tqdm(range(args.steps), desc="pretrain", mininterval=5)
    for step in bar:
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        x = torch.from_numpy(train[order[pos : pos + args.batch_size].numpy()])
        pos += args.batch_size
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args.steps, args.warmup, args.lr)
        loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps - 1:
            history.append((step, round(loss.item(), 4)))
            bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.time() - t_train
    val_loss, held_loss = lm_loss(model, val_eval), lm_loss(model, held_eval)

    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    stats: dict[str, object] = {
        "corpus": corpus_info(args.split_seed),
        "pretrain_packages": list(split.pretrain),
        "validation_packages": list(split.validation),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "params": sum(p.numel() for p in model.parameters()),
        "train_blocks": len(train),
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "epochs": round(args.steps * args.batch_size / len(train), 3),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t0, 1),
        "val_blocks": len(val_eval),
        "val_loss": round(val_loss, 4),
        "val_ppl": round(math.exp(val_loss), 3),
        "heldout_eval_blocks": len(held_eval),
        "heldout_loss": round(held_loss, 4),
        "heldout_ppl": round(math.exp(held_loss), 3),
        "random_init_heldout_ppl": round(math.exp(random_held), 1),
        "loss_history": history,
        "torch": torch.__version__,
    }
    stats["bytes_on_disk"] = size  # weights + tokenizer + configs, before card and stats
    (out / "pretrain_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (out / "README.md").write_text(model_card(stats))
    skip = ("pretrain_packages", "validation_packages", "loss_history")
    print(json.dumps({k: v for k, v in stats.items() if k not in skip}))
    return stats


def model_card(stats: dict) -> str:
    """Short model card with the numbers a reader needs to judge the base model."""
    c, a = stats["corpus"], stats["args"]
    pre, val, fed = c["pretrain"], c["validation"], c["federated"]
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: text-generation
---
# seedlora embedded base model

A tiny GPT-2 style causal LM (`GPT2LMHeadModel`, tied embeddings) plus a byte-level BPE tokenizer,
trained from scratch by `python -m tasks.pretrain` so the project has a real pretrained model
without network access. Rebuild it with the same command; everything is seeded.

## Data
Python {c["python_version"]} standard library `.py` files (tests, site-packages excluded):
{c["total"]["files"]} files in {c["total"]["packages"]} top-level packages. Split by package
(seed {c["seed"]}): pretraining {pre["packages"]} packages / {pre["files"]} files, validation
{val["packages"]} packages / {val["files"]} files, held out for federated fine-tuning
{fed["packages"]} packages / {fed["files"]} files (never seen here; {c["federated_eval_files"]} of
them are evaluation files).

## Model
{stats["params"]:,} parameters (n_embd {a["n_embd"]}, {a["n_layer"]} layers, {a["n_head"]} heads,
{a["n_positions"]} positions, vocab {a["vocab_size"]}), float32, {stats["bytes_on_disk"]:,} bytes of
weights + tokenizer. Trained at sequence length {a["seq_len"]}; positions beyond it are untrained.

## Training
{a["steps"]} AdamW steps (lr {a["lr"]}, {a["warmup"]} warmup steps, cosine to 10%, weight decay
{a["weight_decay"]}, batch {a["batch_size"]} x {a["seq_len"]} tokens), seed {a["seed"]},
{stats["tokens_seen"]:,} tokens seen ({stats["epochs"]} epochs of {stats["train_blocks"]} blocks),
{stats["train_seconds"]} s on CPU ({a["threads"]} threads), torch {stats["torch"]}.

## Results (mean next-token loss, perplexity = exp(loss))
| set | blocks | loss | perplexity |
|---|---|---|---|
| validation packages | {stats["val_blocks"]} | {stats["val_loss"]} | {stats["val_ppl"]} |
| held-out federated eval files | {stats["heldout_eval_blocks"]} | {stats["heldout_loss"]} | \
{stats["heldout_ppl"]} |

The same architecture randomly initialised has held-out perplexity
{stats["random_init_heldout_ppl"]}. All numbers are in `pretrain_stats.json`.
"""


if __name__ == "__main__":
    main()
