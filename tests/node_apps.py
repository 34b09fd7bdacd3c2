"""ClientApps a test's node worker serves (`python -m client.node --worker-app ...`)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.compose import build_trainer_app

HOLD = "SEEDLORA_TEST_HOLD"  # env: the file the held message creates


def held_second_train() -> ClientApp:
    """The trainer, except that this worker's second train message creates the file named
    by $SEEDLORA_TEST_HOLD and then waits (up to 10 min) instead of answering: a worker
    that is certainly mid-round when the test kills it."""
    trainer = build_trainer_app()
    app = ClientApp()
    trains = [0]

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        trains[0] += 1
        if trains[0] == 2:
            Path(os.environ[HOLD]).touch()
            time.sleep(600)
        return trainer(msg, context)

    @app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return trainer(msg, context)

    return app
