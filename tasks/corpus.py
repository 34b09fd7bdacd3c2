"""The stdlib corpus: real Python source that every machine running this project already has.

Files of the running interpreter's standard library are grouped by top-level package and split
by package, so the base model never sees the packages that federated clients fine-tune on.
"""

from __future__ import annotations

import functools
import os
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Path components that mark test suites, caches or non-stdlib trees.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages"})
_SKIP_TOP = ("lib-dynload", "config-")
# Split of the shipped base model. Tasks always use it, whatever their own seed, so the held-out
# packages stay unseen by that model and every experiment evaluates on the same files.
SPLIT_SEED = 0


@dataclass(frozen=True)
class SourceFile:
    """One decoded source file; `path` is relative to the stdlib root (posix separators)."""

    package: str
    path: str
    text: str


def stdlib_root() -> Path:
    """Directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _package_of(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _skipped(rel: Path) -> bool:
    if rel.name.startswith("test_") or any(p in _SKIP_DIRS for p in rel.parts[:-1]):
        return True
    return len(rel.parts) > 1 and rel.parts[0].startswith(_SKIP_TOP)


@functools.lru_cache(maxsize=1)
def load_corpus() -> dict[str, tuple[SourceFile, ...]]:
    """Map package name -> its files (sorted by path). Cached; callers must not mutate it."""
    root = stdlib_root()
    groups: dict[str, list[SourceFile]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            rel = (Path(dirpath) / name).relative_to(root)
            if _skipped(rel):
                continue
            try:
                text = (root / rel).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few legacy files are latin-1; they are simply not part of the corpus
            pkg = _package_of(rel)
            groups.setdefault(pkg, []).append(SourceFile(pkg, rel.as_posix(), text))
    return {pkg: tuple(sorted(fs, key=lambda f: f.path)) for pkg, fs in sorted(groups.items())}


@dataclass(frozen=True)
class CorpusSplit:
    """Package-level split; all tuples are sorted so the split is hashable and comparable."""

    seed: int
    pretrain: tuple[str, ...]  # packages the base model is trained on
    validation: tuple[str, ...]  # whole packages held back for the pretraining validation loss
    federated: tuple[str, ...]  # held-out packages the federated clients fine-tune on
    eval_files: tuple[str, ...]  # paths of the federated packages' evaluation files

    def files(self, package: str, kind: str = "all") -> tuple[SourceFile, ...]:
        """Files of `package`; kind is "all", "train" (non-eval) or "eval"."""
        files = load_corpus()[package]
        if kind == "all":
            return files
        evals = set(self.eval_files)
        if kind == "eval":
            return tuple(f for f in files if f.path in evals)
        if kind == "train":
            return tuple(f for f in files if f.path not in evals)
        raise ValueError(f"kind must be 'all', 'train' or 'eval', got {kind!r}")


def _eval_paths(seed: int, package: str, files: tuple[SourceFile, ...], frac: float) -> list[str]:
    if len(files) < 2:
        return []  # a single-file module stays whole: it is training data only
    n_eval = max(1, round(frac * len(files)))
    paths = [f.path for f in files]
    random.Random(f"{seed}/eval/{package}").shuffle(paths)
    return paths[:n_eval]


@functools.lru_cache(maxsize=32)
def split_corpus(
    seed: int = SPLIT_SEED,
    pretrain_frac: float = 0.7,
    val_frac: float = 0.1,
    eval_frac: float = 0.2,
) -> CorpusSplit:
    """Deterministic split by package name.

    Sorted names are shuffled with `random.Random(seed)`, separately for multi-file packages and
    single-file modules (so the held-out side gets its share of packages that have evaluation
    files), and the first `pretrain_frac` of each goes to pretraining. The first `val_frac` of the
    pretraining packages become the validation packages.
    """
    corpus = load_corpus()
    pretrain: list[str] = []
    federated: list[str] = []
    for multi in (True, False):
        names = sorted(p for p, fs in corpus.items() if (len(fs) > 1) == multi)
        random.Random(seed).shuffle(names)
        cut = round(pretrain_frac * len(names))
        pretrain += names[:cut]
        federated += names[cut:]
    random.Random(seed).shuffle(pretrain)
    n_val = max(1, round(val_frac * len(pretrain)))
    validation, pretrain = pretrain[:n_val], pretrain[n_val:]
    evals = [p for pkg in federated for p in _eval_paths(seed, pkg, corpus[pkg], eval_frac)]
    return CorpusSplit(
        seed=seed,
        pretrain=tuple(sorted(pretrain)),
        validation=tuple(sorted(validation)),
        federated=tuple(sorted(federated)),
        eval_files=tuple(sorted(evals)),
    )


def corpus_info(seed: int = SPLIT_SEED) -> dict[str, object]:
    """Python version and file/package counts of the corpus and its split (record with results)."""
    corpus = load_corpus()
    split = split_corpus(seed)

    def count(pkgs: tuple[str, ...]) -> dict[str, int]:
        files = [f for p in pkgs for f in corpus[p]]
        chars = sum(len(f.text) for f in files)
        return {"packages": len(pkgs), "files": len(files), "chars": chars}

    return {
        "python_version": sys.version.split()[0],
        "stdlib": str(stdlib_root()),
        "seed": seed,
        "total": count(tuple(corpus)),
        "pretrain": count(split.pretrain),
        "validation": count(split.validation),
        "federated": count(split.federated),
        "federated_eval_files": len(split.eval_files),
    }
