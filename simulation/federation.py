"""Real Flower processes on 127.0.0.1: a SuperLink, SuperNodes, data owners' node commands
and `flwr` runs, for the deployment tests and `python -m bench.federation deploy`.

`Federation` starts each process in its own session (so its pid is its process group and
a SIGKILL takes its ClientApp/ServerApp children with it), keeps them by name, and stops
every one of them by pid when the `with` block ends, also on failure. With `tls` the
SuperLink serves TLS and every client verifies it against the test CA; with `node_auth`
it also refuses SuperNodes whose public key was not registered with `register`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from contract import worker_wire as wire
from runtime.processes import descendants, executable, start, stop_process_tree
from simulation.launch import (
    CONNECTION,
    OFFLINE_ENV,
    STARTUP_TIMEOUT_S,
    flwr_json,
    free_port,
    run_status,
    wait_until_ready,
    write_flower_config,
)

REPO = Path(__file__).resolve().parents[1]
FLWR = executable("flwr")


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    """Poll `predicate` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class Federation:
    """A SuperLink and named SuperNodes in `root`; a context manager that stops them all."""

    def __init__(self, root: Path, tls: Any = None, node_auth: bool = False):
        """`tls`: the CA, certificate and key files (`ca`, `cert`, `key`), or None."""
        self.root = root
        self.tls = tls
        self.node_auth = node_auth
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.cache = root / "cache"  # the nodes' link cache, unless one is given its own
        self.env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(root / "flwr-home")}
        write_flower_config(root / "flwr-home", self.port)
        if tls is not None:  # the CLI's connection: verify the SuperLink against the CA
            config = root / "flwr-home" / "config.toml"
            text = config.read_text().replace("insecure = true", f'root-certificates = "{tls.ca}"')
            config.write_text(text)

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- processes -------------------------------------------------------------------
    def _start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        proc = start(cmd, self.log_path(name), env=env or self.env, cwd=self.root)
        self.procs[name] = proc
        return proc

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def log(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")

    def _tls_args(self) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        return [
            "--ssl-ca-certfile",
            str(self.tls.ca),
            "--ssl-certfile",
            str(self.tls.cert),
            "--ssl-keyfile",
            str(self.tls.key),
        ]

    def start_superlink(self) -> subprocess.Popen:
        cmd = [
            executable("flower-superlink"),
            *self._tls_args(),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.node_auth:
            cmd.append("--enable-supernode-auth")
        proc = self._start("superlink", cmd)
        if self.tls is None:
            wait_until_ready(proc, self.port, self.log_path("superlink"))
        else:
            self._wait_ready_tls(proc)
        return proc

    def _wait_ready_tls(self, proc: subprocess.Popen) -> None:
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        url = f"https://127.0.0.1:{self.port}/health"

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"superlink exited {proc.returncode}:\n{self.log('superlink')}")
            try:
                with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                    return response.status == 200
            except (urllib.error.URLError, OSError):
                return False

        wait_for(ready, STARTUP_TIMEOUT_S, "the TLS SuperLink")

    def start_supernode(
        self,
        name: str,
        partition: int,
        num_partitions: int,
        cache: Path | None = None,
        auth_key: Path | None = None,
    ) -> subprocess.Popen:
        """A SuperNode holding one partition (its ClientApp trains in process); `cache`
        gives it its own link cache (node config `cache-dir`)."""
        tls = ["--insecure"] if self.tls is None else ["--root-certificates", str(self.tls.ca)]
        cmd = [
            executable("flower-supernode"),
            *tls,
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
            "--node-config",
            f"partition-id={partition} num-partitions={num_partitions} "
            f"{wire.CACHE_DIR}='{cache or self.cache}'",
        ]
        if auth_key is not None:
            cmd += ["--auth-supernode-private-key", str(auth_key)]
        return self._start(name, cmd)

    def start_node(
        self, name: str, partitions: str, num_partitions: int, *extra: str
    ) -> subprocess.Popen:
        """The data owner's command (`python -m client.node`): a node worker and one
        SuperNode per partition in `partitions` ("0" or "0,1"); logs in `root/name/`; the
        federation's link cache unless `extra` names a `--cache-dir`."""
        cmd = [
            sys.executable,
            "-m",
            "client.node",
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--insecure",
            "--partition-id",
            partitions,
            "--num-partitions",
            str(num_partitions),
            "--socket",
            str(self.root / f"{name}.sock"),
            "--log-dir",
            str(self.root / name),
        ]
        if "--cache-dir" not in extra:
            cmd += ["--cache-dir", str(self.cache)]
        return self._start(name, [*cmd, *extra])

    def kill(self, name: str) -> None:
        """SIGKILL a process and its children (its process group): a machine dying."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def serverapp_pid(self) -> int | None:
        """The pid of the ServerApp process the SuperLink started for the current run."""
        for pid in descendants([self.procs["superlink"].pid]):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if any(part.endswith(b"flwr-serverapp") for part in cmdline[:2]):
                    return pid
        return None

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            stop_process_tree(proc)
        assert all(p.poll() is not None for p in self.procs.values())

    # --- the CLI ---------------------------------------------------------------------
    def flwr(self, *args: str) -> dict:
        return flwr_json([FLWR, *args, "--format", "json"], self.env)

    def register(self, public_key: Path) -> dict:
        """List a SuperNode's public key with the SuperLink (`flwr supernode register`)."""
        return self.flwr("supernode", "register", str(public_key), CONNECTION)

    def submit(self, run_config: str) -> str:
        """Start the app in this repository with run-config overrides; the run id."""
        return str(self.flwr("run", str(REPO), CONNECTION, "--run-config", run_config)["run-id"])

    def run_log(self, run_id: str) -> str:
        """What the run's ServerApp logged (`flwr log --show`)."""
        cmd = [FLWR, "log", run_id, CONNECTION, "--show"]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True).stdout

    def status(self, run_id: str) -> str:
        return run_status(FLWR, run_id, self.env)[0]

    def wait_finished(self, run_id: str, timeout: float, alive: tuple[str, ...] = ()) -> str:
        """The run's final status; fails early if a process in `alive` dies."""

        def finished() -> str | None:
            for name in alive:
                assert self.procs[name].poll() is None, f"{name} died:\n{self.log(name)[-3000:]}"
            status = self.status(run_id)
            return status if status.startswith("finished") else None

        return wait_for(finished, timeout, f"run {run_id} to finish", poll=2.0)


def read_json(path: Path) -> dict | None:
    """A JSON file being rewritten by another process: None until it parses."""
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads(path.read_text())
    return None
