"""Security of the deployment: TLS with a CA made in the test, SuperNode authentication
(only registered public keys may join), and no pickle on any path that receives data."""

import ast
import json
import pickle
import re
import urllib.request
from pathlib import Path

import pytest

from seedlora.serialize import CorruptFileError, links_from_bytes, state_from_bytes
from server import checkpoint
from tests.certs import make_node_key, make_tls
from tests.processes import REPO, Federation, wait_for

# Modules that decode what arrives from the network or from disk.
RECEIVING = [
    "seedlora/serialize.py",
    "server/checkpoint.py",
    "client/links.py",
    "client/app.py",
    "strategies/validation.py",
    "strategies/chain.py",
    "strategies/uploads.py",
    "strategies/replies.py",
    "strategies/outgoing.py",
    "strategies/outliers.py",
    "tasks/models.py",
]


@pytest.mark.integration
def test_tls_and_node_auth_refuse_an_unlisted_node_and_train_a_listed_one(
    tmp_path, tiny_lm_dir, tiny_text_dir
):
    tls = make_tls(tmp_path / "certs")
    listed, listed_pub = make_node_key(tmp_path / "keys", "listed")
    unlisted, _ = make_node_key(tmp_path / "keys", "unlisted")
    out = tmp_path / "outputs"
    config = (
        f"model-name='{tiny_lm_dir}' dataset='{tiny_text_dir}' partitioner='iid' "
        f"output-dir='{out}' run-name='tls' num-links=1 rounds-per-link=1 local-steps=1 "
        "seq-len=32 max-train-blocks=8 max-eval-blocks=8 rank=4 alpha=8.0 "
        "min-available-nodes=1 fraction-evaluate=0.0 central-eval=false export=false"
    )
    with Federation(tmp_path, tls=tls, node_auth=True) as fed:
        fed.start_superlink()
        fed.register(listed_pub)
        fed.start_supernode("listed", 0, 1, auth_key=listed)
        intruder = fed.start_supernode("unlisted", 0, 1, auth_key=unlisted)
        node = int(
            wait_for(
                lambda: re.search(r"SuperNode ID: (\d+)", fed.log("listed")), 120, "listed node"
            ).group(1)
        )
        wait_for(lambda: intruder.poll() is not None, 120, "the unlisted node to be refused")
        refused = fed.log("unlisted")
        with pytest.raises(OSError):  # no plaintext HTTP next to TLS
            urllib.request.urlopen(f"http://127.0.0.1:{fed.port}/health", timeout=5)
        nodes = fed.flwr("supernode", "list", "launch")
        run_id = fed.submit(config)
        status = fed.wait_finished(run_id, 300, alive=("superlink", "listed"))
        assert status == "finished:completed", fed.run_log(run_id)[-3000:]
    assert intruder.returncode != 0 and "SuperNode ID" not in refused, refused[-2000:]
    assert "Failed to activate SuperNode" in refused  # its key is not registered
    listed_ids = {int(n["node-id"]) for n in nodes["nodes"] if n.get("status") == "online"}
    assert listed_ids == {node}, nodes
    rounds = json.loads((out / "tls" / "metrics.json").read_text())["rounds"]
    assert rounds[1]["accepted"] == 1 and not rounds[1]["rejected"]


def test_no_pickle_on_receiving_paths():
    """No pickle, eval or unrestricted torch.load where data is decoded."""
    for rel in RECEIVING:
        path = REPO / rel
        if not path.exists():
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                assert not any("pickle" in n or n == "dill" for n in names), rel
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                assert name not in ("eval", "exec", "pickle.loads", "torch.load") or (
                    name == "torch.load"
                    and any(
                        k.arg == "weights_only" and ast.unparse(k.value) == "True"
                        for k in node.keywords
                    )
                ), f"{rel}: {name}"


class Boom:
    """Unpickling this would write a file: the proof that code ran."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "code ran"))


@pytest.mark.parametrize("reader", ["state", "links", "checkpoint"])
def test_a_crafted_pickle_payload_is_rejected_without_running(tmp_path, reader):
    proof = tmp_path / "proof"
    payload = pickle.dumps({"x": Boom(proof)})
    # also disguised as a torch.save file and behind a valid-looking safetensors length prefix
    for data in (payload, len(payload).to_bytes(8, "little") + payload):
        if reader == "checkpoint":
            (tmp_path / checkpoint.FILE).write_bytes(data)
            with pytest.raises(FileNotFoundError, match="no usable checkpoint"):
                checkpoint.load(tmp_path)
        else:
            decode = state_from_bytes if reader == "state" else links_from_bytes
            with pytest.raises(CorruptFileError):
                decode(data)
    assert not proof.exists()


def test_a_pickled_array_in_a_reply_is_rejected_without_running(tmp_path):
    """The reply path: an `object` .npy (numpy's pickle) inside a Flower Array."""
    import io

    import numpy as np
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from contract import protocol as p
    from strategies.rejections import BadArrays
    from strategies.validation import Expectation, check_arrays, check_envelope

    proof = tmp_path / "proof"
    buffer = io.BytesIO()
    np.save(buffer, np.array([Boom(proof)], dtype=object), allow_pickle=True)
    evil = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    with pytest.raises(ValueError, match="pickle"):
        evil.numpy()  # Flower decodes with allow_pickle=False
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 0
    sent = Message(RecordDict(), dst_node_id=3, message_type="train")
    echo = {p.RUN_ID: 7, p.CHAIN_INDEX: 0, p.LINKS_DIGEST: "d" * 64}
    reply = Message(
        RecordDict(
            {
                p.ARRAYS: ArrayRecord({"l.lora_B": evil}),
                p.METRICS: MetricRecord({p.NUM_EXAMPLES: 4}),
                p.ECHO: ConfigRecord(echo),
            }
        ),
        reply_to=sent,
    )
    exp = Expectation(7, 0, "d" * 64, {"l.lora_B": ((1,), "float32")}, 100)
    check_envelope(reply, exp)
    with pytest.raises(BadArrays) as err:  # a rejection with a reason, not a crashed round
        check_arrays(reply, exp)
    assert err.value.reason.startswith("undecodable arrays") and "pickle" in err.value.reason
    assert not proof.exists()
    # bytes that disagree with the header (float64[3] under a float32[1] header)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3), allow_pickle=False)
    liar = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    reply.content[p.ARRAYS] = ArrayRecord({"l.lora_B": liar})
    with pytest.raises(BadArrays, match="header says float32"):
        check_arrays(reply, exp)
