"""The node worker: the relay's channel (protocol, timeouts, errors) in this process, and
the data owner's command (`python -m client.node`) with real Flower processes on
127.0.0.1: one build per link, the same B as the in-process path, a worker killed
mid-round costs one reply, and a killed command leaves nothing running."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from client.worker import Worker, listen
from contract import worker_wire as wire
from runtime.processes import alive, descendants
from seedlora.serialize import state_from_bytes
from simulation.local import run_local
from tests.node_apps import HOLD
from tests.processes import REPO, Federation, read_json, wait_for


def _message(kind: str = "train") -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    content = RecordDict({"config": ConfigRecord({"x": 1})})
    return Message(content, dst_node_id=7, message_type=kind)


def _context(socket_path: Path | None = None) -> Context:
    node = {"partition-id": 3, "num-partitions": 4}
    if socket_path is not None:
        node[wire.WORKER_SOCKET] = str(socket_path)
    return Context(1, 7, node, RecordDict(), {"round-timeout": 5.0})


def _echo_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        context.state["seen"] = ConfigRecord({"partition": context.node_config["partition-id"]})
        return Message(RecordDict({"echo": msg.content["config"]}), reply_to=msg)

    return app


@pytest.fixture
def worker(tmp_path):
    """A Worker serving `_echo_app` on a socket in tmp_path, on a background thread."""
    path = tmp_path / "sock" / "w.sock"
    server = listen(path)
    w = Worker(_echo_app())

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=w.handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield path
    server.close()


def test_the_relay_gets_the_workers_reply_and_node_state(worker):
    msg = _message()
    msg.metadata.__dict__["_message_id"] = "m-1"  # as Flower's run_clientapp sets it
    reply, state = wire.exchange(str(worker), msg, _context(worker), timeout=5.0)
    assert reply.content["echo"]["x"] == 1
    assert reply.metadata.reply_to_message_id == "m-1"
    assert state["seen"]["partition"] == 3  # the node state the worker's app left
    assert oct(worker.stat().st_mode & 0o777) == oct(0o600)
    assert oct(worker.parent.stat().st_mode & 0o777) == oct(0o700)


def test_a_failing_app_is_an_error_the_relay_raises(worker):
    with pytest.raises(wire.WorkerError, match="No evaluate function registered"):
        wire.exchange(str(worker), _message("evaluate"), _context(worker), timeout=5.0)


def test_a_relay_of_another_protocol_is_refused_by_the_worker(worker):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(worker))
        wire.send_frame(sock, json.dumps({"protocol": wire.PROTOCOL + 1}).encode())
        wire.send_frame(sock, b"")
        wire.send_frame(sock, b"")
        header = json.loads(wire.recv_frame(sock))
    assert header["ok"] is False
    assert "protocol mismatch" in header["error"] and wire.NODE_COMMAND in header["error"]


def test_a_worker_of_another_protocol_is_refused_by_the_relay(tmp_path):
    path = tmp_path / "old.sock"
    server = listen(path)

    def old_worker() -> None:
        conn, _ = server.accept()
        with conn:
            for _ in range(3):
                wire.recv_frame(conn)
            wire.send_frame(conn, json.dumps({"protocol": 0, "ok": True}).encode())

    thread = threading.Thread(target=old_worker, daemon=True)
    thread.start()
    try:
        with pytest.raises(wire.WorkerError, match="protocol mismatch.*its peer 0"):
            wire.exchange(str(path), _message(), _context(path), timeout=5.0)
    finally:
        thread.join(5)
        server.close()


def test_no_worker_names_the_command(tmp_path):
    missing = tmp_path / "none.sock"
    with pytest.raises(wire.WorkerError, match=re.escape(wire.NODE_COMMAND)):
        wire.exchange(str(missing), _message(), _context(missing), timeout=1.0)


def test_a_hung_worker_is_given_up_after_the_timeout(tmp_path):
    path = tmp_path / "hung.sock"
    server = listen(path)  # accepts (the backlog) and never answers
    try:
        with pytest.raises(wire.WorkerError, match="no reply within"):
            wire.exchange(str(path), _message(), _context(path), timeout=0.5)
    finally:
        server.close()


@pytest.mark.integration  # a fresh interpreter
def test_the_relay_imports_neither_torch_nor_transformers():
    code = (
        "import sys, client.app; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_relay_without_a_worker_trains_here_and_says_so(caplog):
    from client.relay import Recipe, Relay

    relay = Relay(Recipe())
    relay._trainer, relay._app = object(), _echo_app()  # what this process would build
    msg = _message()
    with caplog.at_level(logging.INFO, logger="flwr"):
        reply = relay(msg, _context())
    assert reply.content["echo"]["x"] == 1
    assert wire.NODE_COMMAND in caplog.text and wire.WORKER_SOCKET in caplog.text


def test_the_relay_without_a_worker_trains_in_process():
    from client.compose import build_client_app

    reply = build_client_app({})(
        Message(RecordDict(), dst_node_id=7, message_type="query.partition"), _context()
    )
    assert reply.content["echo"]["partition-id"] == 3


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--insecure", "--partition-id", "5", "--num-partitions", "2"], "--partition-id"),
        (["--insecure", "--partition-id", "a", "--num-partitions", "2"], "--partition-id"),
        (["--partition-id", "0", "--num-partitions", "2"], "--insecure or --root-certificates"),
        (
            ["--insecure", "--partition-id", "0", "--num-partitions", "1", "--idle-poll", "0"],
            "--idle-poll",
        ),
        (
            [
                "--insecure",
                "--partition-id",
                "0",
                "--num-partitions",
                "1",
                "--socket",
                "/" + "s" * 120,
            ],
            "--socket",
        ),
    ],
)
def test_the_node_command_names_a_bad_flag(argv, named, capsys):
    from client.node import parse

    with pytest.raises(SystemExit) as exit_:
        parse(["--superlink", "127.0.0.1:9092", *argv])
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


# --- real processes -----------------------------------------------------------------------
RUN = (
    "partitioner='iid' num-links=2 rounds-per-link=2 local-steps=2 seq-len=32 "
    "max-train-blocks=16 max-eval-blocks=8 rank=4 alpha=8.0 fraction-evaluate=1.0 "
    "export=false a-kind='gaussian' save-client-updates=true"
)


def _worker_lines(log_dir: Path) -> list[dict]:
    text = "".join(p.read_text() for p in sorted(log_dir.glob("worker*.log")))
    return [json.loads(m) for m in re.findall(r" message (\{.*\})", text)]


@pytest.mark.integration
def test_deployed_node_builds_once_per_link_and_matches_the_in_process_b(
    tmp_path, tiny_lm_dir, tiny_text_dir
):
    data = f"model-name='{tiny_lm_dir}' dataset='{tiny_text_dir}' "
    out = tmp_path / "outputs"
    with Federation(tmp_path) as fed:
        fed.start_superlink()
        fed.start_node("owner", "0,1", 2, "--workers", "host")  # one worker, both nodes
        run_id = fed.submit(f"{data}{RUN} output-dir='{out}' run-name='dep'")
        status = fed.wait_finished(run_id, 600, alive=("owner",))
        assert status == "finished:completed", fed.log("superlink")[-3000:]
    lines = _worker_lines(tmp_path / "owner")
    # 4 rounds x 2 nodes (client-eval with-train: each train message also evaluates) and
    # the final model's evaluation, all on one worker
    assert [x["type"] for x in lines].count("train") == 8 and len(lines) == 10
    assert lines[-1]["builds"] == 2  # one resident model per link for both nodes
    assert lines[-1]["tokenized"] == {"train": 2, "eval": 2}  # each partition once a split

    overrides = dict(pair.split("=", 1) for pair in f"{data}{RUN}".replace("'", "").split())
    local = run_local(overrides, 2, out_dir=tmp_path / "local", fresh_cache=True)
    for round_file in ("round-0001.safetensors", "round-0004.safetensors"):
        deployed, _ = state_from_bytes((out / "dep" / "client-updates" / round_file).read_bytes())
        inproc, _ = state_from_bytes((local.run_dir / "client-updates" / round_file).read_bytes())
        assert deployed.keys() == inproc.keys()
        for key, value in deployed.items():
            assert value.dtype == inproc[key].dtype
            assert value.equal(inproc[key]), key  # bit for bit


def _worker_pid(log_dir: Path, after: int = 0) -> int | None:
    text = "".join(p.read_text() for p in sorted(log_dir.glob("worker*.log")))
    pids = [int(p) for p in re.findall(r"ready on .* \(pid (\d+)", text)]
    return pids[-1] if len(pids) > after else None


@pytest.mark.integration
def test_a_worker_killed_mid_round_costs_that_round_only(tmp_path, tiny_lm_dir, tiny_text_dir):
    out = tmp_path / "outputs"
    config = (
        f"model-name='{tiny_lm_dir}' dataset='{tiny_text_dir}' partitioner='iid' "
        f"output-dir='{out}' run-name='kill' num-links=1 rounds-per-link=3 local-steps=2 "
        "seq-len=32 max-train-blocks=16 max-eval-blocks=8 rank=4 alpha=8.0 "
        "fraction-evaluate=0.0 export=false min-replies=1"
    )
    logs, hold = tmp_path / "killed", tmp_path / "held"
    with Federation(tmp_path) as fed:
        fed.start_superlink()
        fed.start_node("healthy", "0", 2)
        fed.env[HOLD] = str(hold)  # the second train message waits: the worker is mid-round
        fed.env["PYTHONPATH"] = str(REPO)  # the worker imports tests.node_apps
        fed.start_node("killed", "1", 2, "--worker-app", "tests.node_apps:held_second_train")
        first = wait_for(lambda: _worker_pid(logs), 120, "the worker to listen")
        run_id = fed.submit(config)
        wait_for(hold.exists, 300, "round 2 at the worker")
        os.kill(first, signal.SIGKILL)
        second = wait_for(lambda: _worker_pid(logs, after=1), 120, "the restarted worker")
        assert second != first
        status = fed.wait_finished(run_id, 600, alive=("healthy", "killed"))
        assert status == "finished:completed", fed.log("superlink")[-3000:]
    rounds = read_json(out / "kill" / "metrics.json")["rounds"]
    accepted = [r["accepted"] for r in rounds[1:]]
    assert accepted == [2, 1, 2], rounds  # the killed round lost one reply, the next had both


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_stopping_the_node_command_stops_all_it_started(tmp_path, sig):
    with Federation(tmp_path) as fed:
        fed.start_superlink()
        node = fed.start_node("owner", "0,1", 2)
        wait_for(lambda: len(list(tmp_path.glob("owner*.sock"))) == 2, 120, "a worker each")
        wait_for(
            lambda: len(list((tmp_path / "owner").glob("supernode-*.log"))) == 2, 60, "supernodes"
        )
        children = descendants([node.pid])
        assert len(children) >= 4  # a worker per partition, two supernodes (and their children)
        os.kill(node.pid, sig)
        code = node.wait(timeout=60)
        wait_for(lambda: not any(alive(p) for p in children), 60, "the children to exit")
    socks = [tmp_path / f"owner-{p}.sock" for p in (0, 1)]
    if sig == signal.SIGTERM:  # a clean stop: its exit code, and the sockets removed
        assert code == 128 + signal.SIGTERM and not any(s.exists() for s in socks)
    else:  # no clean-up ran: the parent-death signal stopped the children
        assert not any(s.exists() and _connectable(s) for s in socks)


def _connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def test_the_relays_timeout_key_and_default_are_the_run_configs():
    """The relay reads round-timeout without importing the config model (pydantic) in
    every ClientApp process: its copy of the key and default must stay the config's."""
    from client.relay import DEFAULT_TIMEOUT_S, ROUND_TIMEOUT
    from contract.config import RunConfig

    defaults = RunConfig().to_flower()
    assert defaults[ROUND_TIMEOUT] == DEFAULT_TIMEOUT_S
