"""What a run tells people: what it trains (one line at the start), one line per round
(with the run's bytes so far), metrics.json, rounds.jsonl and a plot.

metrics.json is the run's document (config, links digest and count, every round's entry
under "rounds"); it is rewritten whole, so the server writes it in full only when a run
starts, ends or fails, and at every link close a progress version of constant size (that
link's rounds under "recent_rounds", `"in_progress": true`, and "rounds_file" naming
rounds.jsonl), never every round. rounds.jsonl gets each round's
entry as one JSON line when the round is committed (an append, fsync'd): the live
record between link closes, and where `resume` gets the history back (the checkpoint
does not carry it). On resume the file is rewritten once with the rounds the checkpoint
covers, so a round that is run again is not listed twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from contract.config import UploadConfig
from contract.round_record import MB, Refused, RoundRecord
from seedlora import adapter_layers
from seedlora.compress import encode
from seedlora.serialize import atomic_write_bytes


def round_line(record: RoundRecord) -> str:
    """`link 1 round 2/3 (global 5) | clients 8/8 | lr 0.002 | train loss 2.31 | central
    ppl 9.8 | up 1.8 MB down 2.0 MB (run: up 9.0 MB down 10.1 MB) | 12.3s`, with
    `every reply of the link rejected: node 103 (2 replies: <reason>)` after the clients
    when a node's train replies in this link were all rejected so far.

    A run of one link (the baselines without chains, or num-links = 1) reads
    `round 5/9`: its rounds-per-link is the run's rounds. `record` is a plain round's
    (its `replies` set)."""
    r = record.replies
    assert r is not None, "round_line: a plain round's record"
    of = f"round {r.round_in_link}/{r.rounds_per_link}"
    parts = [
        f"link {record.chain_index} {of} (global {record.global_round})" if r.num_links > 1 else of,
        f"clients {r.accepted}/{r.sent}" + (" SKIPPED" if r.skipped else ""),
    ]
    if r.refused:
        parts.append(refused_text(r.refused))
    if record.lr is not None:
        parts.append(f"lr {record.lr:.4g}")
    if r.train_loss is not None:
        parts.append(f"train loss {r.train_loss:.4f}")
    parts.append(f"central {_metrics(record.central) or '-'}")
    if r.client_eval:  # client-eval with-train: the model the clients received
        of = r.client_eval_model
        parts.append(f"clients' eval {_metrics(r.client_eval)} (model of round {of})")
    traffic = f"up {r.bytes_up / MB:.3f} MB down {r.bytes_down / MB:.3f} MB"
    up, down = r.bytes_up_total / MB, r.bytes_down_total / MB
    traffic += f" (run: up {up:.3f} MB down {down:.3f} MB)"
    parts.append(traffic)
    parts.append(f"{record.wall_time:.1f}s")
    return " | ".join(parts)


def _metrics(metrics: dict) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "num-examples")


def refused_text(refused: Sequence[Refused]) -> str:
    """`every reply of the link rejected: node 103 (2 replies: client error: boom)`."""
    named = "; ".join(
        f"node {r.node} ({r.replies} repl{'y' if r.replies == 1 else 'ies'}: {r.reason})"
        for r in refused
    )
    return f"every reply of the link rejected: {named}"


def refused_nodes(history: Sequence[RoundRecord]) -> list[dict]:
    """The run's nodes whose every train reply in a link was rejected: each link's last
    round's `refused` list, with the link (for metrics.json's `refused_nodes`)."""
    last: dict[int, tuple[Refused, ...]] = {}
    for record in history:
        if record.replies is not None:
            last[record.chain_index] = record.replies.refused
    return [
        {"link": link, "node": r.node, "replies": r.replies, "reason": r.reason}
        for link, refused in sorted(last.items())
        for r in refused
    ]


def compact_names(names: Sequence[str]) -> str:
    """Module names folded into patterns: numeric path parts become ranges, and names that
    differ only after them share braces, e.g. `transformer.h.[0-3].{attn.c_attn,mlp.c_fc}`.
    """
    templates: dict[tuple[str, ...], list[tuple[int, ...]]] = {}
    for name in names:
        parts = name.split(".")
        key = tuple("#" if x.isdigit() else x for x in parts)
        templates.setdefault(key, []).append(tuple(int(x) for x in parts if x.isdigit()))
    grouped: dict[str, list[str]] = {}  # prefix up to the last number -> suffixes
    for key, numbers in templates.items():
        values = iter([_ranges(sorted({n[i] for n in numbers})) for i in range(len(numbers[0]))])
        rendered = [next(values) if x == "#" else x for x in key]
        last = max((i for i, x in enumerate(key) if x == "#"), default=-1)
        prefix, suffix = ".".join(rendered[: last + 1]), ".".join(rendered[last + 1 :])
        grouped.setdefault(prefix, []).append(suffix)
    out = []
    for prefix, suffixes in grouped.items():
        tail = suffixes[0] if len(suffixes) == 1 else _braced(suffixes)
        out.append(f"{prefix}.{tail}" if prefix and tail else prefix or tail)
    return ", ".join(out)


def _braced(suffixes: list[str]) -> str:
    """['self_attn.q_proj', 'self_attn.v_proj'] -> 'self_attn.{q_proj,v_proj}'."""
    split = [x.split(".") for x in suffixes]
    common = 0
    while all(len(x) > common + 1 and x[common] == split[0][common] for x in split):
        common += 1
    head = ".".join(split[0][:common])
    body = "{" + ",".join(".".join(x[common:]) for x in split) + "}"
    return f"{head}.{body}" if head else body


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '[0-2,5]'; a single value stays bare."""
    if len(values) == 1:
        return str(values[0])
    spans, start = [], values[0]
    for prev, cur in zip(values, [*values[1:], None], strict=True):
        if cur is None or cur != prev + 1:
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return "[" + ",".join(spans) + "]"


def adapter_summary(model, method: str, state: dict, upload: UploadConfig) -> str:
    """`adapter_line` for a prepared model: its adapted layers (B-only adapters, or PEFT's
    LoRA modules for fedit), its fully trained heads, the trainable numbers in `state`,
    and what one client uploads per round in the run's codec, at full rank (client-ranks
    send less)."""
    codec = upload.upload_codec
    adapted = [name for name, _ in adapter_layers(model)]
    if not adapted:  # fedit: PEFT's LoRA layers hold their A's in a `lora_A` module dict
        adapted = [
            _plain(n)
            for n, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
        ]
    heads = [] if method == "full" else [k.rsplit(".", 1)[0] for k in state if "lora_" not in k]
    heads = list(dict.fromkeys(_plain(h) for h in heads))
    trainable = sum(v.numel() for v in state.values())
    upload = sum(t.numel() * t.element_size() for t in encode(state, codec).values())
    return adapter_line(method, adapted, heads, trainable, upload)


def _plain(name: str) -> str:
    """A module name without PEFT's wrapping (`base_model.model.`, `.modules_to_save...`)."""
    return name.removeprefix("base_model.model.").split(".modules_to_save")[0]


def adapter_line(
    method: str, adapted: Sequence[str], heads: Sequence[str], trainable: int, upload: int
) -> str:
    """What the run trains and ships: `adapted 16 layers (...) | heads ... | 57,344 trainable
    parameters | upload 229.4 kB per client-round`."""
    if method == "full":
        what = "every parameter (full fine-tuning)"
    else:
        what = f"adapted {len(adapted)} layers ({compact_names(adapted)})"
    parts = [f"{method}: {what}"]
    if heads:
        parts.append(f"heads {compact_names(heads)}")
    parts.append(f"{trainable:,} trainable parameters")
    size = f"{upload / 1e6:.2f} MB" if upload >= 1e6 else f"{upload / 1e3:.1f} kB"
    parts.append(f"upload {size} per client-round")
    return " | ".join(parts)


ROUNDS = "rounds.jsonl"
SAMPLES = "samples.jsonl"  # a generative task's final completions (Task.samples)


def append_round(path: str | os.PathLike, record: RoundRecord) -> None:
    """Append one round's record to a rounds.jsonl file (one JSON object per line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record.to_dict(), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rounds(path: str | os.PathLike) -> list[RoundRecord]:
    """The records of a rounds.jsonl file, in order; [] if there is none. A line that does
    not parse (a write cut short by a crash) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            records.append(RoundRecord.from_dict(entry))
    return records


def write_jsonl(path: str | os.PathLike, entries: list[dict]) -> Path:
    """Replace a JSON-lines file (rounds.jsonl, samples.jsonl) with `entries`, atomically."""
    text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
    return atomic_write_bytes(path, text.encode())


def write_rounds(path: str | os.PathLike, history: Sequence[RoundRecord]) -> Path:
    """Replace a rounds.jsonl file with `history`, atomically."""
    return write_jsonl(path, [r.to_dict() for r in history])


def write_metrics(path: str | os.PathLike, document: dict) -> Path:
    return atomic_write_bytes(path, json.dumps(document, indent=1, sort_keys=True).encode())


def plot_history(
    path: str | os.PathLike, history: Sequence[RoundRecord], rounds_per_link: int
) -> Path:
    """Train loss and central eval per round, with a dashed line at every link boundary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    trained = [r for r in history if r.replies is not None and r.replies.train_loss is not None]
    ax.plot(
        [r.global_round for r in trained],
        [r.replies.train_loss for r in trained],  # type: ignore[union-attr]
        "o-",
        label="train loss (clients)",
    )
    central = [r for r in history if r.central]
    keys = [k for k in ("loss", "accuracy") if central and k in central[0].central]
    for key in keys:
        ax.plot(
            [r.global_round for r in central],
            [r.central[key] for r in central],
            "s-",
            label=f"central eval {key}",
        )
    last = max((r.global_round for r in history), default=0)
    for boundary in range(rounds_per_link, last, rounds_per_link):
        ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("round (dashed: chain link merged)")
    ax.set_ylabel("value")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
