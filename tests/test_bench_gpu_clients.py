"""bench.gpu_clients end to end on its --tiny preset (CPU, logical GPUs), and its arithmetic.

Why: the GPU run happens once, on a machine this repository's CI never sees; the script
must be known to work, and its figures to mean what they say, before it gets there.
"""

import json
import math
from pathlib import Path

import pytest

from bench import gpu_clients


def test_trained_tokens_and_union():
    assert gpu_clients.trained_tokens(40, 4, 10, 512) == 40 * 512
    assert gpu_clients.trained_tokens(5, 2, 4, 10) == (2 + 2 + 1 + 2) * 10  # short last batch
    assert gpu_clients.trained_tokens(0, 2, 4, 10) == 0
    assert gpu_clients.union_length([(0, 2), (1, 3), (5, 6)]) == 4
    assert gpu_clients.union_length([(0, 10), (2, 3)]) == 10


@pytest.mark.bench
@pytest.mark.integration  # Ray (run_simulation) and a subprocess per run
def test_tiny_run_writes_every_figure(tmp_path: Path):
    assert gpu_clients.main(["--tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_clients.json").read_text())
    assert {"environment", "options", "model", "floor", "ray", "a_digests", "comparison"} <= set(
        data
    )
    assert data["environment"]["commit"] and data["environment"]["torch"]
    opts, ov = data["options"], data["run_config"]
    assert opts["clients"] == [1, 2] and opts["gpus"] == [1] and opts["model"] == "tiny"
    assert data["model"]["params"] > 0
    per_client = ov["local-steps"] * ov["batch-size"] * ov["seq-len"]
    rounds_per_run = ov["rounds-per-link"]
    for mode, runs in (("floor", data["floor"]), ("ray", data["ray"]["1"])):
        assert set(runs) == {"1", "2"}
        for n, run in runs.items():
            assert run["completed"] and run["all_accepted"], (mode, n, run.get("why"))
            assert run["steady_rounds"] == list(range(2, rounds_per_run + 1))
            rounds = {r["round"]: r for r in run["rounds"]}
            assert len(rounds) == rounds_per_run
            for r in rounds.values():
                assert r["clients"] == int(n) and r["tokens"] == int(n) * per_client
                assert math.isclose(sum(r["split_s"].values()), r["round_s"], rel_tol=1e-9)
                assert r["split_s"]["client_compute"] > 0
                assert r["split_s"]["server_and_aggregation"] >= 0
            steady = [rounds[k] for k in run["steady_rounds"]]
            expected = sum(r["tokens"] for r in steady) / sum(r["round_s"] for r in steady)
            assert math.isclose(run["tokens_per_s"], expected)
            assert run["gpu_memory_grows"] is False
        assert runs["2"]["rounds"][0]["pids"] != [] and len(runs["1"]["rounds"][0]["pids"]) == 1
    for n, run in data["ray"]["1"].items():  # 1/N of Ray's (logical) GPU each, all at once
        assert run["client_resources"]["num_gpus"] == 1 / int(n)
        assert run["logical_gpus"] is True
        assert run["rounds"][-1]["ray_gpu_ids"] == ["0"]
        assert len(run["rounds"][-1]["pids"]) == int(n)  # one actor per client
    assert len(data["floor"]["2"]["rounds"][-1]["pids"]) == 1  # the floor: one process
    digests = data["a_digests"]
    assert digests["specs"] == len(gpu_clients.DIGEST_SPECS)
    assert digests["moved_equal"] is True and digests["equal_to_reference"] is True
    (row,) = [r for r in data["comparison"] if r["clients"] == 2]
    assert math.isclose(
        row["ray_1gpu_per_gpu_over_floor"],
        data["ray"]["1"]["2"]["tokens_per_s"] / data["floor"]["2"]["tokens_per_s"],
    )
