"""Child processes of tests/test_master_file.py, importing little (a spawned child imports
the module of its target): a wide model, mapping a master file, a writer that crashes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
from torch import nn

from client.masters import MasterStore
from seedlora import mapped

WIDTH = 1024  # 4 layers of 1024 x 1024 float32 (+ biases): a 16.8 MB master


def wide_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(4)))


def wide_skeleton() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(4)))


def pss() -> int:
    """This process's proportional set size in bytes (/proc/self/smaps_rollup, Linux)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise OSError("no Pss in /proc/self/smaps_rollup")


def map_and_report(folder: str, digest: str, ready, go, out) -> None:
    """Map the master, read every page, wait until the other process did too, then report
    (pid, PSS growth, sum of the weights)."""
    torch.set_num_threads(1)
    before = pss()
    store = MasterStore(folder)
    found = store.open(digest)
    model = mapped.fill(wide_skeleton(), found.tensors, found.aliases)
    total = sum(float(p.sum()) for p in model.parameters())
    ready.wait()
    out.put((os.getpid(), pss() - before, total))
    go.wait()


def crash_mid_write(folder: str, digest: str) -> None:
    """Write the wide master as BaseCache does, killed (SIGKILL) after two tensors."""
    written = []
    write = mapped._write_tensor

    def crash_after_two(f, tensor):
        write(f, tensor)
        f.flush()
        written.append(tensor)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    mapped._write_tensor = crash_after_two
    store = MasterStore(folder)
    with store.lock():
        mapped.write_merged(store.path(digest), wide_model())
