"""Run config: pyproject and RunConfig agree; every bad value fails naming its key."""

import tomllib
from pathlib import Path

import pytest

from contract.config import STRATEGIES, RunConfig, RunConfigError
from strategies.registry import BUILDERS, build_strategy

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def pyproject_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


def test_pyproject_config_is_exactly_the_defaults():
    assert pyproject_config() == RunConfig().to_flower()
    assert RunConfig.from_flower(pyproject_config()) == RunConfig()


BAD = [
    ("strategy", "fedfoo"),
    ("a-kind", "dense"),
    ("rank", 0),
    ("rank", -3),
    ("num-links", 0),
    ("rounds-per-link", 0),
    ("fraction-train", 0.0),
    ("fraction-train", 1.5),
    ("fraction-evaluate", -0.1),
    ("alpha", 0),
    ("lr", -1.0),
    ("batch-size", 0),
    ("dirichlet-alpha", 0.0),
    ("trim-beta", 0.5),
    ("server-momentum", 1.0),
    ("min-replies", 0),
    ("optimizer", "lion"),
    ("task", "vision"),
    ("partitioner", "shards"),
    ("adapter-dropout", 1.0),
    ("round-timeout", 0),
    ("round-timeout", -5.0),
    ("max-num-examples", 0),
    ("outlier-mad", -1.0),
    ("outlier-action", "ban"),
    ("min-available-nodes", 0),
    ("local-steps", -1),
    ("local-epochs", 0.0),
    ("seq-len", 4),
    ("krum-select", 0),
    ("num-malicious", -1),
    ("eval-batch-size", 0),
    ("max-grad-norm", -1.0),
    ("weight-decay", -0.1),
    ("rank", "eight"),
    ("num-links", 2.5),
    ("method", "lora"),
]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_bad_value_names_the_key(key, value):
    with pytest.raises(RunConfigError, match=f"'{key}'"):
        RunConfig.from_flower({**pyproject_config(), key: value})


def test_unknown_key_and_bad_device():
    with pytest.raises(RunConfigError, match="nosuchkey"):
        RunConfig.from_flower({"nosuchkey": 1})
    with pytest.raises(RunConfigError, match="device"):
        RunConfig.from_flower({"device": "tpu"})


def test_every_strategy_builds_with_its_keys():
    assert set(BUILDERS) == set(STRATEGIES)
    for name in STRATEGIES:
        cfg = RunConfig(strategy=name, proximal_mu=0.1, trim_beta=0.1, num_malicious=1)
        assert build_strategy(cfg.strategy) is not build_strategy(
            cfg.strategy
        )  # a fresh one per link
    prox = build_strategy(RunConfig(strategy="fedprox", proximal_mu=0.25).strategy)
    assert prox.proximal_mu == 0.25
    adam = build_strategy(RunConfig(strategy="fedadam", eta=0.5, beta_1=0.7).strategy)
    assert (adam.eta, adam.beta_1) == (0.5, 0.7)


def test_targets_and_heads_parsing():
    assert RunConfig().adapter.targets(("a", "b")) == ["a", "b"]
    assert RunConfig(target_modules="re:.*q_proj").adapter.targets(()) == ".*q_proj"
    assert RunConfig(target_modules="q_proj, v_proj").adapter.targets(()) == ["q_proj", "v_proj"]
    assert RunConfig(modules_to_save="none").adapter.heads(("score",)) == []
    assert RunConfig().adapter.heads(("score",)) == ["score"]


def test_readme_documents_every_key_with_its_default():
    from contract.tables import markdown_table

    readme = (PYPROJECT.parent / "README.md").read_text()
    assert markdown_table() in readme


def test_readme_starts_with_the_two_commands_ci_uses():
    readme = (PYPROJECT.parent / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and "simulation.launch" in block[0]
    ci = (PYPROJECT.parent / ".ci" / "run").read_text()
    assert block[1] in ci


def test_bad_config_fails_before_any_node_is_contacted():
    """The ServerApp validates the run config first: the grid is never touched."""
    from flwr.app import Context, RecordDict

    from server.app import build_server_app

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"grid.{name} used before the config was validated")

    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=pyproject_config()
    )
    with pytest.raises(RunConfigError, match="'round-timeout'"):
        build_server_app({"round-timeout": -1})(grid=Untouchable(), context=context)


def test_eta_l_is_gone():
    """Flower's FedOpt only logs eta_l (clients train with lr): no key pretends otherwise."""
    from strategies.registry import build_strategy

    with pytest.raises(RunConfigError, match="unknown run-config key.*eta-l"):
        RunConfig.from_flower({"eta-l": 0.1})
    readme = (PYPROJECT.parent / "README.md").read_text()
    assert "eta-l" not in pyproject_config() and "| `eta-l` |" not in readme
    cfg = RunConfig.from_flower({"strategy": "fedadam", "lr": 0.004})
    assert cfg.train.lr == 0.004 and build_strategy(cfg.strategy).eta == cfg.strategy.eta
