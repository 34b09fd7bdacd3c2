"""The server's chain state and its schedule: `num-links x rounds-per-link` rounds.

Each link runs as one `strategy.start(...)` of a fresh Flower strategy wrapped in
`LinkStrategy` (so B-space optimizer state resets by construction). After every round
the server loads the new global B, evaluates centrally, logs a line, rewrites
metrics.json and checkpoints; after every link it merges `(alpha/r) B_bar A_c` into its
base, records the link, moves to A_{c+1} and restarts B from zero.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from contract import protocol as p
from contract.config import RunConfig, RunConfigError
from seedlora import (
    apply_link,
    atomic_dir,
    export_merged,
    export_peft,
    links_digest,
    load_trainable_state,
    prepare,
    record_link,
    set_chain_index,
    trainable_state,
)
from seedlora.methods import B_ONLY
from seedlora.serialize import atomic_write_bytes, state_to_bytes
from strategies import privacy
from strategies.chain import LinkContext, LinkStrategy
from strategies.privacy import PrivacyLedger
from strategies.registry import EXACT_IN_WEIGHT_SPACE, STATE_ATTRIBUTES, build_strategy
from tasks import build_task

from . import checkpoint, report

# Config keys that may change when a run is resumed; all others must match the checkpoint.
RESUMABLE_CHANGES = {"resume", "run_name", "output_dir", "round_timeout", "device", "export"}


@dataclass
class ChainState:
    links: list
    arrays: dict[str, torch.Tensor]
    chain_index: int = 0
    round_in_link: int = 0
    global_round: int = 0


class ChainServer:
    """Holds the base model, the chain state and the run's outputs."""

    def __init__(self, cfg: RunConfig, run_id: int, out_dir: Path):
        self.cfg = cfg
        self.run_id = run_id
        self.out_dir = out_dir
        self.task = build_task(cfg.task_config())
        self.heads = cfg.heads(self.task.modules_to_save)
        try:
            self.model = prepare(
                self.task.load_model(),
                cfg.method,
                cfg.targets(self.task.target_modules),
                kind=cfg.a_kind,
                seed=cfg.seed,
                rank=cfg.rank,
                alpha=cfg.alpha,
                heads=self.heads,
                frozen=cfg.frozen_factor,
            )
        except ValueError as err:
            raise RunConfigError(f"run-config: {err}") from None
        self.model.eval()
        self.state = ChainState(links=[], arrays=trainable_state(self.model))
        self.history: list[dict] = []
        self.strategy_state: dict = {}
        self.node_links: dict[int, int] = {}
        self.eval_set = self.task.eval_dataset(None) if cfg.central_eval else None
        if cfg.resume:
            self._restore()
        done = [h for h in self.history if h.get("round", 0) > 0 and not h.get("skipped")]
        self.privacy = PrivacyLedger(releases=len(done) if cfg.dp_clip > 0 else 0)

    # --- checkpoints -----------------------------------------------------------------
    def _restore(self) -> None:
        ckpt = checkpoint.load(self.out_dir)
        ours, theirs = self.cfg.model_dump(), ckpt.config
        changed = sorted(k for k in ours if k not in RESUMABLE_CHANGES and ours[k] != theirs.get(k))
        if changed:
            raise RunConfigError(f"resume: run-config differs from the checkpoint in {changed}")
        for link in ckpt.links:
            apply_link(self.model, link)
        set_chain_index(self.model, ckpt.chain_index)
        load_trainable_state(self.model, ckpt.arrays)
        self.state = ChainState(
            list(ckpt.links),
            dict(ckpt.arrays),
            ckpt.chain_index,
            ckpt.round_in_link,
            ckpt.global_round,
        )
        self.history = ckpt.history
        self.strategy_state = ckpt.strategy_state
        log(
            INFO,
            "resumed at link %d round %d (%d links merged, digest %s)",
            ckpt.chain_index,
            ckpt.round_in_link,
            len(ckpt.links),
            links_digest(ckpt.links)[:12],
        )

    def _checkpoint(self) -> None:
        s = self.state
        checkpoint.save(
            self.out_dir,
            checkpoint.Checkpoint(
                config=self.cfg.model_dump(),
                links=s.links,
                arrays=s.arrays,
                chain_index=s.chain_index,
                round_in_link=s.round_in_link,
                global_round=s.global_round,
                strategy_state=self.strategy_state,
                history=self.history,
            ),
        )

    # --- evaluation and reporting -----------------------------------------------------
    def central_eval(self) -> dict[str, float]:
        if self.eval_set is None:
            return {}
        load_trainable_state(self.model, self.state.arrays)
        device = torch.device("cpu")
        return self.task.evaluate(self.model, self.eval_set, self.cfg.eval_batch_size, device)

    def _write_outputs(self) -> None:
        document = {
            "config": self.cfg.to_flower(),
            "run_id": self.run_id,
            "links_digest": links_digest(self.state.links),
            "links_merged": len(self.state.links),
            "rounds": self.history,
            "exact_in_weight_space": self.cfg.strategy in EXACT_IN_WEIGHT_SPACE,
        }
        report.write_metrics(self.out_dir / "metrics.json", document)

    # --- the schedule ---------------------------------------------------------------
    def link_config(self) -> dict:
        cfg = self.cfg
        return {
            p.METHOD: cfg.method,
            p.A_KIND: cfg.a_kind,
            p.SEED: cfg.seed,
            p.RANK: cfg.rank,
            p.ALPHA: cfg.alpha,
            p.RUN_ID: self.run_id,
        }

    def _after_round(self, link: LinkStrategy, inner, server_round: int, arrays: ArrayRecord):
        """Flower's evaluate_fn hook: runs once before round 1 and after every round."""
        s = self.state
        if server_round == 0:
            if s.global_round == 0 and not self.history:
                entry = {"round": 0, "link": 0, "central": self.central_eval()}
                self.history.append(entry)
                log(INFO, "base model | central %s", entry["central"])
            return None
        s.arrays = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        s.round_in_link += 1
        s.global_round += 1
        ledger = link.ledgers.get(s.global_round)
        central = self.central_eval()
        entry = {
            "round": s.global_round,
            "link": s.chain_index,
            "round_in_link": s.round_in_link,
            "rounds_per_link": self.cfg.rounds_per_link,
            "train_loss": ledger.train_metrics.get(p.TRAIN_LOSS),
            "train_metrics": ledger.train_metrics,
            "client_eval": ledger.eval_metrics,
            "central": central,
            "sent": ledger.sent,
            "accepted": ledger.accepted,
            "rejected": [{"node": r.node_id, "reason": r.reason} for r in ledger.rejected],
            "skipped": ledger.skipped,
            "lost": ledger.lost,
            "outliers": ledger.outliers,
            "bytes_up": ledger.bytes_up,
            "bytes_down": ledger.bytes_down,
            "bytes_up_per_client": ledger.bytes_up / max(ledger.accepted, 1),
            "wall_time": time.perf_counter() - self._round_start,
        }
        self._round_start = time.perf_counter()
        self.history.append(entry)
        if ledger.updates:
            self._save_updates(s.global_round, ledger.updates)
        self.strategy_state = {
            a: getattr(inner, a) for a in STATE_ATTRIBUTES if getattr(inner, a, None) is not None
        }
        log(INFO, report.round_line(entry))
        self._write_outputs()
        self._checkpoint()
        return MetricRecord({k: float(v) for k, v in central.items()})

    def _save_updates(self, global_round: int, updates: list) -> None:
        """The accepted client states of a round, so anyone can re-check the average."""
        tensors = {f"{part}/{k}": v for part, _, state in updates for k, v in state.items()}
        meta = {"weights": {str(part): n for part, n, _ in updates}, "round": global_round}
        path = self.out_dir / "client-updates" / f"round-{global_round:04d}.safetensors"
        atomic_write_bytes(path, state_to_bytes(tensors, meta))

    def close_link(self) -> None:
        """Merge the link's averaged B into the base, record it, advance A, reset B.

        fedit and full have no link to merge: their state stays in the arrays."""
        s = self.state
        load_trainable_state(self.model, s.arrays)
        if self.cfg.method not in B_ONLY:
            s.chain_index += 1
            s.round_in_link = 0
            self._write_outputs()
            self._checkpoint()
            return
        link = record_link(self.model)
        apply_link(self.model, link)
        set_chain_index(self.model, s.chain_index + 1)
        s.links.append(link)
        s.chain_index += 1
        s.round_in_link = 0
        s.arrays = trainable_state(self.model)
        self.strategy_state = {}
        log(INFO, "link %d merged | links digest %s", link.chain_index, links_digest(s.links)[:12])
        self._write_outputs()
        self._checkpoint()

    def run(self, grid: Grid) -> None:
        cfg, s = self.cfg, self.state
        self._round_start = time.perf_counter()
        num_links, rounds_per_link = cfg.schedule
        while s.chain_index < num_links:
            inner = privacy.wrap(
                build_strategy(cfg), cfg, len(list(grid.get_node_ids())), self.privacy
            )
            for attr, value in self.strategy_state.items():
                setattr(inner, attr, value)
            ctx = LinkContext(
                run_id=self.run_id,
                chain_index=s.chain_index,
                links=list(s.links),
                link_config=self.link_config(),
                round_offset=s.global_round,
                rounds_done=s.round_in_link,
                min_replies=cfg.min_replies,
                max_num_examples=cfg.max_num_examples,
                node_links=self.node_links,
                keep_updates=cfg.save_client_updates,
                outlier_mad=cfg.outlier_mad,
                outlier_action=cfg.outlier_action,
                client_ranks=bool(cfg.client_ranks),
                upload_codec=cfg.upload_codec,
            )
            link = LinkStrategy(inner, ctx)
            remaining = rounds_per_link - s.round_in_link
            if remaining > 0:
                link.start(
                    grid,
                    ArrayRecord(s.arrays),
                    num_rounds=remaining,
                    timeout=cfg.round_timeout,
                    train_config=ConfigRecord({"lr": cfg.lr, "local-steps": cfg.local_steps}),
                    evaluate_config=ConfigRecord(),
                    evaluate_fn=lambda rnd, arr, _l=link, _i=inner: self._after_round(
                        _l, _i, rnd, arr
                    ),
                )
            self.close_link()
        self.finish()

    def finish(self) -> None:
        """Final summary, plot and exports (PEFT adapter of rank k*r, merged HF model)."""
        rounds = [h for h in self.history if h.get("central")]
        if len(rounds) >= 2:
            first, last = rounds[0]["central"], rounds[-1]["central"]
            log(INFO, "central eval: base %s -> final %s", first, last)
        self._write_outputs()
        report.plot_history(self.out_dir / "metrics.png", self.history, self.cfg.schedule[1])
        if self.cfg.export:
            self._export()

    def _export(self) -> None:
        tokenizer = getattr(self.task, "tokenizer", None)
        if self.cfg.method == "fedit":  # already a PEFT model
            atomic_dir(self.out_dir / "peft-adapter", self.model.save_pretrained)
            merged = copy.deepcopy(self.model).merge_and_unload()
            export_merged(merged, self.out_dir / "merged-model", tokenizer=tokenizer)
            return
        if self.cfg.method == "full":
            export_merged(self.model, self.out_dir / "merged-model", tokenizer=tokenizer)
            return
        factors = ("lora_B", "lora_A")  # the trained factor of either role
        heads = {k: v for k, v in self.state.arrays.items() if not k.endswith(factors)}
        try:
            export_peft(
                self.task.load_model(),
                self.state.links,
                self.out_dir / "peft-adapter",
                heads=heads,
                base_model_name_or_path=self.cfg.model_name,
            )
        except ValueError as err:
            log(WARNING, "PEFT export skipped: %s", err)
        export_merged(self.model, self.out_dir / "merged-model", tokenizer=tokenizer)
        log(INFO, "exports written to %s", self.out_dir)
