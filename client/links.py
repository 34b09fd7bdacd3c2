"""The client's copy of the chain: links cached on disk, rebuilt bases cached in memory.

A client that restarts or joins late catches up from the links the server sends plus
what it cached before; an up-to-date client is sent no links at all. The cache is keyed
by the base model and the links digest, so clients of different runs or bases never
mix, and a digest mismatch is an error, never a silent wrong base.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

from flwr.app import ConfigRecord
from torch import nn

from contract import protocol as p
from seedlora.chain import EMPTY_DIGEST, Link, apply_link, links_digest
from seedlora.serialize import (
    CorruptFileError,
    atomic_write_bytes,
    links_from_bytes,
    links_to_bytes,
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("SEEDLORA_CACHE", Path.home() / ".cache" / "seedlora"))


class LinkCache:
    """Links lists on disk under `root/<base key>/<digest>.safetensors`."""

    def __init__(self, root: str | os.PathLike, base_name: str):
        key = hashlib.sha256(base_name.encode()).hexdigest()[:16]
        self.dir = Path(root) / key

    def _path(self, digest: str) -> Path:
        return self.dir / f"{digest}.safetensors"

    def load(self, digest: str) -> list[Link] | None:
        if digest == EMPTY_DIGEST:
            return []
        path = self._path(digest)
        if not path.exists():
            return None
        try:
            _, links = links_from_bytes(path.read_bytes())
        except CorruptFileError:
            path.unlink(missing_ok=True)  # a damaged cache entry is just a cache miss
            return None
        return links if links_digest(links) == digest else None

    def store(self, links: list[Link]) -> None:
        atomic_write_bytes(self._path(links_digest(links)), links_to_bytes(links))

    def resolve(self, record: ConfigRecord | None, digest: str) -> list[Link]:
        """The full links list named by `digest`, from the cache and/or the sent links."""
        cached = self.load(digest)
        if cached is not None:
            return cached
        if record is None:
            raise LookupError(f"links {digest[:12]} not cached and none were sent")
        prefix = self.load(str(record[p.LINKS_PREFIX_DIGEST]))
        if prefix is None:
            raise LookupError("links prefix not cached; the server resends all links next round")
        start, received = links_from_bytes(bytes(record[p.LINKS_DATA]))
        links = prefix[:start] + received
        if links_digest(links) != digest:
            raise ValueError(f"received links do not hash to {digest[:12]}")
        self.store(links)
        return links


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
        wanted = list(links())
        if links_digest(wanted) != digest:
            raise ValueError(f"links do not hash to {digest[:12]}")
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
