"""The node worker: the long-lived process that keeps a data owner's trainer resident.

Flower starts a fresh `flwr-clientapp` process for every message and nothing in it
survives the message. `python -m client.node` starts workers beside the SuperNodes they
serve (`--workers partition`, the default: one per partition, training concurrently and
sharing the host's float32 master; `--workers host`: one serving all its nodes). Their
ClientApps relay each train and evaluate message to a worker over a Unix socket
(contract/worker_wire.py). So the model is built once per link, each partition tokenized
once per run, and the link cache and the resident model live as long as the worker's
`Trainer`, exactly as in a simulation's Ray actor: the code that trains is the same
(client/trainer.py, built by client/compose.py), only the keeper differs.

A worker serves its messages in turn, one at a time, on its one resident model. A relay
that gives up (its `round-timeout`) closes the connection; the worker's late reply is
dropped and the next message is served as usual.

    python -m client.worker --socket PATH [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from contract import worker_wire as wire

from .compose import TRAINER, worker_app

log = logging.getLogger("seedlora.worker")


class Worker:
    """Serves relayed messages with one ClientApp, one message at a time."""

    def __init__(self, app: ClientApp, stats: Callable[[], dict] = dict):
        self.app, self.stats = app, stats
        self.turn = threading.Lock()  # one message at a time on the resident model
        self.served = 0

    def handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                msg, context, _ = wire.read_request(conn)
            except wire.WorkerError as err:
                log.warning("refused a relay: %s", err)
                with contextlib.suppress(OSError):
                    wire.write_error(conn, str(err))
                return
            except (ConnectionError, OSError) as err:
                log.warning("a relay went away before its message arrived: %s", err)
                return
            try:
                reply = self._serve(msg, context)
            except Exception as err:  # noqa: BLE001 - the relay reports it to the server
                log.exception("failed: %s", msg.metadata.message_type)
                with contextlib.suppress(OSError):
                    wire.write_error(conn, f"{type(err).__name__}: {err}")
                return
            try:
                wire.write_reply(conn, reply, context.state)
            except OSError as err:  # the relay gave up (timeout) or its process ended
                log.warning("reply to partition %s not delivered: %s", _partition(context), err)

    def _serve(self, msg: Message, context: Context) -> Message:
        with self.turn:
            t0 = time.perf_counter()
            log.info("start %s partition %s", msg.metadata.message_type, _partition(context))
            reply = self.app(msg, context)
            self.served += 1
            line = {
                "served": self.served,
                "type": msg.metadata.message_type,
                "partition": _partition(context),
                "run": context.run_id,
                "seconds": round(time.perf_counter() - t0, 3),
                **self.stats(),
            }
            log.info("message %s", json.dumps(line))
            return reply


def _partition(context: Context) -> object:
    return context.node_config.get("partition-id")


def listen(path: Path) -> socket.socket:
    """A Unix socket at `path` that only this user can open (the file is 0600; a stale
    one is replaced). A missing folder is made 0700; an existing one is left as it is."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is created 0600
    try:
        server.bind(str(path))
    finally:
        os.umask(old)
    server.listen(64)
    return server


def serve(server: socket.socket, worker: Worker) -> None:
    """Accept relays forever, each on its own thread (they queue on `worker.turn`)."""
    while True:
        conn, _ = server.accept()
        threading.Thread(target=worker.handle, args=(conn,), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m client.worker", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--socket", required=True, type=Path, help="where to listen")
    parser.add_argument(
        "--app", default=TRAINER, help="module:factory of the ClientApp served (default: trainer)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="link cache and master files (default ~/.cache/seedlora)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s")
    server = listen(args.socket)  # relays may connect now; they wait for the trainer
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    worker = Worker(*worker_app(args.app, args.cache_dir))
    log.info("ready on %s (pid %d, protocol %d)", args.socket, os.getpid(), wire.PROTOCOL)
    serve(server, worker)


if __name__ == "__main__":
    main()
