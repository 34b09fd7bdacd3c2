"""The client's copy of the chain: links cached on disk, rebuilt bases cached in memory.

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
is known, or that extends it, reads no file and hashes only the links it receives.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

from flwr.app import ConfigRecord
from torch import nn

from contract import protocol as p
from seedlora.chain import EMPTY_DIGEST, Chain, Link, apply_link, links_digest
from seedlora.serialize import (
    CorruptFileError,
    atomic_write_bytes,
    link_from_bytes,
    link_to_bytes,
    links_from_bytes,
)

# cache directory -> the chain it last resolved in this process (shared by LinkCache objects:
# the ClientApp makes one per message).
RESOLVED: dict[Path, Chain] = {}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SEEDLORA_CACHE", Path.home() / ".cache" / "seedlora"))


class LinkCache:
    """Links on disk under `root/<base key>/links/<digest>.safetensors`, one per file.

    `memory` maps a cache directory to the chain it last resolved (default: this process's
    `RESOLVED`; a test passes {} to see the disk alone)."""

    def __init__(
        self,
        root: str | os.PathLike,
        base_name: str,
        memory: dict[Path, Chain] | None = None,
    ):
        key = hashlib.sha256(base_name.encode()).hexdigest()[:16]
        self.dir = Path(root) / key / "links"
        self.memory = RESOLVED if memory is None else memory

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


def checked_links(links: Callable[[], Sequence[Link]], digest: str) -> list[Link]:
    """`links()` as a list; ValueError unless they hash to `digest`."""
    wanted = list(links())
    if links_digest(wanted) != digest:
        raise ValueError(f"links do not hash to {digest[:12]}")
    return wanted


class BaseCache:
    """This process's float32 CPU master of the global base: W0 plus the links applied so far.

    Keyed by what `load` gives (`key`: the task's config, so a causal LM and a classifier
    of one base never mix) and the links digest. A links list that extends the applied one
    gets only the links it lacks, in order (`apply_link`: the same bits as `rebuild` from
    W0); any other list starts again from `load()`. The master is shared, not copied:
    callers copy it before they change it (client.resident). Not thread-safe on its own:
    client.resident serialises its use.
    """

    def __init__(self) -> None:
        self._key: Hashable = None
        self._model: nn.Module | None = None
        self._links: list[Link] = []
        self._digest = EMPTY_DIGEST
        self.loads = 0  # times `load` was called (a fresh W0)
        self.applied = 0  # links merged into a master, in all

    @property
    def digest(self) -> str | None:
        """The links digest of the master, None before the first `get`."""
        return self._digest if self._model is not None else None

    def get(
        self,
        key: Hashable,
        digest: str,
        links: Callable[[], Sequence[Link]],
        load: Callable[[], nn.Module],
    ) -> nn.Module:
        """The master for (`key`, `digest`); `links()` is asked for only when it must change.

        Raises ValueError when `links()` does not hash to `digest`.
        """
        if self._model is not None and key == self._key and digest == self._digest:
            return self._model
        wanted = checked_links(links, digest)
        have = len(self._links)
        extends = (
            self._model is not None
            and key == self._key
            and len(wanted) >= have
            and links_digest(wanted[:have]) == self._digest
        )
        if not extends:
            self._model = self._key = None  # drop the old master before loading another
            self._links, self._digest = [], EMPTY_DIGEST
            self._model, self._key = load(), key
            self.loads += 1
        for link in wanted[len(self._links) :]:
            apply_link(self._model, link)
            self._links.append(link)
            self.applied += 1
        self._digest = digest
        return self._model

    def clear(self) -> None:
        """Forget the master (the next `get` loads W0 again)."""
        self._model = self._key = None
        self._links, self._digest = [], EMPTY_DIGEST
