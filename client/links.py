"""The client's copy of the chain: links cached on disk, rebuilt bases cached in memory.

A client that restarts or joins late catches up from the links the server sends plus
what it cached before; an up-to-date client is sent no links at all. The cache is keyed
by the base model and the links digest, so clients of different runs or bases never
mix, and a digest mismatch is an error, never a silent wrong base.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord
from torch import nn

from contract import protocol as p
from seedlora.chain import EMPTY_DIGEST, Link, links_digest, rebuild
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
    """The last rebuilt base (W0 + links) of this process; clients get deep copies."""

    def __init__(self) -> None:
        self._key: tuple[str, str] | None = None
        self._model: nn.Module | None = None

    def get(self, base_name: str, links: list[Link], load: Callable[[], nn.Module]) -> nn.Module:
        key = (base_name, links_digest(links))
        if key != self._key:
            self._model = rebuild(load(), links)
            self._key = key
        return copy.deepcopy(self._model)
