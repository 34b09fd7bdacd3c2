"""The run folder: one run per folder, held by one ServerApp, removed when it holds nothing.

- A run without `run-name` gets a new folder `YYYYmmdd-HHMMSS-xxxxxx` (six random hex
  digits; created with O_EXCL semantics, so two runs started in the same second never
  share one).
- A fresh run (`resume = false`) is refused in a folder that holds a checkpoint: that is
  another run's, and `run-name` must change (or `resume = true` continue it).
- The ServerApp holds an exclusive `flock` on `<folder>/.lock` for the whole run; a second
  ServerApp on the same folder (two runs with one `run-name`, or a `resume` started while
  an orphaned first run still writes) is refused, naming the folder and the holder's pid.
  The kernel drops the lock when its process dies, also on SIGKILL.
- Under `simulation.launch` the launcher takes that lock itself (`hold`) before it starts
  anything, so a second run on the folder is refused in its check, not 30 s later in its
  ServerApp. The launcher names the folder in `SEEDLORA_RUN_HELD` for its process tree;
  a ServerApp whose folder that names takes no lock of its own. The lock goes with the
  launcher (also SIGKILLed; its ServerApp's watchdog then stops the run within 0.5 s).
- A run that fails before its first checkpoint leaves nothing: a folder it created is
  removed again (one the launcher created: by the launcher, once the run has ended).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from contract.config import RunConfig, RunConfigError

LOCK = ".lock"
HELD_ENV = "SEEDLORA_RUN_HELD"  # the folder the launcher holds for its process tree
# The checkpoint's files (server/checkpoint.py writes them): named here, where the
# launcher's check reads them without loading torch.
CHECKPOINT = "checkpoint.safetensors"
PREVIOUS_CHECKPOINT = "checkpoint.prev.safetensors"


def default_name() -> str:
    """A timestamp plus six random hex digits: unique even for runs of the same second."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds a run's checkpoint (what `resume` continues)."""
    return any((folder / name).exists() for name in (CHECKPOINT, PREVIOUS_CHECKPOINT))


def _root(cfg: RunConfig) -> Path:
    return Path(cfg.output.output_dir).expanduser().resolve()


def named_folder(cfg: RunConfig) -> Path | None:
    """The folder a run config names (`run-name`, or with `resume` the latest run with a
    checkpoint); None for a fresh run without a name (a new folder is made)."""
    root = _root(cfg)
    if cfg.output.run_name:
        return root / cfg.output.run_name
    if cfg.output.resume:
        runs = sorted(root.glob(f"*/{CHECKPOINT}"), key=lambda f: f.stat().st_mtime)
        if not runs:
            raise RunConfigError(f"resume: no run with a checkpoint under output-dir {root}")
        return runs[-1].parent
    return None


def _holder(folder: Path) -> str:
    with contextlib.suppress(OSError):
        pid = (folder / LOCK).read_text().strip()
        if pid:
            return f" (pid {pid})"
    return ""


def _busy(folder: Path) -> RunConfigError:
    return RunConfigError(
        f"run-name: run folder {folder} is in use by another run{_holder(folder)}; "
        "wait for that run to end (or stop it) before starting or resuming a run there"
    )


def check(cfg: RunConfig) -> None:
    """Refuse early, without taking the folder, what `claim` would refuse (the launcher's
    check): a fresh run in a folder with a checkpoint, `resume` without one, a held lock."""
    folder = named_folder(cfg)
    if folder is None or not folder.exists():
        if folder is not None and cfg.output.resume:
            raise RunConfigError(f"resume: run folder {folder} does not exist")
        return
    _check_contents(cfg, folder)
    lock = folder / LOCK
    if lock.exists():
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(folder) from None
        finally:
            os.close(fd)


def _check_contents(cfg: RunConfig, folder: Path) -> None:
    if not cfg.output.resume and holds_run(folder):
        raise RunConfigError(
            f"run-name: {folder} already holds a run (a checkpoint); choose another run-name, "
            "or set resume=true to continue that run"
        )
    if cfg.output.resume and not holds_run(folder):
        raise RunConfigError(f"resume: run folder {folder} holds no checkpoint to resume")


def _lock(folder: Path) -> int:
    """An exclusive flock on `folder/.lock` (its fd), or RunConfigError naming the folder."""
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _busy(folder) from None
    try:  # a failing holder may have removed the folder meanwhile: then the lock is stale
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        raise RunConfigError(f"run-name: run folder {folder} was removed while starting; retry")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _new_folder(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        folder = root / default_name()
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise RunConfigError(f"output-dir: could not make a new run folder under {root}")


def _make(cfg: RunConfig, folder: Path) -> bool:
    """Create the named `folder` unless it exists (`resume` needs it); whether it was made."""
    if cfg.output.resume and not folder.exists():
        raise RunConfigError(f"resume: run folder {folder} does not exist")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _held_by_launcher(folder: Path) -> bool:
    """Whether the launcher that started this process holds `folder` (`hold`)."""
    held = os.environ.get(HELD_ENV, "")
    return bool(held) and Path(held) == folder


@contextlib.contextmanager
def claim(cfg: RunConfig, folder: Path | None = None) -> Iterator[Path]:
    """The run's folder, created if needed and locked for the `with` block (unless the
    launcher holds it: module docstring): `folder` when given (the in-process harness's),
    else the one the config names (or a new one).

    Refuses (RunConfigError naming the key) what the module docstring lists. When the
    block raises before the folder holds a checkpoint, a folder this call created is
    removed again."""
    folder = named_folder(cfg) if folder is None else Path(folder)
    if folder is None:
        folder, created = _new_folder(_root(cfg)), True
    else:
        created = _make(cfg, folder)
    fd = None if _held_by_launcher(folder) else _lock(folder)
    try:
        _check_contents(cfg, folder)
        yield folder
    except BaseException:
        if created and not holds_run(folder):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock; the file stays (unlinking it would race)


@contextlib.contextmanager
def hold(cfg: RunConfig) -> Iterator[Path | None]:
    """The launcher's lock on the folder the config names, from before anything starts to
    the end of the `with` block (None, and nothing held, for a fresh run without
    `run-name`: its ServerApp makes a new folder). Refuses what `claim` refuses; a folder
    this call created is removed at the end unless it then holds a checkpoint."""
    folder = named_folder(cfg)
    if folder is None:
        yield None
        return
    created = _make(cfg, folder)
    fd = _lock(folder)
    try:
        _check_contents(cfg, folder)
        yield folder
    finally:
        if created and not holds_run(folder):
            shutil.rmtree(folder, ignore_errors=True)
        os.close(fd)
