"""Copies of a model that share its frozen storage: one float32 master, many users.

A process keeps one float32 master of the base (a client's mapped master file, the
server's model) and builds what it needs from it without a second float32 copy: the
device model (`runtime.devices.place` swaps each frozen tensor for its cast one at a time),
an evaluation replica, an export. What makes that safe is that nothing writes into a
shared frozen tensor: trainable parameters get storage of their own (`own_trainable`),
and whatever must change a frozen weight (a merge, a head copied in) first gives that
tensor its own storage.
"""

from __future__ import annotations

import copy

from torch import nn


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are new objects over the same storage.

    Modules and parameter objects are new (so replacing a parameter's `.data`, moving or
    casting the copy leaves `model` alone); buffers are deep-copied (they are small);
    tied parameters stay tied. At 7B a deep copy was 27 GB per process, twice the master.
    """
    memo: dict[int, object] = {
        id(q): nn.Parameter(q.data, requires_grad=q.requires_grad) for q in model.parameters()
    }
    return copy.deepcopy(model, memo)


def own_trainable(model: nn.Module) -> nn.Module:
    """Give trainable parameters (B, heads) storage of their own, apart from the master."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.clone()
    return model
