"""What a run leaves behind for people: metrics.json, rounds.jsonl, a plot, one log line per round.

metrics.json is the run's document (config, links digest and count, every round's entry
under "rounds"); it is rewritten whole, so the server writes it only when a run starts,
at every link close and at the end, never every round. rounds.jsonl gets each round's
entry as one JSON line when the round is committed (an append, fsync'd): the live
record between link closes, and where `resume` gets the history back (the checkpoint
does not carry it). On resume the file is rewritten once with the rounds the checkpoint
covers, so a round that is run again is not listed twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from seedlora.serialize import atomic_write_bytes


def round_line(entry: dict) -> str:
    """`link 1 round 2/3 (global 5) | clients 8/8 | train loss 2.31 | central ppl 9.8 | ...`."""
    central = entry.get("central") or {}
    parts = [
        f"link {entry['link']} round {entry['round_in_link']}/{entry['rounds_per_link']} "
        f"(global {entry['round']})",
        f"clients {entry['accepted']}/{entry['sent']}" + (" SKIPPED" if entry["skipped"] else ""),
    ]
    if entry.get("train_loss") is not None:
        parts.append(f"train loss {entry['train_loss']:.4f}")
    metric = " ".join(f"{k} {v:.4g}" for k, v in central.items() if k != "num-examples")
    parts.append(f"central {metric or '-'}")
    parts.append(f"up {entry['bytes_up'] / 1e6:.3f} MB down {entry['bytes_down'] / 1e6:.3f} MB")
    parts.append(f"{entry['wall_time']:.1f}s")
    return " | ".join(parts)


ROUNDS = "rounds.jsonl"


def append_round(path: str | os.PathLike, entry: dict) -> None:
    """Append one round's entry to a rounds.jsonl file (one JSON object per line)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rounds(path: str | os.PathLike) -> list[dict]:
    """The entries of a rounds.jsonl file, in order; [] if there is none. A line that does
    not parse (a write cut short by a crash) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def write_rounds(path: str | os.PathLike, entries: list[dict]) -> Path:
    """Replace a rounds.jsonl file with `entries`, atomically."""
    text = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
    return atomic_write_bytes(path, text.encode())


def write_metrics(path: str | os.PathLike, document: dict) -> Path:
    return atomic_write_bytes(path, json.dumps(document, indent=1, sort_keys=True).encode())


def plot_history(path: str | os.PathLike, history: list[dict], rounds_per_link: int) -> Path:
    """Train loss and central eval per round, with a dashed line at every link boundary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    rounds = [h["round"] for h in history if h.get("train_loss") is not None]
    ax.plot(
        rounds,
        [h["train_loss"] for h in history if h.get("train_loss") is not None],
        "o-",
        label="train loss (clients)",
    )
    central = [h for h in history if h.get("central")]
    keys = [k for k in ("loss", "accuracy") if central and k in central[0]["central"]]
    for key in keys:
        ax.plot(
            [h["round"] for h in central],
            [h["central"][key] for h in central],
            "s-",
            label=f"central eval {key}",
        )
    last = max((h["round"] for h in history), default=0)
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
