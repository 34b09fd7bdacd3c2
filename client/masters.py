"""One float32 master of the base per host: a mapped file per links digest in the node cache.

Every client process of a machine (the Ray actors of a simulation, the node worker of a
deployment) trains against the same frozen base `W0 + sum_j s_j B_j A_j` (s_j: the
link's `spec.scaling(alpha)`). Each used to hold its own float32 copy (26 GB per process
at 7B); now the first process that needs a base writes it once to

    <cache dir>/masters/<source key>/<links digest>.safetensors

and every process maps that file (seedlora/mapped.py: one copy in the page cache, counted
once by PSS; copy-on-write, so nothing reaches the file). The source key names what W0 is:
the task config, the loader and a fingerprint of the weight files, so a master of other or
older weights is never taken for this one.

Writing happens under an exclusive `flock` on the folder's `.lock`: a process that finds no
file takes the lock, looks again (another may have written it meanwhile), else writes it
(temp file, fsync, rename: a reader sees a complete file or none; a crash leaves at most a
temp file that no reader opens, removed by the next writer). Readers take no lock.

Eviction: a process holds a shared `flock` on the master file it maps. Once a new master is
complete, its writer unlinks the masters of its prefixes (the previous links' bases) and
every other master that no process holds (a finished run's). Unlinking a mapped file is
safe on Linux: a process that still maps it keeps its pages until it lets go; one that
needs an unlinked master later (a stale message) rebuilds it. Needs `fcntl` (Linux, macOS).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from seedlora.mapped import map_file
from seedlora.serialize import CorruptFileError

MASTERS = "masters"
SUFFIX = ".safetensors"
LOCK = ".lock"


class Mapped:
    """A master file mapped by this process: its tensors and tied names, and the open file
    whose shared lock tells writers it is in use (`release` drops the lock)."""

    def __init__(self, path: Path, handle: IO[bytes]):
        self.path = path
        self._handle: IO[bytes] | None = handle
        self.tensors, self.aliases = map_file(handle.fileno())

    def release(self) -> None:
        """Close the file (its shared lock goes; the mapping lives on in the tensors)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class MasterStore:
    """The master files of one base source (module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)

    @classmethod
    def of(cls, root: str | os.PathLike, source: str) -> MasterStore:
        """The store of the source named `source` under the cache directory `root`."""
        return cls(Path(root) / MASTERS / hashlib.sha256(source.encode()).hexdigest()[:16])

    def path(self, digest: str) -> Path:
        return self.dir / f"{digest}{SUFFIX}"

    def open(self, digest: str) -> Mapped | None:
        """The master of `digest` mapped, holding a shared lock on it; None if there is none
        (or it is unreadable: the writer replaces it)."""
        try:
            handle = open(self.path(digest), "rb")  # noqa: SIM115 - kept open by Mapped
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
            return Mapped(self.path(digest), handle)
        except CorruptFileError:
            handle.close()
            return None
        except BaseException:
            handle.close()
            raise

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The folder's exclusive write lock, for as long as the block runs; temp files
        left by a writer that crashed are removed on entry."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / LOCK, "ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                for stale in self.dir.glob(f".*{SUFFIX}.*"):  # atomic_write's temp names
                    stale.unlink(missing_ok=True)
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def evict(self, keep: str, prefixes: Iterable[str]) -> list[str]:
        """Unlink every master but `keep`'s that is one of `prefixes` or that no process
        holds (call under `lock`); returns the digests removed."""
        prefixes = set(prefixes)
        removed = []
        for path in sorted(self.dir.glob(f"*{SUFFIX}")):
            digest = path.name[: -len(SUFFIX)]
            if digest == keep or path.name.startswith("."):
                continue
            if digest in prefixes or _unused(path):
                path.unlink(missing_ok=True)
                removed.append(digest)
        return removed


def _unused(path: Path) -> bool:
    """Whether no process holds `path` (an exclusive lock can be had at once)."""
    try:
        with open(path, "rb") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True  # closing the file drops the lock
    except BlockingIOError:
        return False
    except FileNotFoundError:
        return False
