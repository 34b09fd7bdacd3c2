"""What a client process keeps between messages: the link's adapted base, on its device.

Every client of a link trains against the same frozen base (W0 plus the merged links, with
link c's adapters), so a process that serves several clients (a Ray actor, a SuperNode's
ClientApp process) keeps one model resident: the float32 CPU master (client.links.BaseCache,
mapped from the host's master file, one copy for all processes of the host) shared, not
copied (`seedlora.sharing.shared_copy`), adapted (`seedlora.prepare`), given gradient
checkpointing if the run asks, and placed on the device in the run's precision
(`runtime.devices.place`: the frozen base is the cast of the float32 rebuilt base, exactly as
a fresh build). Frozen weights that stay on the CPU (fp32 on the CPU) are the mapped pages
themselves: nothing writes to them, since training steps only trainable parameters, which
get storage of their own (`own_trainable`), and a client that changes frozen weights
trains a `private_copy`. On a GPU the master is only the source of the device copy.
Between clients only the trainable state (B and heads) is swapped in
(`seedlora.load_trainable_state`); optimizer state and activations live for one call, and
gradients are dropped after it, except that step-mode graphed keeps its CUDA graph and
AdamW with the model until the model goes (client/local.py).

The model is rebuilt only when what defines it changes, its `ModelKey`: the task (what the
base is), the links digest, method, A kind/seed/rank/alpha, chain index, targets, heads,
frozen factor, dropout, precision, device and gradient checkpointing. A new links digest
maps (or, first on the host, writes) the master of that digest and makes one copy to the
device; the old device model is freed before the new one is built, so a process holds one
model on its device at a time.
A client whose model changes shape (heterogeneous ranks: client.uploads.fit_rank) trains
a `private_copy`, so nothing it does reaches the next client.

A quantized run (`quantization` 8bit/4bit) has no master: `load` gives the quantized W0
on the device once, and the merged links stay beside it as each adapter's frozen side path
(seedlora/sidepath.py): `W_eff = Q(W0) + sum_j s_j B_j A_j` (s_j = `spec.scaling(alpha)`).
W0 never changes, so a new key (a new link, another A) unwraps the old adapters and
injects new ones on the same quantized layers, with the links list applied as side paths:
the quantized base is loaded once per (task, quantization, device) and never copied.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from runtime.devices import place
from runtime.kernels import use_liger
from seedlora import CHAINED, Link, adapter_layers, apply_link, prepare, unwrap
from seedlora.capture import forget
from seedlora.injection import keep_links_aside
from seedlora.sharing import own_trainable, shared_copy
from tasks import TaskConfig

from .links import BaseCache, BaseSource, checked_links


@dataclass(frozen=True)
class ModelKey:
    """Everything that defines a client's model except its trainable state."""

    task: TaskConfig  # what `task.load_model()` gives, and the task's default targets
    links: str  # the links digest: which merged base
    method: str
    kind: str
    seed: int
    rank: int
    alpha: float
    chain_index: int  # the A of this link (0 for methods without chains)
    targets: str | tuple[str, ...]
    heads: tuple[str, ...]
    frozen: str
    dropout: float
    precision: str
    device: str
    checkpointing: bool
    quantization: str = "none"  # 8bit/4bit: a quantized W0, links as side paths
    kernels: str = "torch"  # the frozen base's RMSNorm/MLP kernels (runtime.kernels)

    @property
    def aside(self) -> bool:
        """Whether links stay beside the base (a quantized W0) instead of merged into it."""
        return self.quantization != "none"

    def frozen_base(self) -> tuple:
        """What the quantized W0 depends on: it is reused while this stays the same."""
        return (self.task, self.quantization, self.device)

    def prepare(self, model: nn.Module) -> nn.Module:
        """`seedlora.prepare` of `model` as this key says."""
        targets = self.targets if isinstance(self.targets, str) else list(self.targets)
        return prepare(
            model,
            self.method,
            targets,
            kind=self.kind,
            seed=self.seed,
            rank=self.rank,
            alpha=self.alpha,
            chain_index=self.chain_index,
            dropout=self.dropout,
            heads=list(self.heads),
            frozen=self.frozen,
        )


def enable_checkpointing(model: nn.Module) -> None:
    """Hugging Face gradient checkpointing, non-reentrant (B-only inputs need no grad)."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(f"gradient-checkpointing: {type(model).__name__} does not support it")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def private_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` that a client may change in shape or in its frozen weights.

    The adapters (their base layers included: `fit_rank` folds B's tail into them), all
    trainable parameters and buffers are copied; every other frozen parameter (embeddings,
    norms, layers without adapters) is shared, since nothing changes it.
    """
    own = {
        id(t)
        for _, layer in adapter_layers(model)
        for t in itertools.chain(layer.parameters(), layer.buffers())
    }
    memo: dict[int, object] = {
        id(q): q for q in model.parameters() if not q.requires_grad and id(q) not in own
    }
    return copy.deepcopy(model, memo)


def _free_device_memory() -> None:
    """Hand a dropped model's GPU memory back before the next is built (on the CPU a gc
    pass, ~0.5 s, runs only when the master changes: `ResidentModel._build`)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


class ResidentModel:
    """One process's resident model (see the module docstring); use it through `use`.

    `builds` counts device models built (rebuilds), `bases` is the float32 CPU master.
    Calls are serialised by a lock: one client at a time trains on the resident model.
    """

    def __init__(self) -> None:
        self.bases = BaseCache()
        self.builds = 0
        self.frozen_loads = 0  # quantized W0 loaded (side-path mode)
        self._key: ModelKey | None = None
        self._model: nn.Module | None = None
        self._lock = threading.RLock()

    @property
    def key(self) -> ModelKey | None:
        return self._key

    def clear(self) -> None:
        """Forget the device model and the master (the next `use` builds from W0)."""
        with self._lock:
            if self._model is not None:
                forget(self._model)  # its kept CUDA graph (client.local), if any
            self._model = self._key = None
            self.bases.clear()
            _free_device_memory()

    @contextlib.contextmanager
    def use(
        self,
        key: ModelKey,
        links: Callable[[], Sequence[Link]],
        load: Callable[[], nn.Module] | BaseSource,
        cache_dir: str | os.PathLike,
    ) -> Iterator[nn.Module]:
        """The resident model for `key`, built first if the key changed.

        `links()` (the full links list named by `key.links`) and `load` (the float32 CPU
        W0's source; for a quantized key a loader of the quantized W0 on the device) are
        called only when the master (the quantized W0) must change and the host's master
        file in `cache_dir` (the node's cache folder) does not exist. The
        caller loads the trainable state; afterwards gradients are dropped and the model is
        back in eval mode.
        """
        with self._lock:
            if key != self._key:
                self._build(key, links, load, cache_dir)
            model = self._model
            assert model is not None
            try:
                yield model
            finally:
                model.zero_grad(set_to_none=True)
                model.eval()

    def _build(
        self,
        key: ModelKey,
        links: Callable[[], Sequence[Link]],
        load: Callable[[], nn.Module] | BaseSource,
        cache_dir: str | os.PathLike,
    ) -> None:
        if key.aside:
            self._build_aside(key, links, BaseSource.of(load).load)
            return
        if self._model is not None:  # free the old device model before building the new one
            forget(self._model)
            self._model = self._key = None
            _free_device_memory()
        before = self.bases.path
        master = self.bases.get(key.task, key.links, links, load, cache_dir)
        if before not in (None, self.bases.path):
            # The old model's adapters are reference cycles (seedlora.grouped's sibling
            # groups): without a gc pass they kept the old master's pages mapped.
            gc.collect()
        model = own_trainable(key.prepare(shared_copy(master)))
        _finish(model, key)
        model = place(model, torch.device(key.device), key.precision)
        model.eval()
        self._model, self._key = model, key
        self.builds += 1

    def _build_aside(
        self,
        key: ModelKey,
        links: Callable[[], Sequence[Link]],
        load: Callable[[], nn.Module],
    ) -> None:
        """The side-path model of `key` on the (reused) quantized W0 (module docstring)."""
        wanted = checked_links(links, key.links)
        old, old_key = self._model, self._key
        self._model = self._key = None
        if old is not None:  # unwrap may give the same object back: no stale graph on it
            forget(old)
        base = None
        reusable = old_key is not None and old_key.aside
        if old is not None and reusable and old_key.frozen_base() == key.frozen_base():
            base = unwrap(old)  # the same quantized layers, adapters and side paths gone
        del old
        if base is None:
            self.bases.clear()  # no float master in side-path mode
            _free_device_memory()
            base = load()
            self.frozen_loads += 1
        model = key.prepare(base)
        keep_links_aside(model)
        for link in wanted:
            apply_link(model, link)
        for param in model.parameters():  # B is float32 already; heads become float32 masters
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        _finish(model, key)
        model.eval()
        self._model, self._key = model, key
        self.builds += 1


def _finish(model: nn.Module, key: ModelKey) -> None:
    """What the key asks of a built model besides its adapters: checkpointing, kernels."""
    if key.checkpointing:
        enable_checkpointing(model)
    if key.kernels == "liger":
        use_liger(model)


def effective_chain_index(method: str, chain_index: int) -> int:
    """The chain index `prepare` uses: methods without chains keep link 0's A."""
    return chain_index if method in CHAINED else 0
