"""The client's copy of the chain: links cached on disk, rebuilt bases mapped from disk.

A client that restarts or joins late catches up from the links the server sends plus
what it cached before; an up-to-date client is sent no links at all. The cache is keyed
by the base model and the links digest, so clients of different runs or bases never
mix, and a digest mismatch is an error, never a silent wrong base.

On disk, `LinkCache` keeps one file per link: `root/<base key>/links/<digest>.safetensors`
holds the link at position k of a chain and the digest of the k links before it
(seedlora.serialize `link_to_bytes`), named by the chained digest through it. So a chain is
found by walking back from its digest, catching up writes only the links a node lacked
(the cache grows by one file per link), and a file that is damaged or does not hash to its
name is removed and counts as a miss. In memory, the chain a cache directory last
resolved is kept for the process (the Chain knows its digests), so a round whose digest
is known, or that extends it, reads no file and hashes only the links it receives; the
trainer (client/trainer.py) owns that memory and hands it to each LinkCache it makes.

The rebuilt base (W0 plus the links) is `BaseCache`'s float32 master, one file per links
digest in the same cache directory, mapped by every process of the host (client/masters.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord
from torch import nn

from contract import protocol as p
from seedlora.chain import EMPTY_DIGEST, Chain, Link
from seedlora.mapped import fill, write_merged
from seedlora.serialize import (
    CorruptFileError,
    atomic_write_bytes,
    link_from_bytes,
    link_to_bytes,
    links_from_bytes,
)

from .masters import Mapped, MasterStore

CACHE_ENV = "SEEDLORA_CACHE"  # the user's default cache folder (read once, where apps are built)


def default_cache_dir() -> Path:
    """The cache folder a node uses when it is given none: $SEEDLORA_CACHE, else
    ~/.cache/seedlora. Read by the composition root (client/compose.py) only."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "seedlora"))


class LinkCache:
    """Links on disk under `root/<base key>/links/<digest>.safetensors`, one per file.

    `memory` maps a cache directory to the chain it last resolved: the trainer's, shared
    by the LinkCache objects it makes (one per message); None or {} sees the disk alone."""

    def __init__(
        self,
        root: str | os.PathLike,
        base_name: str,
        memory: dict[Path, Chain] | None = None,
    ):
        key = hashlib.sha256(base_name.encode()).hexdigest()[:16]
        self.dir = Path(root) / key / "links"
        self.memory = {} if memory is None else memory

    def _path(self, digest: str) -> Path:
        return self.dir / f"{digest}.safetensors"

    def _recent(self) -> Chain:
        return self.memory.get(self.dir) or Chain()

    def load(self, digest: str) -> Chain | None:
        """The chain whose digest is `digest`, or None if the cache cannot rebuild it."""
        recent = self._recent()
        if recent.digest == digest:
            return recent
        return self._walk(digest)

    def _walk(self, digest: str) -> Chain | None:
        """The chain named `digest`, read from disk by following each file's prefix digest
        back to the empty chain. A missing file is a miss; so is a damaged one, one at the
        wrong position or one that does not hash to its name, which is also removed."""
        found: list[tuple[str, int, Link]] = []  # (file digest, position, link), last first
        wanted = digest
        while wanted != EMPTY_DIGEST:
            path = self._path(wanted)
            if not path.exists():
                return None
            try:
                index, prefix, link = link_from_bytes(path.read_bytes())
            except CorruptFileError:
                index = -1
            if index < 0 or (found and index != found[-1][1] - 1):  # one position back
                path.unlink(missing_ok=True)  # a damaged cache entry is just a cache miss
                return None
            found.append((wanted, index, link))
            wanted = prefix
        chain = Chain()
        for name, index, link in reversed(found):
            if index != len(chain) or chain.append(link) != name:
                self._path(name).unlink(missing_ok=True)
                return None
        return chain

    def _prefix(self, start: int, digest: str) -> Chain | None:
        """The first `start` links of the chain, given their digest."""
        recent = self._recent()
        if len(recent) >= start and recent.prefix_digest(start) == digest:
            return recent.prefix(start)
        chain = self._walk(digest)
        return chain if chain is not None and len(chain) == start else None

    def store(self, chain: Chain, start: int = 0) -> None:
        """Write the files of `chain`'s links from position `start` on that are not cached."""
        for index in range(start, len(chain)):
            path = self._path(chain.prefix_digest(index + 1))
            if not path.exists():
                data = link_to_bytes(chain[index], index, chain.prefix_digest(index))
                atomic_write_bytes(path, data)

    def resolve(self, record: ConfigRecord | None, digest: str) -> Chain:
        """The full links list named by `digest`, from the cache and/or the sent links."""
        cached = self.load(digest)
        if cached is None:
            cached = self._catch_up(record, digest)
        self.memory[self.dir] = cached
        return cached

    def _catch_up(self, record: ConfigRecord | None, digest: str) -> Chain:
        """The cached prefix the server's `record` names, plus the links it carries."""
        if record is None:
            raise LookupError(f"links {digest[:12]} not cached and none were sent")
        start, received = links_from_bytes(bytes(record[p.LINKS_DATA]))
        chain = self._prefix(start, str(record[p.LINKS_PREFIX_DIGEST]))
        if chain is None:
            raise LookupError("links prefix not cached; the server resends all links next round")
        for link in received:
            chain.append(link)
        if chain.digest != digest:
            raise ValueError(f"received links do not hash to {digest[:12]}")
        self.store(chain, start)
        return chain


def checked_links(links: Callable[[], Sequence[Link]], digest: str) -> Chain:
    """`links()` as a Chain; ValueError unless they hash to `digest`."""
    wanted = Chain.of(links())
    if wanted.digest != digest:
        raise ValueError(f"links do not hash to {digest[:12]}")
    return wanted


@dataclass(frozen=True)
class BaseSource:
    """Where a float32 CPU W0 comes from.

    `load` gives a fresh W0, read only to write a master file: float32, or a bf16/fp16
    checkpoint as stored (seedlora.mapped writes it as float32, tensor by tensor);
    `skeleton` the same modules with their tensors on the meta device (None: `load`
    serves, reading the weights once more); `fingerprint` changes when the files W0 is
    read from do (tasks.Task.weights_fingerprint); `name` tells sources of one key apart.
    """

    load: Callable[[], nn.Module]
    skeleton: Callable[[], nn.Module] | None = None
    fingerprint: Callable[[], str] | None = None
    name: str = ""

    @classmethod
    def of(cls, load: Callable[[], nn.Module] | BaseSource) -> BaseSource:
        """`load` itself, or a plain loader named by its qualified name."""
        if isinstance(load, BaseSource):
            return load
        name = getattr(load, "__qualname__", type(load).__qualname__)
        return cls(load, name=f"{getattr(load, '__module__', '')}.{name}")

    def key(self, key: Hashable) -> str:
        """What names this source's master files: the cache key, the loader, the weights."""
        print_ = self.fingerprint() if self.fingerprint is not None else ""
        return f"{key!r}|{self.name}|{print_}"


class BaseCache:
    """This process's float32 CPU master of the global base: W0 plus the merged links,
    mapped from the host's master file (client/masters.py), so every process of a host
    shares one copy.

    Keyed by what the source gives (`key`: the task's config, so a causal LM and a
    classifier of one base never mix) and the links digest. A master file that exists is
    mapped into this process's master model (the last one's modules, or the source's
    skeleton). One that does not is written (under the folder's lock) from the nearest
    master this process or the folder holds, merging only the links it lacks, in order
    (`apply_link`: the same bits as `rebuild` from W0), else from a fresh W0. The master is
    shared and read-only: callers copy it before they change it (client.resident). Not
    thread-safe on its own: client.resident serialises its use.
    """

    def __init__(self) -> None:
        self._key: Hashable = None
        self._source: str | None = None  # BaseSource.key of the master
        self._model: nn.Module | None = None
        self._mapped: Mapped | None = None
        self._digest = EMPTY_DIGEST
        self.loads = 0  # fresh W0 loaded (to write a master from it)
        self.applied = 0  # links merged into a master file this process wrote
        self.writes = 0  # master files this process wrote
        self.maps = 0  # master files this process mapped

    @property
    def digest(self) -> str | None:
        """The links digest of the master, None before the first `get`."""
        return self._digest if self._model is not None else None

    @property
    def path(self) -> Path | None:
        """The master file this process maps (it may have been evicted since)."""
        return self._mapped.path if self._mapped is not None else None

    def get(
        self,
        key: Hashable,
        digest: str,
        links: Callable[[], Sequence[Link]],
        load: Callable[[], nn.Module] | BaseSource,
        root: str | os.PathLike,
    ) -> nn.Module:
        """The master for (`key`, `digest`); `links()` is asked for only when no master
        file of `digest` exists. `root`: the node's cache directory.

        Raises ValueError when `links()` does not hash to `digest`.
        """
        if self._model is not None and key == self._key and digest == self._digest:
            return self._model
        source = BaseSource.of(load)
        name = source.key(key)
        store = MasterStore.of(root, name)
        model = self._model if (key, name) == (self._key, self._source) else None
        mapped = store.open(digest)
        if mapped is None:
            wanted = checked_links(links, digest)
            with store.lock():
                mapped = store.open(digest)
                if mapped is None:
                    model = self._write(store, wanted, source, model)
                    mapped = store.open(digest)
                    if mapped is None:
                        raise OSError(f"master {store.path(digest)} unreadable after writing")
                    prefixes = (wanted.prefix_digest(k) for k in range(len(wanted)))
                    store.evict(digest, prefixes)
        self._switch(key, name, digest, mapped, model, source)
        return self._model

    def _switch(self, key, name, digest, mapped: Mapped, model, source: BaseSource) -> None:
        """Make `mapped` this process's master, in `model` (or a fresh skeleton)."""
        if model is None:
            self.clear()  # the old master's modules go before a skeleton is made
            model = _skeleton(source)
        try:
            fill(model, mapped.tensors, mapped.aliases)
        except ValueError:
            mapped.release()
            self.clear()
            raise
        if self._mapped is not None:
            self._mapped.release()
        self._model, self._key, self._source, self._mapped = model, key, name, mapped
        self._digest = digest
        self.maps += 1

    def _write(
        self, store: MasterStore, wanted: Chain, source: BaseSource, model: nn.Module | None
    ) -> nn.Module:
        """Write the master of `wanted` from the nearest one (class docstring); returns the
        model that served as its base (its modules take the new master)."""
        held = self._links_held(wanted) if model is not None else -1
        start = held
        try:
            for k in range(len(wanted) - 1, held, -1):  # a longer prefix in the folder
                found = store.open(wanted.prefix_digest(k))
                if found is not None:  # no eviction while the folder's lock is held
                    model = model if model is not None else _skeleton(source)
                    fill(model, found.tensors, found.aliases)
                    found.release()
                    start = k
                    break
            if start < 0:
                model, start = source.load(), 0
                self.loads += 1
            write_merged(store.path(wanted.digest), model, wanted[start:])
        except BaseException:
            self.clear()  # its modules may hold another master now
            raise
        self.writes += 1
        self.applied += len(wanted) - start
        return model

    def _links_held(self, wanted: Chain) -> int:
        """How many of `wanted`'s first links this process's master holds (-1: it is not
        a prefix of `wanted`)."""
        for k in range(len(wanted) + 1):
            if wanted.prefix_digest(k) == self._digest:
                return k
        return -1

    def clear(self) -> None:
        """Forget the master (the next `get` maps or writes one again)."""
        if self._mapped is not None:
            self._mapped.release()
        self._model = self._key = self._source = self._mapped = None
        self._digest = EMPTY_DIGEST


def _skeleton(source: BaseSource) -> nn.Module:
    return source.skeleton() if source.skeleton is not None else source.load()
