"""The server's side of the chain: the global model, its ChainState and the run's outputs.

`run_chain` is the whole schedule, `num-links x rounds-per-link` rounds:

    for each link:                       (a fresh strategy: B-space state resets)
        for each round:  configure -> send/receive -> aggregate    (a LinkRunner's round)
                         -> commit_round                           (eval, metrics, checkpoint)
        close_link                       (merge s B_bar A_c, next A, B = 0)

A `LinkRunner` (server/rounds.py: Flower's message-API strategies; server/secure.py:
SecAgg+) does the rounds' communication; `ChainServer` does everything that is the
same whatever the runner: the state, central evaluation, metrics.json, checkpoints,
merges and exports.

What a round writes does not grow with the chain: its entry appended to rounds.jsonl and
the checkpoint (B, heads, strategy state, counters; server/checkpoint.py). A link close
adds one file to the link log (links/) and rewrites metrics.json (server/report.py).
"""

from __future__ import annotations

import copy
import gc
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Protocol

import datasets
import torch
from flwr.common.logger import log

from contract import protocol as p
from contract.config import RunConfig, RunConfigError
from runtime.devices import autocast, check_device, pick_device, place
from seedlora import (
    apply_link,
    atomic_dir,
    close_link,
    export_merged,
    export_peft,
    load_trainable_state,
    prepare,
    set_chain_index,
    trainable_state,
    unwrap,
)
from seedlora.export import peft_task_type
from seedlora.methods import LINKED
from seedlora.roles import is_factor_key
from seedlora.serialize import atomic_write_bytes, state_to_bytes
from seedlora.sharing import own_trainable, shared_copy
from seedlora.spec import A_RULE, SCALE_RULE, ARuleError, check_a_rule
from strategies.privacy import PrivacyLedger
from strategies.registry import EXACT_IN_WEIGHT_SPACE
from tasks import build_task, portable_name
from tasks.corpus import SPLIT_SEED
from tasks.partitioning import cap, held_out_half, stratified_cap

from . import checkpoint, report, tracking
from .outcome import STOPPED_BUDGET, EmptyRunRule, RunFailed, budget_reached, run_mb
from .schedule import round_lr
from .state import ChainState, RoundResult

# RNG key of the central-eval-max subset (tasks.partitioning.cap_key never makes it).
CENTRAL_SUBSET_KEY = (SPLIT_SEED, 0, 1)
# RNG key of the central-eval-split halves (likewise never a cap_key).
CENTRAL_HALF_KEY = (SPLIT_SEED, 0, 2)
# What to do with a checkpoint made under another A rule (seedlora.spec.check_a_rule).
RESUME = "start a fresh run (another run-name), or resume it with the seedlora that made it"

# Config keys that may change when a run is resumed; all others must match the checkpoint.
RESUMABLE_CHANGES = {
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


def central_set(task, cfg: RunConfig):
    """The central evaluation set: the task's held-out set (capped by max-eval-blocks),
    or with `central-eval-split` one fixed seeded half of it (validation or test, the two
    disjoint), then with `central-eval-max` a fixed seeded subset of that many examples,
    the same in every run (as the central set is); stratified by label when labels are
    classes."""
    data = task.eval_dataset(None)
    classes = isinstance(data.features.get("labels"), datasets.Value)  # one class per row
    if cfg.output.central_eval_split != "all":
        column = "labels" if classes else None
        data = _plain(
            data,
            lambda d: held_out_half(d, cfg.output.central_eval_split, column, CENTRAL_HALF_KEY),
        )
    limit = cfg.output.central_eval_max
    if not limit or len(data) <= limit:
        return data
    if not classes:
        return cap(data, limit, CENTRAL_SUBSET_KEY)
    return _plain(data, lambda d: stratified_cap(d, limit, "labels", CENTRAL_SUBSET_KEY))


def _plain(data: datasets.Dataset, pick) -> datasets.Dataset:
    """`pick(data)` run on the rows without their torch format (so it reads plain values),
    the format put back on what it returns."""
    fmt = data.format
    picked = pick(data.with_format(None))
    return picked.with_format(
        fmt["type"],
        columns=fmt["columns"],
        output_all_columns=fmt["output_all_columns"],
        **fmt["format_kwargs"],
    )


class OpenLink(Protocol):
    def run_round(self, link_round: int, arrays: dict[str, torch.Tensor]) -> RoundResult:
        """Round `link_round` (from 1) of the open link, from the global `arrays`."""
        ...


class LinkRunner(Protocol):
    """How rounds reach the clients: opens one link at a time for the chain loop."""

    def open_link(self, server: ChainServer) -> OpenLink: ...


def run_chain(server: ChainServer, runner: LinkRunner) -> None:
    """The run, from wherever its ChainState stands (round 0, or a resumed checkpoint).

    `EmptyRunRule` (server/outcome.py) raises RunFailed when the first round, or a whole
    link, accepts no client update. Once `comm-budget-mb` is spent no round starts, and
    the open link is merged with the rounds it has (outcome.py, rule (c))."""
    server.begin()
    num_links, rounds = server.cfg.schedule
    state = server.state
    rule = EmptyRunRule(state, server.cfg.strategy.round_timeout)
    while state.chain_index < num_links and (state.round_in_link or not server.over_budget()):
        link = runner.open_link(server)
        while state.round_in_link < rounds and not server.over_budget():
            result = link.run_round(state.round_in_link + 1, state.arrays)
            rule.round(result, state)
            server.commit_round(result)
        if state.round_in_link < rounds and not rule.in_link:
            break  # over budget, and this link's rounds so far have nothing to merge
        try:
            rule.link(state)
        except RunFailed:
            server.write_metrics()  # the failed link's rounds, for the reader of metrics.json
            raise
        server.close_link()
    server.finish()


class ChainServer:
    """Holds the base model (W0 + merged links, with link c's adapters), the ChainState
    and the run's outputs."""

    def __init__(self, cfg: RunConfig, run_id: int, out_dir: Path):
        self.cfg = cfg
        self.run_id = run_id
        self.out_dir = out_dir
        self.task = build_task(cfg.task_config())
        a = cfg.adapter
        try:
            self.model = prepare(
                self.task.load_model(cache=False),  # the process's one float32 master
                a.method,
                a.targets(self.task.target_modules),
                kind=a.kind,
                seed=a.seed,
                rank=a.rank,
                alpha=a.alpha,
                heads=a.heads(self.task.modules_to_save),
                frozen=a.frozen_factor,
            )
        except ValueError as err:
            raise RunConfigError(f"run-config: {err}") from None
        self.model.eval()
        self.state = ChainState(cfg.to_flower(), links=[], arrays=trainable_state(self.model))
        log(INFO, report.adapter_summary(self.model, a.method, self.state.arrays, cfg.upload))
        self.rounds_path = out_dir / report.ROUNDS
        self.node_links: dict[int, int] = {}  # node id -> merged links it is known to hold
        self.eval_set = central_set(self.task, cfg) if cfg.output.central_eval else None
        self.eval_device = self._eval_device() if self.eval_set is not None else None
        self._replica: torch.nn.Module | None = None  # the model on eval_device (see eval_model)
        self._replica_key: tuple[int, int] | None = None
        self.replica_builds = 0
        if cfg.output.resume:
            self._restore()
        done = [h for h in self.state.history if h.get("round", 0) > 0 and not h.get("skipped")]
        self.privacy = PrivacyLedger(releases=len(done) if cfg.privacy.dp_clip > 0 else 0)
        self.stopped: str | None = None  # why the run ended before its last round
        self.scalars: tracking.RoundScalars | None = None  # opened by begin()
        self._round_start = time.perf_counter()

    # --- checkpoints -----------------------------------------------------------------
    def _restore(self) -> None:
        try:  # a checkpoint or link made under another A rule derives other A's
            ckpt = checkpoint.load(self.out_dir)
            check_a_rule(ckpt.a_rule, [self.cfg.adapter.kind], "this run's checkpoint", RESUME)
        except ARuleError as err:
            raise RunConfigError(f"resume: {err}") from None
        ckpt.a_rule = A_RULE  # circulant: no A drawn, the same links under either rule
        ours, theirs = self.state.config, ckpt.config
        changed = sorted(k for k in ours if k not in RESUMABLE_CHANGES and ours[k] != theirs.get(k))
        if changed:
            raise RunConfigError(f"resume: run-config differs from the checkpoint in {changed}")
        if ckpt.scale != SCALE_RULE and self.cfg.adapter.kind == "gaussian":
            raise RunConfigError(
                "resume: this run's links were merged under another adapter scale "
                f"({ckpt.scale or 'alpha/r, before the gaussian gain'}; now {SCALE_RULE}), "
                "so they would rebuild to another base; start a fresh run (another run-name)"
            )
        ckpt.scale = SCALE_RULE  # block kinds: gain 1, the same links under either rule
        for link in ckpt.links:
            apply_link(self.model, link)
        set_chain_index(self.model, ckpt.chain_index)
        load_trainable_state(self.model, ckpt.arrays)
        ckpt.config = ours
        # The rounds the checkpoint covers: a round logged after it is run again.
        history = ckpt.history or report.read_rounds(self.rounds_path)
        ckpt.history = [h for h in history if h.get("round", 0) <= ckpt.global_round]
        report.write_rounds(self.rounds_path, ckpt.history)
        checkpoint.discard_links_from(self.out_dir, len(ckpt.links))
        self.state = ckpt
        log(
            INFO,
            "resumed at link %d round %d (%d links merged, digest %s)",
            ckpt.chain_index,
            ckpt.round_in_link,
            len(ckpt.links),
            ckpt.links.digest[:12],
        )

    def write_metrics(self, progress: bool = False) -> None:
        """metrics.json, the run's document for people: at start, the end, and when a run
        fails, with every round; at a link close (`progress`) with that link's rounds only
        and a pointer to rounds.jsonl, so a link close writes the same bytes at link 256 as
        at link 2 (the whole history was 580 kB at 256 links)."""
        s = self.state
        document = {
            "config": s.config,
            "run_id": self.run_id,
            "links_digest": s.links.digest,
            "links_merged": len(s.links),
            "rounds": s.history,
            "exact_in_weight_space": self.cfg.strategy.name in EXACT_IN_WEIGHT_SPACE,
            "stopped": self.stopped,
        }
        if progress:
            del document["rounds"]
        else:
            document["refused_nodes"] = report.refused_nodes(s.history)
        if progress:
            document |= {
                "in_progress": True,
                "rounds_file": report.ROUNDS,
                "rounds_so_far": len(s.history),
                "recent_rounds": s.history[-self.cfg.chain.rounds_per_link :],
            }
        report.write_metrics(self.out_dir / "metrics.json", document)

    # --- the steps of run_chain --------------------------------------------------------
    def _eval_device(self) -> torch.device:
        """`server-device` resolved and checked (auto: the first visible GPU, else the CPU);
        logged once, with a warning when a visible GPU is left idle."""
        name = self.cfg.output.server_device
        try:
            device = check_device(pick_device(name))
        except ValueError as err:
            raise RunConfigError(f"run-config key 'server-device': {err}") from None
        precision = self.cfg.train.precision
        n = len(self.eval_set)
        log(INFO, "central evaluation on %s (%s, %d examples)", device, precision, n)
        if device.type == "cpu" and torch.cuda.is_available():
            log(WARNING, "central evaluation on the CPU although a GPU is visible (%s)", name)
        return device

    def eval_model(self) -> torch.nn.Module:
        """The global model (base + links + global B) on the eval device, in the run's
        precision.

        On the CPU in fp32 that is the float32 master itself. Otherwise it is a replica:
        the master placed (frozen weights cast to bf16/fp16 as on the clients, from a
        `shared_copy`: no second float32 copy on the host) once per link, since only merges
        change the base, with the round's trainable state copied in each time. The master
        stays on the CPU in float32 for merges (in place) and exports.
        """
        device, precision = self.eval_device, self.cfg.train.precision
        if device.type == "cpu" and precision == "fp32":
            load_trainable_state(self.model, self.state.arrays)
            return self.model
        key = (self.state.chain_index, len(self.state.links))
        if key != self._replica_key:
            self._replica = self._replica_key = None  # free the old replica first
            gc.collect()  # its adapters are reference cycles (seedlora.grouped)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            replica = own_trainable(shared_copy(self.model))
            self._replica = place(replica, device, precision).eval()
            self._replica_key = key
            self.replica_builds += 1
        load_trainable_state(self._replica, self.state.arrays)
        return self._replica

    def central_eval(self) -> dict[str, float]:
        """Central evaluation of the global state on `server-device` (see eval_model)."""
        if self.eval_set is None:
            return {}
        model, device = self.eval_model(), self.eval_device
        with autocast(device, self.cfg.train.precision):
            metrics = self.task.evaluate(
                model, self.eval_set, self.cfg.train.eval_batch_size, device
            )
        if device.type == "cuda":
            torch.cuda.empty_cache()  # activations: clients may share this GPU
        return metrics

    def round_lr(self, global_round: int) -> float:
        """The clients' lr in global round `global_round` (server/schedule.py)."""
        return round_lr(self.cfg.train, global_round, self.cfg.num_rounds)

    def over_budget(self) -> bool:
        """Whether the run's traffic so far has reached `comm-budget-mb` (0: never)."""
        return budget_reached(self.state.history, self.cfg.chain.comm_budget_mb)

    def link_config(self) -> dict:
        """The A-spec fields every client of this link needs (the chain index is added per
        message by strategies/)."""
        a = self.cfg.adapter
        return {
            p.METHOD: a.method,
            p.A_KIND: a.kind,
            p.SEED: a.seed,
            p.RANK: a.rank,
            p.ALPHA: a.alpha,
            p.RUN_ID: self.run_id,
        }

    def begin(self) -> None:
        """Evaluate the base model once, as round 0 of a fresh run (which first clears what
        an earlier run left in the same directory: checkpoints, link log, rounds.jsonl)."""
        s = self.state
        fresh = s.global_round == 0 and not s.history
        resumed_at = None if fresh else s.global_round
        self.scalars = tracking.RoundScalars(self.out_dir, self.cfg.output.tensorboard, resumed_at)
        if fresh:
            checkpoint.clear(self.out_dir)
            s.history.append({"round": 0, "link": 0, "central": self.central_eval()})
            report.write_rounds(self.rounds_path, s.history)
            self.scalars.write(s.history[0])
            log(INFO, "base model | central %s", s.history[0]["central"])
        self.write_metrics()
        self._round_start = time.perf_counter()

    def commit_round(self, result: RoundResult) -> None:
        """Take a round's global state: count it, evaluate, log, append its entry to
        rounds.jsonl, checkpoint."""
        s = self.state
        s.arrays = {k: v.clone() for k, v in result.arrays.items()}
        s.round_in_link += result.rounds
        s.global_round += result.rounds
        s.strategy_state = result.strategy_state
        entry = {
            "round": s.global_round,
            "link": s.chain_index,
            "lr": self.round_lr(s.global_round),
        }
        if result.ledger is None:  # SecAgg+: no single reply is visible
            entry["secure"] = True
        else:
            entry.update(self._ledger_entry(result))
        evaluated = time.perf_counter()
        entry["central"] = self.central_eval()
        central = time.perf_counter() - evaluated
        entry["wall_time"] = time.perf_counter() - self._round_start
        entry["phases"] = {**result.phases, "central_eval": central}
        self._round_start = time.perf_counter()
        s.history.append(entry)
        if result.ledger is not None and result.ledger.updates:
            self._save_updates(s.global_round, result.ledger.updates)
        if result.ledger is None:
            log(INFO, "secure link %d | central %s", s.chain_index, entry["central"])
        else:
            log(INFO, report.round_line(entry))
        report.append_round(self.rounds_path, entry)
        checkpoint.save(self.out_dir, s)
        if self.scalars is not None:
            self.scalars.write(entry)

    def _ledger_entry(self, result: RoundResult) -> dict:
        ledger = result.ledger
        return {
            "round_in_link": self.state.round_in_link,
            "num_links": self.cfg.schedule[0],
            "rounds_per_link": self.cfg.schedule[1],  # the run's rounds for one-link methods
            "train_loss": ledger.train_metrics.get(p.TRAIN_LOSS),
            "train_metrics": ledger.train_metrics,
            "client_eval": ledger.eval_metrics,
            "client_eval_model": ledger.eval_of,  # global round of the model evaluated
            "sent": ledger.sent,
            "accepted": ledger.accepted,
            "rejected": [{"node": r.node_id, "reason": r.reason} for r in ledger.rejected],
            "skipped": ledger.skipped,
            "lost": ledger.lost,
            "refused": ledger.refused,
            "outliers": ledger.outliers,
            "bytes_up": ledger.bytes_up,
            "bytes_down": ledger.bytes_down,
            "bytes_up_per_client": ledger.bytes_up / max(ledger.accepted, 1),
            **report.running_totals(self.state.history, ledger.bytes_up, ledger.bytes_down),
        }

    def _save_updates(self, global_round: int, updates: list) -> None:
        """The accepted client states of a round, so anyone can re-check the average."""
        tensors = {f"{part}/{k}": v for part, _, state in updates for k, v in state.items()}
        meta = {"weights": {str(part): n for part, n, _ in updates}, "round": global_round}
        path = self.out_dir / "client-updates" / f"round-{global_round:04d}.safetensors"
        atomic_write_bytes(path, state_to_bytes(tensors, meta))

    def close_link(self) -> None:
        """Merge the link's averaged B into the base, record it, advance A, reset B; then
        the checkpoint (which adds the link to the log first) and metrics.json.

        fedit and full have no link to merge: their state stays in the arrays."""
        s = self.state
        load_trainable_state(self.model, s.arrays)
        s.chain_index += 1
        s.round_in_link = 0
        if self.cfg.adapter.method in LINKED:
            link = close_link(self.model)  # record, merge, next A with B = 0
            digest = s.links.append(link)
            s.arrays = trainable_state(self.model)
            s.strategy_state = {}
            log(INFO, "link %d merged | links digest %s", link.chain_index, digest[:12])
        checkpoint.save(self.out_dir, s)
        self.write_metrics(progress=True)

    def finish(self) -> None:
        """Final summary, plot, generated samples (a generative task) and exports (PEFT adapter
        of rank k*r, merged HF model)."""
        history = self.state.history
        rounds = [h for h in history if h.get("central")]
        if len(rounds) >= 2:
            first, last = rounds[0]["central"], rounds[-1]["central"]
            log(INFO, "central eval: base %s -> final %s", first, last)
        for r in report.refused_nodes(history):
            log(
                WARNING,
                "node %s: every reply of link %d rejected (%d): %s",
                r["node"],
                r["link"],
                r["replies"],
                r["reason"],
            )
        if self.over_budget() and self.state.global_round < self.cfg.num_rounds:
            self.stopped = STOPPED_BUDGET
            up, down = run_mb(history)
            log(
                INFO,
                "communication budget reached: %.3f MB up + %.3f MB down >= comm-budget-mb %g; "
                "the run stopped after round %d of %d (links merged: %d)",
                up,
                down,
                self.cfg.chain.comm_budget_mb,
                self.state.global_round,
                self.cfg.num_rounds,
                len(self.state.links),
            )
        self.write_metrics()
        if self.scalars is not None:
            self.scalars.close()
        report.plot_history(self.out_dir / "metrics.png", history, self.cfg.schedule[1])
        if self.task.sample_count:
            self._write_samples()
        if self.cfg.output.export:
            self._export()

    def _write_samples(self) -> None:
        """The final model's completions of a few held-out prompts (the task's `samples`),
        as samples.jsonl beside metrics.json, on the evaluation device (else the CPU)."""
        if self.eval_device is None:  # no central evaluation: the float32 master
            load_trainable_state(self.model, self.state.arrays)
            model, device = self.model, torch.device("cpu")
        else:
            model, device = self.eval_model(), self.eval_device
        with autocast(device, self.cfg.train.precision):
            rows = self.task.samples(model, device)
        path = report.write_jsonl(self.out_dir / report.SAMPLES, rows)
        log(INFO, "%d generated samples written to %s", len(rows), path)

    def _export(self) -> None:
        tokenizer = self.task.load_tokenizer()  # merged-model/ loads with its tokenizer
        base_name = portable_name(self.cfg.task.model_name)  # not this machine's path
        method = self.cfg.adapter.method
        if method == "fedit":  # already a PEFT model
            config = self.model.peft_config["default"]
            config.base_model_name_or_path = base_name
            config.task_type = config.task_type or peft_task_type(self.model.get_base_model())
            atomic_dir(self.out_dir / "peft-adapter", self.model.save_pretrained)
            merged = copy.deepcopy(self.model).merge_and_unload()
            export_merged(merged, self.out_dir / "merged-model", tokenizer=tokenizer)
            return
        if method == "full":
            export_merged(self.model, self.out_dir / "merged-model", tokenizer=tokenizer)
            return
        heads = {k: v for k, v in self.state.arrays.items() if not is_factor_key(k)}
        try:
            export_peft(  # the master's modules (unwrapped) stand in for W0's: only the
                unwrap(shared_copy(self.model)),  # adapter and heads are written
                self.state.links,
                self.out_dir / "peft-adapter",
                heads=heads,
                base_model_name_or_path=base_name,
            )
        except ValueError as err:
            log(WARNING, "PEFT export skipped: %s", err)
        export_merged(self.model, self.out_dir / "merged-model", tokenizer=tokenizer)
        log(INFO, "exports written to %s", self.out_dir)
