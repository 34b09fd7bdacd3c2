"""One command per data owner: the node worker and its SuperNode(s), started and stopped
together.

    python -m client.node --superlink HOST:9092 --insecure --partition-id 0 --num-partitions 2

starts a node worker (client/worker.py: the resident trainer) and one `flower-supernode`
per partition id, each told where its worker listens (node config `worker-socket`).
`--partition-id 0,1` serves two partitions of one machine: by default with a worker each
(`--workers partition`: they train concurrently, each with its own resident model, and
share the host's float32 master file), or with one worker serving them in turn
(`--workers host`: one resident model; less memory, slower rounds: docs/deployment.md has
both measured). It then watches them: a worker that dies is restarted (it catches up
from the link cache like a fresh node; the message it was serving is lost, and the server
counts that node's reply as missing for that round only); a SuperNode that exits ends the
command. Ctrl-C or SIGTERM stops everything; every child also gets a parent-death signal,
so a SIGKILL of this command stops the worker and the SuperNodes too (Linux: `prctl`;
elsewhere only Ctrl-C and SIGTERM clean up). Arguments after `--` go to every
`flower-supernode` unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from contract import worker_wire as wire
from runtime.processes import executable, free_port, start, stop_process_tree

log = logging.getLogger("seedlora.node")
POLL_S = 0.2
READY_TIMEOUT_S = 120.0  # the worker binds its socket before importing the trainer
MAX_QUICK_RESTARTS = 5  # a worker dying this often within QUICK_S is broken: stop
QUICK_S = 60.0
MAX_SOCKET_PATH = 107  # bytes: Linux's sun_path, less its terminating NUL
IDLE_POLL_S = 0.25  # how often an idle SuperNode asks for work (Flower: 3 s)
SUPEREXEC_POLL = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's setting (default 1 s)
WORKER_LAYOUTS = ("partition", "host")


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog=wire.NODE_COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--superlink", required=True, help="the SuperLink's Fleet API host:port")
    parser.add_argument("--insecure", action="store_true", help="no TLS (tests, one machine)")
    parser.add_argument("--root-certificates", help="CA certificate of the SuperLink (TLS)")
    parser.add_argument("--partition-id", required=True, help="this node's partition(s): 0 or 0,1")
    parser.add_argument("--num-partitions", required=True, type=int)
    parser.add_argument("--node-config", default="", help="more node config (key=value ...)")
    parser.add_argument("--cache-dir", help="link cache (default ~/.cache/seedlora)")
    parser.add_argument("--socket", type=Path, help="the worker's socket (default: per pid)")
    parser.add_argument("--log-dir", type=Path, help="worker.log and supernode-<i>.log here")
    parser.add_argument(
        "--idle-poll",
        type=float,
        default=IDLE_POLL_S,
        help="seconds an idle SuperNode waits before asking the SuperLink again "
        "(Flower's own: 3; client/supernode.py)",
    )
    parser.add_argument(
        "--workers",
        choices=WORKER_LAYOUTS,
        default="partition",
        help="partition: a worker per partition id, training concurrently (default); "
        "host: one worker serving every partition in turn",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="each worker's torch CPU threads (0: the CPUs shared among the workers)",
    )
    parser.add_argument("--worker-app", default=None, help=argparse.SUPPRESS)  # tests/bench
    args = parser.parse_args(argv)
    try:
        args.partitions = [int(p) for p in str(args.partition_id).split(",")]
    except ValueError:
        parser.error(f"--partition-id: {args.partition_id!r} is not an integer or a list 0,1")
    bad = [p for p in args.partitions if not 0 <= p < args.num_partitions]
    if bad:
        parser.error(f"--partition-id: {bad} not in 0..{args.num_partitions - 1}")
    if args.socket is not None and len(os.fsencode(args.socket)) > MAX_SOCKET_PATH:
        parser.error(f"--socket: {args.socket} is longer than a Unix socket path may be")
    if not 0 < args.idle_poll <= 3:
        parser.error(f"--idle-poll: {args.idle_poll} not in (0, 3] seconds")
    if not args.insecure and not args.root_certificates:
        parser.error("--insecure or --root-certificates: say how to reach the SuperLink")
    return args, extra


class Worker:
    """One node worker process: its socket, its log name and its restart record."""

    def __init__(self, socket: Path, name: str):
        self.socket, self.name = socket, name
        self.proc: subprocess.Popen | None = None
        self.restarts: list[float] = []


class Node:
    """The workers and the SuperNodes of one data owner, and what keeps them running."""

    def __init__(self, args: argparse.Namespace, extra: list[str]):
        self.args, self.extra = args, extra
        self.logs = args.log_dir
        socket = args.socket or wire.socket_dir() / f"worker-{os.getpid()}.sock"
        if args.workers == "host" or len(args.partitions) == 1:
            self.workers = {p: Worker(socket, "worker") for p in args.partitions[:1]}
            shared = self.workers[args.partitions[0]]
            self.serves = {p: shared for p in args.partitions}
        else:
            self.workers = {
                p: Worker(socket.with_name(f"{socket.stem}-{p}{socket.suffix}"), f"worker-{p}")
                for p in args.partitions
            }
            self.serves = dict(self.workers)
        cpus = os.cpu_count() or 1
        self.threads = args.threads or (
            max(1, cpus // len(self.workers)) if len(self.workers) > 1 else 0
        )
        self.supernodes: list[subprocess.Popen] = []

    def _log(self, name: str) -> Path | None:
        if self.logs is None:
            return None
        self.logs.mkdir(parents=True, exist_ok=True)
        return self.logs / f"{name}.log"

    def start_workers(self) -> None:
        for worker in self.workers.values():
            self.start_worker(worker)

    def start_worker(self, worker: Worker) -> None:
        cmd = [sys.executable, "-m", "client.worker", "--socket", str(worker.socket)]
        if self.args.worker_app:
            cmd += ["--app", self.args.worker_app]
        if self.args.cache_dir:
            cmd += ["--cache-dir", self.args.cache_dir]
        if self.threads:
            cmd += ["--threads", str(self.threads)]
        with contextlib.suppress(FileNotFoundError):
            worker.socket.unlink()
        worker.proc = start(cmd, self._append_log(worker.name))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not worker.socket.exists():
            if worker.proc.poll() is not None:
                raise SystemExit(f"the node worker exited with code {worker.proc.returncode}")
            if time.monotonic() > deadline:
                raise SystemExit(f"the node worker did not listen on {worker.socket}")
            time.sleep(0.05)
        log.info("node worker pid %d listens on %s", worker.proc.pid, worker.socket)

    def _append_log(self, name: str) -> Path | None:
        path = self._log(name)
        if path is not None and path.exists():  # a restarted worker keeps the old log
            path.rename(path.with_suffix(f".{int(time.time() * 1000)}.log"))
        return path

    def node_config(self, partition: int) -> str:
        parts = [
            f"partition-id={partition}",
            f"num-partitions={self.args.num_partitions}",
            f"{wire.WORKER_SOCKET}='{self.serves[partition].socket}'",  # a TOML literal string
        ]
        if self.args.cache_dir:
            parts.append(f"{wire.CACHE_DIR}='{self.args.cache_dir}'")
        return " ".join([*parts, self.args.node_config]).strip()

    def start_supernodes(self) -> None:
        """One SuperNode per partition: Flower's, through client.supernode when the idle
        poll is shorter than Flower's 3 s, its SuperExec polling at the same pace."""
        poll = self.args.idle_poll
        binary = [executable("flower-supernode")]
        env = dict(os.environ)
        if poll < 3.0:
            binary = [sys.executable, "-m", "client.supernode", "--idle-poll", str(poll), "--"]
            env[SUPEREXEC_POLL] = str(max(min(poll, 1.0), 0.01))
        tls = ["--insecure"] if self.args.insecure else []
        if self.args.root_certificates:
            tls = ["--root-certificates", self.args.root_certificates]
        for i, partition in enumerate(self.args.partitions):
            cmd = [*binary, *tls, "--superlink", self.args.superlink, "--port", str(free_port())]
            cmd += ["--node-config", self.node_config(partition), *self.extra]
            self.supernodes.append(start(cmd, self._log(f"supernode-{i}"), env=env))
            log.info("supernode pid %d serves partition %d", self.supernodes[-1].pid, partition)

    def watch(self) -> int:
        """Restart a dead worker; return when a SuperNode exits (its exit code)."""
        while True:
            for proc in self.supernodes:
                if proc.poll() is not None:
                    log.error("supernode pid %d exited with code %d", proc.pid, proc.returncode)
                    return proc.returncode or 1
            for worker in self.workers.values():
                assert worker.proc is not None
                if worker.proc.poll() is None:
                    continue
                now = time.monotonic()
                worker.restarts = [t for t in worker.restarts if now - t < QUICK_S] + [now]
                if len(worker.restarts) > MAX_QUICK_RESTARTS:
                    log.error(
                        "%s died %d times in %.0f s", worker.name, len(worker.restarts), QUICK_S
                    )
                    return 1
                log.warning(
                    "%s exited with code %s: restarting", worker.name, worker.proc.returncode
                )
                self.start_worker(worker)
            time.sleep(POLL_S)

    def stop(self) -> None:
        workers = [w.proc for w in self.workers.values() if w.proc is not None]
        for proc in [*self.supernodes, *workers]:
            stop_process_tree(proc)
        for worker in self.workers.values():
            with contextlib.suppress(FileNotFoundError):
                worker.socket.unlink()


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node %(message)s")
    signal.signal(signal.SIGTERM, _raise_exit)
    node = Node(args, extra)
    try:
        node.start_workers()
        node.start_supernodes()
        return node.watch()
    except KeyboardInterrupt:
        return 130
    finally:
        node.stop()
        log.info("stopped the worker and %d supernode(s)", len(node.supernodes))


if __name__ == "__main__":
    sys.exit(main())
