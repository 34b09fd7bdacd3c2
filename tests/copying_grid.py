"""LocalGrid for the legacy SecAgg+ workflow: it delivers copies, as a real transport does
(the workflow sends one record object to every node, and secaggplus_mod edits it in
place), and names its run (the legacy client manager asks the grid for it)."""

from __future__ import annotations

import copy

from flwr.supercore.run import Run

from tests.local_grid import RUN_ID, LocalGrid


class CopyingGrid(LocalGrid):
    @property
    def run(self) -> Run:
        return Run.create_empty(RUN_ID)

    def send_and_receive(self, messages, *, timeout=None):
        return super().send_and_receive([copy.deepcopy(m) for m in messages], timeout=timeout)
