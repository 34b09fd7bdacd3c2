"""LinkSpec: the one record that defines a link, sent whole, taken by the client alone."""

import json

import pydantic
import pytest
from flwr.app import ConfigRecord

from client.compose import build_client_app, build_trainer
from client.model import link_spec
from contract import protocol as p
from contract.config import AdapterConfig, RunConfig
from contract.link_spec import LinkSpec, LinkSpecError
from seedlora.names import A_RULE, SCALE_RULE
from server.outcome import RunFailed
from simulation.local import run_local
from tasks import build_task
from tests import test_app_local as app_tests

overrides = app_tests.overrides  # the in-process app fixture (tiny LM, tiny dataset)


def embedded_spec(chain_index: int = 0) -> LinkSpec:
    task = build_task(RunConfig().task_config())
    return LinkSpec.of(RunConfig().adapter, task.target_modules, task.modules_to_save, chain_index)


def test_a_spec_goes_through_the_wire_unchanged_and_small():
    spec = embedded_spec(chain_index=2)
    text = spec.to_wire()
    assert LinkSpec.from_wire(text) == spec and LinkSpec.from_wire(text).to_wire() == text
    assert spec.a_rule == A_RULE and spec.scale_rule == SCALE_RULE and spec.a_kind != "auto"
    assert len(text.encode()) < 400  # compact JSON, one config string (242 bytes here)
    regex = LinkSpec.of(AdapterConfig(target_modules="re:.*attn.*"), ["x"], [], 1)
    assert regex.targets == ".*attn.*" and LinkSpec.from_wire(regex.to_wire()) == regex
    assert spec.at(5).chain_index == 5 and spec.at(5).at(2) == spec


def test_a_spec_is_frozen_and_hashable():
    spec = embedded_spec()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        spec.rank = 2  # type: ignore[misc]
    assert hash(spec) == hash(LinkSpec.from_wire(spec.to_wire()))


@pytest.mark.parametrize(
    "change, named",
    [
        ({"drop": "rank"}, "missing field 'rank'"),
        ({"add": "bogus"}, "unknown field 'bogus'"),
        ({"set": ("rank", "4")}, "field 'rank'"),
        ({"set": ("a_kind", "auto")}, "field 'a_kind'"),
        ({"set": ("chain_index", -1)}, "field 'chain_index'"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_field(change, named):
    fields = json.loads(embedded_spec().to_wire())
    if "drop" in change:
        del fields[change["drop"]]
    if "add" in change:
        fields[change["add"]] = 1
    if "set" in change:
        key, value = change["set"]
        fields[key] = value
    with pytest.raises(LinkSpecError, match=named):
        LinkSpec.from_wire(json.dumps(fields))
    with pytest.raises(LinkSpecError, match="missing from the message's config"):
        LinkSpec.from_wire(None)
    with pytest.raises(LinkSpecError, match="not JSON"):
        LinkSpec.from_wire("{")


def test_the_client_refuses_a_spec_of_another_a_or_scale_rule():
    spec = LinkSpec.of(AdapterConfig(a_kind="gaussian"), ["x"], [])
    assert link_spec(ConfigRecord({p.LINK_SPEC: spec.to_wire()})) == spec
    old_a = spec.model_copy(update={"a_rule": "torch-v1"})
    with pytest.raises(LinkSpecError, match="A rule 'torch-v1'"):
        link_spec(ConfigRecord({p.LINK_SPEC: old_a.to_wire()}))
    old_scale = spec.model_copy(update={"scale_rule": "alpha/r"})
    with pytest.raises(LinkSpecError, match="scales A by 'alpha/r'"):
        link_spec(ConfigRecord({p.LINK_SPEC: old_scale.to_wire()}))


def test_the_client_builds_the_link_from_the_spec_alone(overrides):
    """A client whose own run config names another method, A kind, rank, alpha, targets,
    heads, frozen factor and dropout trains exactly what a client with the server's config
    trains: the server's link (its A digest matches, the losses and links are the same)."""
    ov = {**overrides, "num-links": 2}
    mine = {
        **ov,
        "method": "ffa",
        "a-kind": "gaussian",
        "rank": 2,
        "alpha": 3.0,
        "target-modules": "c_attn",
        "modules-to-save": "none",
        "adapter-dropout": 0.1,
        "frozen-factor": "B",
    }
    same = run_local(ov, 2, fresh_cache=True).metrics
    trainer = build_trainer(mine)
    other = run_local(ov, 2, client_app=trainer.app(), fresh_cache=True).metrics
    key = trainer.resident.key
    assert key is not None and (key.method, key.kind, key.rank, key.alpha) == (
        "seedlora",
        "circulant",
        4,
        8.0,
    )
    assert (key.frozen, key.dropout, key.chain_index) == ("A", 0.0, 1)
    assert other["links_digest"] == same["links_digest"]
    assert all(r["accepted"] == 2 for r in other["rounds"][1:])
    losses = [[r.get("train_loss") for r in m["rounds"]] for m in (same, other)]
    assert losses[0] == losses[1] and None not in losses[0][1:]


def test_a_spec_with_an_unknown_field_fails_the_run_naming_it(overrides):
    app = build_client_app(overrides)

    def client(msg, context):
        config = msg.content.config_records.get(p.CONFIG)
        if config is not None and p.LINK_SPEC in config:
            config[p.LINK_SPEC] = json.dumps({**json.loads(config[p.LINK_SPEC]), "bogus": 1})
        return app(msg, context)

    with pytest.raises(RunFailed, match="unknown field 'bogus'"):
        run_local(overrides, 2, client_app=client)
