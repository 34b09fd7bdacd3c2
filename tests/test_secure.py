"""SecAgg+ over the B-only updates: the server gets only the (weighted) sum, a chain works."""

import pytest
import torch
from flwr.app import Context, RecordDict

import client.secure
from client.compose import build_client_app
from contract.config import RunConfig, RunConfigError
from seedlora import relative_error
from server.chain_server import run_chain
from server.compose import build_server
from server.secure import SecureRounds
from simulation.local import RUN_ID, CopyingGrid
from tests import test_app_local as app_tests

overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)


@pytest.mark.integration
def test_secagg_plus_averages_b_and_the_server_sees_no_update(overrides, tmp_path, monkeypatch):
    trained = []  # what each client trained (seen here by the test, never by the server)

    def spy(model_for, msg, context, cfg):
        reply = real(model_for, msg, context, cfg)
        params = reply.content.array_records["fitres.parameters"]
        n = reply.content.metric_records["fitres.num_examples"]["num_examples"]
        trained.append((n, [torch.from_numpy(a.numpy().copy()) for a in params.values()]))
        return reply

    real = client.secure.secure_train
    monkeypatch.setattr(client.secure, "secure_train", spy)
    ov = {**overrides, "secure-aggregation": True, "num-links": 2, "min-available-nodes": 3}
    ov["secagg-max-weight"] = 16.0  # each client holds max-train-blocks = 16 examples
    grid = CopyingGrid(build_client_app(ov), 3)
    server = build_server(RunConfig.from_flower(ov), RUN_ID, tmp_path)
    context = Context(RUN_ID, 0, {}, RecordDict(), {})
    run_chain(server, SecureRounds(grid, context))
    assert len(server.state.links) == 2 and len(trained) == 6
    # every reply the server received carried no update in the clear
    assert all(len(r) == 0 for m in grid.replies for r in m.content.array_records.values())
    errors = []
    for link, clients in zip(server.state.links, (trained[:3], trained[3:]), strict=True):
        total = sum(n for n, _ in clients)
        for i, name in enumerate(link.factors):
            mean = sum(n / total * arrays[i].double() for n, arrays in clients)
            errors.append(relative_error(link.factors[name], mean))
    print(f"SecAgg+ average vs plain weighted mean: max relative error {max(errors):.2e}")
    assert max(errors) <= 1e-3  # SecAgg+ quantizes to 22 bits in [-8, 8]
    assert server.state.history[-1]["central"]["loss"] < server.state.history[0]["central"]["loss"]


def test_secure_aggregation_refuses_what_it_cannot_run():
    for extra in ({"strategy": "fedadam"}, {"dp-clip": 1.0}, {"upload-codec": "int8"}):
        with pytest.raises(RunConfigError, match="secure-aggregation"):
            RunConfig.from_flower({"secure-aggregation": True, **extra})


@pytest.mark.integration
def test_secagg_plus_runs_ffa_as_one_link_of_all_rounds(overrides, tmp_path):
    """ffa has no chain: its SecAgg+ workflow runs num-links x rounds-per-link rounds, once."""
    ov = {**overrides, "secure-aggregation": True, "method": "ffa", "min-available-nodes": 3}
    ov.update({"num-links": 2, "rounds-per-link": 1, "secagg-max-weight": 16.0})
    grid = CopyingGrid(build_client_app(ov), 3)
    server = build_server(RunConfig.from_flower(ov), RUN_ID, tmp_path)
    run_chain(server, SecureRounds(grid, Context(RUN_ID, 0, {}, RecordDict(), {})))
    assert server.state.global_round == 2
    assert len(server.state.links) == 1
    assert [h["link"] for h in server.state.history] == [0, 0]
    assert server.state.history[-1]["central"]["loss"] < server.state.history[0]["central"]["loss"]
