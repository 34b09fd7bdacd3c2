"""The run folder: what a run writes and what `resume` reads back.

`RunStore` owns everything under the run's folder: rounds.jsonl (one entry per round,
appended), the checkpoint and the link log (server/checkpoint.py), the accepted client
updates (`save-client-updates`), TensorBoard events (server/tracking.py), metrics.json and
its plot, and a generative task's samples. What a round writes does not grow with the
chain: its entry and the checkpoint; a link close adds one file to the link log and
rewrites metrics.json with that link's rounds only.

`resume` reads the checkpoint and refuses one that would continue another run: a run config
that differs in a key outside `RESUMABLE_CHANGES`, links merged under another A rule or
another gaussian scale.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.common.logger import log

from contract.config import RunConfig, RunConfigError
from seedlora.serialize import atomic_write_bytes, state_to_bytes
from seedlora.spec import A_RULE, SCALE_RULE, ARuleError, check_a_rule
from strategies.registry import EXACT_IN_WEIGHT_SPACE

from . import checkpoint, report, tracking
from .state import ChainState

METRICS = "metrics.json"
PLOT = "metrics.png"
UPDATES = "client-updates"
# What to do with a checkpoint made under another A rule (seedlora.spec.check_a_rule).
RESUME = "start a fresh run (another run-name), or resume it with the seedlora that made it"

# Config keys that may change when a run is resumed; all others must match the checkpoint.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "run-name",
        "output-dir",
        "round-timeout",
        "device",
        "server-device",
        "gradient-checkpointing",
        "export",
        "comm-budget-mb",  # a run stopped by its budget continues with a larger one
        "tensorboard",
    }
)


class RunStore:
    """The files of one run in `out_dir` (module docstring), for the run `run_id` of `cfg`."""

    def __init__(self, out_dir: Path, cfg: RunConfig, run_id: int):
        self.out_dir, self.cfg, self.run_id = Path(out_dir), cfg, run_id
        self.rounds_path = self.out_dir / report.ROUNDS
        self.scalars: tracking.RoundScalars | None = None  # opened by `open`

    # --- resume --------------------------------------------------------------------------
    def resume(self, config: dict) -> ChainState:
        """The checkpoint to continue, for a run started with the flat run config `config`;
        its history cut to the rounds it covers (a round logged after it runs again) and
        link-log files beyond it removed. RunConfigError when it belongs to another run."""
        kind = self.cfg.adapter.kind
        try:  # a checkpoint or link made under another A rule derives other A's
            ckpt = checkpoint.load(self.out_dir)
            check_a_rule(ckpt.a_rule, [kind], "this run's checkpoint", RESUME)
        except ARuleError as err:
            raise RunConfigError(f"resume: {err}") from None
        ckpt.a_rule = A_RULE  # circulant: no A drawn, the same links under either rule
        theirs = ckpt.config
        changed = sorted(
            k for k in config if k not in RESUMABLE_CHANGES and config[k] != theirs.get(k)
        )
        if changed:
            raise RunConfigError(f"resume: run-config differs from the checkpoint in {changed}")
        if ckpt.scale != SCALE_RULE and kind == "gaussian":
            raise RunConfigError(
                "resume: this run's links were merged under another adapter scale "
                f"({ckpt.scale or 'alpha/r, before the gaussian gain'}; now {SCALE_RULE}), "
                "so they would rebuild to another base; start a fresh run (another run-name)"
            )
        ckpt.scale = SCALE_RULE  # block kinds: gain 1, the same links under either rule
        ckpt.config = config
        history = ckpt.history or report.read_rounds(self.rounds_path)
        ckpt.history = [h for h in history if h.get("round", 0) <= ckpt.global_round]
        report.write_rounds(self.rounds_path, ckpt.history)
        checkpoint.discard_links_from(self.out_dir, len(ckpt.links))
        return ckpt

    # --- a run's writes --------------------------------------------------------------------
    def open(self, state: ChainState, fresh: bool) -> None:
        """Start writing: TensorBoard events (purged after a resumed checkpoint), and for a
        `fresh` run the folder cleared of what an earlier run left (checkpoints, link log)."""
        resumed_at = None if fresh else state.global_round
        self.scalars = tracking.RoundScalars(self.out_dir, self.cfg.output.tensorboard, resumed_at)
        if fresh:
            checkpoint.clear(self.out_dir)

    def base_round(self, state: ChainState) -> None:
        """Round 0 (the base model's evaluation), the history's only entry: rounds.jsonl."""
        report.write_rounds(self.rounds_path, state.history)
        self._scalars(state.history[0])

    def commit(self, state: ChainState, updates: list | None = None) -> None:
        """The round `state.history[-1]` taken: its accepted client `updates` (when kept),
        its rounds.jsonl line, the checkpoint and its TensorBoard scalars."""
        entry = state.history[-1]
        if updates:
            self._save_updates(state.global_round, updates)
        report.append_round(self.rounds_path, entry)
        checkpoint.save(self.out_dir, state)
        self._scalars(entry)

    def checkpoint(self, state: ChainState) -> None:
        checkpoint.save(self.out_dir, state)

    def _scalars(self, entry: dict) -> None:
        if self.scalars is not None:
            self.scalars.write(entry)

    def _save_updates(self, global_round: int, updates: list) -> None:
        """The accepted client states of a round, so anyone can re-check the average."""
        tensors = {f"{part}/{k}": v for part, _, state in updates for k, v in state.items()}
        meta = {"weights": {str(part): n for part, n, _ in updates}, "round": global_round}
        path = self.out_dir / UPDATES / f"round-{global_round:04d}.safetensors"
        atomic_write_bytes(path, state_to_bytes(tensors, meta))

    def write_metrics(
        self, state: ChainState, stopped: str | None = None, progress: bool = False
    ) -> None:
        """metrics.json, the run's document for people: at start, the end, and when a run
        fails, with every round; at a link close (`progress`) with that link's rounds only
        and a pointer to rounds.jsonl, so a link close writes the same bytes at link 256 as
        at link 2 (the whole history was 580 kB at 256 links)."""
        s = state
        document = {
            "config": s.config,
            "run_id": self.run_id,
            "links_digest": s.links.digest,
            "links_merged": len(s.links),
            "rounds": s.history,
            "exact_in_weight_space": self.cfg.strategy.name in EXACT_IN_WEIGHT_SPACE,
            "stopped": stopped,
        }
        if progress:
            del document["rounds"]
            document |= {
                "in_progress": True,
                "rounds_file": report.ROUNDS,
                "rounds_so_far": len(s.history),
                "recent_rounds": s.history[-self.cfg.chain.rounds_per_link :],
            }
        else:
            document["refused_nodes"] = report.refused_nodes(s.history)
        report.write_metrics(self.out_dir / METRICS, document)

    def close(self, state: ChainState, stopped: str | None) -> None:
        """The run's end: the final metrics.json, the events closed, the plot."""
        self.write_metrics(state, stopped)
        if self.scalars is not None:
            self.scalars.close()
        report.plot_history(self.out_dir / PLOT, state.history, self.cfg.schedule[1])

    def write_samples(self, rows: list[dict]) -> None:
        path = report.write_jsonl(self.out_dir / report.SAMPLES, rows)
        log(INFO, "%d generated samples written to %s", len(rows), path)
