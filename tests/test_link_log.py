"""The run directory does not grow per round with the chain (issue 18): a checkpoint of the
same size at 1 link and at 6, the link log written once per link, and a resume that gives
the same chain after a crash at every point of close_link."""

import json

import pytest

from client.compose import build_client_app
from contract.config import RunConfig, RunConfigError
from seedlora.spec import SCALE_RULE
from server import checkpoint, report
from server.chain_server import ChainServer, run_chain
from server.compose import build_server
from server.rounds import FlowerRounds
from server.state import ChainState
from server.store import RunStore
from simulation.local import RUN_ID, LocalGrid

pytestmark = pytest.mark.integration  # federated rounds in process (the unit tests of the
# checkpoint and link log are in test_checkpoint.py, of the client cache in test_link_cache.py)


@pytest.fixture(scope="module")
def overrides(tiny_lm_dir, tiny_text_dir):
    return {
        "model-name": tiny_lm_dir,
        "dataset": tiny_text_dir,
        "partitioner": "iid",
        "num-links": 2,
        "rounds-per-link": 1,
        "local-steps": 1,
        "seq-len": 32,
        "max-train-blocks": 8,
        "max-eval-blocks": 4,
        "rank": 4,
        "alpha": 8.0,
        "a-kind": "gaussian",
        "fraction-evaluate": 0.0,
        "export": False,
    }


def run(overrides, out, grid=None, **extra) -> tuple[ChainServer, LocalGrid]:
    ov = {**overrides, **extra}
    grid = grid or LocalGrid(build_client_app(ov), 2)
    server = build_server(RunConfig.from_flower(ov), RUN_ID, out)
    run_chain(server, FlowerRounds(grid))
    return server, grid


def link_files(out) -> list[str]:
    return sorted(p.name for p in (out / checkpoint.LINKS).iterdir())


@pytest.fixture(scope="module")
def reference(overrides, tmp_path_factory) -> str:
    """The links digest of the uninterrupted run."""
    server, _ = run(overrides, tmp_path_factory.mktemp("reference"))
    return server.state.links.digest


def test_the_checkpoint_size_does_not_depend_on_the_number_of_links(overrides, tmp_path):
    sizes, logs = {}, {}
    for links in (1, 6):
        out = tmp_path / str(links)
        run(overrides, out, **{"num-links": links})
        sizes[links] = (out / checkpoint.FILE).stat().st_size
        logs[links] = link_files(out)
        assert len(report.read_rounds(out / report.ROUNDS)) == links + 1  # round 0 too
        doc = json.loads((out / "metrics.json").read_text())
        assert doc["links_merged"] == links and len(doc["rounds"]) == links + 1
    assert abs(sizes[6] - sizes[1]) <= 8, sizes
    assert logs[6] == [f"{i:05d}.safetensors" for i in range(6)] and logs[1] == logs[6][:1]
    link_sizes = {(tmp_path / "6" / "links" / name).stat().st_size for name in logs[6]}
    assert len(link_sizes) == 1  # every link file holds one link


def _fail(*args, **kwargs):
    raise KeyboardInterrupt("simulated crash")


def _crash_when(condition):
    """A writer that dies when `condition(*args)` holds and otherwise does what `real` does."""

    def wrap(real):
        def writer(*args, **kwargs):
            if condition(*args):
                _fail()
            return real(*args, **kwargs)

        return writer

    return wrap


# Where close_link of link 0 dies (its round is done and checkpointed): the steps of
# checkpoint.save (link file, checkpoint bytes, rename to .prev then write), metrics.json,
# and the next link's first round.
POINTS = [
    "before-link-file",
    "between-link-file-and-checkpoint",
    "checkpoint-moved-to-prev",
    "before-metrics",
    "next-round",
]


@pytest.mark.parametrize("point", POINTS)
def test_resume_after_a_crash_anywhere_in_close_link(
    overrides, tmp_path, monkeypatch, reference, point
):
    out = tmp_path / "run"
    first_link = lambda *a: checkpoint.link_path(out, 0).exists()  # noqa: E731
    grid = LocalGrid(build_client_app(overrides), 2)
    with monkeypatch.context() as m:
        if point == "before-link-file":
            m.setattr(checkpoint, "link_to_bytes", _fail)
        elif point == "between-link-file-and-checkpoint":
            m.setattr(
                checkpoint, "state_to_bytes", _crash_when(first_link)(checkpoint.state_to_bytes)
            )
        elif point == "checkpoint-moved-to-prev":
            final = lambda path, data: path.name == checkpoint.FILE and first_link()  # noqa: E731
            m.setattr(
                checkpoint, "atomic_write_bytes", _crash_when(final)(checkpoint.atomic_write_bytes)
            )
        elif point == "before-metrics":
            merged = lambda path, doc: doc["links_merged"] == 1  # noqa: E731
            m.setattr(report, "write_metrics", _crash_when(merged)(report.write_metrics))
        else:
            grid.fail_after = 1
        with pytest.raises(KeyboardInterrupt):
            run(overrides, out, grid=grid)
    crashed = checkpoint.load(out)
    expect_links = 1 if point in ("before-metrics", "next-round") else 0
    assert len(crashed.links) == expect_links and crashed.global_round == 1
    if expect_links == 0 and checkpoint.link_path(out, 0).exists():
        # a link file no checkpoint counts: the resumed run must not trust it (here it is
        # damaged; after a .prev fallback it could be a link the run will merge differently)
        checkpoint.link_path(out, 0).write_bytes(b"not this run's link 0")
    resumed, grid = run(overrides, out, resume=True)
    assert grid.rounds_sent == 1  # link 0's round is not run again
    assert resumed.state.links.digest == reference
    assert checkpoint.load(out).links.digest == reference
    assert link_files(out) == ["00000.safetensors", "00001.safetensors"]
    rounds = [r["round"] for r in json.loads((out / "metrics.json").read_text())["rounds"]]
    assert rounds == [0, 1, 2]  # none lost, none twice
    assert [r["round"] for r in report.read_rounds(out / report.ROUNDS)] == rounds


def test_a_round_logged_after_its_checkpoint_is_not_listed_twice(overrides, tmp_path, monkeypatch):
    """rounds.jsonl gets the round before the checkpoint does: a crash between the two runs
    the round again on resume, and the history keeps one entry for it."""
    out = tmp_path / "run"
    round_two = lambda directory, state: state.global_round == 2  # noqa: E731
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "save", _crash_when(round_two)(checkpoint.save))
        with pytest.raises(KeyboardInterrupt):
            run(overrides, out)
    assert [r["round"] for r in report.read_rounds(out / report.ROUNDS)] == [0, 1, 2]
    with open(out / report.ROUNDS, "a") as f:
        f.write('{"round": 3, "link"')  # and a line cut short by the crash
    _, grid = run(overrides, out, resume=True)
    assert grid.rounds_sent == 1
    assert [r["round"] for r in report.read_rounds(out / report.ROUNDS)] == [0, 1, 2]


def test_metrics_at_a_link_close_do_not_grow_with_the_chain(overrides, tmp_path, monkeypatch):
    """A link close writes a progress metrics.json of constant size (that link's rounds and
    a pointer to rounds.jsonl); the end writes every round."""
    ov = {**overrides, "rounds-per-link": 2}
    seen = []
    real = RunStore.write_metrics

    def spy(self, state, stopped=None, progress=False):
        real(self, state, stopped, progress)
        text = (self.out_dir / "metrics.json").read_text()
        seen.append((progress, len(text), json.loads(text)))

    monkeypatch.setattr(RunStore, "write_metrics", spy)
    run(ov, tmp_path, **{"num-links": 4})
    closes = [(size, doc) for progress, size, doc in seen if progress]
    assert len(closes) == 4
    for k, (_, doc) in enumerate(closes, start=1):
        assert doc["in_progress"] and doc["links_merged"] == k and "rounds" not in doc
        assert doc["rounds_so_far"] == 2 * k + 1 and doc["rounds_file"] == report.ROUNDS
        assert [r["round"] for r in doc["recent_rounds"]] == [2 * k - 1, 2 * k]
    sizes = [size for size, _ in closes]
    assert max(sizes) - min(sizes) < 200, sizes  # digits and floats, not history
    final = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["round"] for r in final["rounds"]] == list(range(9)) and "in_progress" not in final


def resume_as_before(overrides, out, kind: str, **before) -> tuple[RunConfig, ChainState]:
    """Run a chain of `kind`, then make its checkpoint look as one written before a rule was
    recorded (`before`: the ChainState fields, e.g. scale=""); the resume config and state."""
    ov = {**overrides, "a-kind": kind}
    run(ov, out)
    old = checkpoint.load(out)
    for field, value in before.items():
        setattr(old, field, value)
    checkpoint.save(out, old)
    return RunConfig.from_flower({**ov, "resume": True}), old


@pytest.mark.parametrize("kind", ["gaussian", "circulant"])
def test_resume_refuses_links_merged_under_another_scale(overrides, tmp_path, kind):
    """A checkpoint from before the gaussian gain (no scale recorded) rebuilds to another base
    for a gaussian A: resuming it is refused, naming `resume`; block kinds (gain 1) resume
    and record the current rule."""
    resumed, _ = resume_as_before(overrides, tmp_path, kind, scale="")
    if kind == "gaussian":
        with pytest.raises(RunConfigError, match="resume: .*another adapter scale"):
            build_server(resumed, RUN_ID, tmp_path)
        assert checkpoint.load(tmp_path).scale == ""  # nothing was overwritten
    else:
        server = build_server(resumed, RUN_ID, tmp_path)
        assert server.state.scale == SCALE_RULE and len(server.state.links) == 2


@pytest.mark.parametrize("kind", ["gaussian", "random-block", "circulant"])
def test_resume_refuses_a_run_made_under_another_a_rule(overrides, tmp_path, kind):
    """A checkpoint from before the A rule was recorded (legacy torch generator) derives
    other A's for a drawn kind: resuming it is refused, naming the A rule and what to do;
    circulant draws nothing, so it resumes and records the current rule. A link of the log
    made under the old rule is refused likewise."""
    from seedlora.spec import A_RULE
    from tests.test_a_rule import legacy_file

    resumed, old = resume_as_before(overrides, tmp_path, kind, a_rule="")
    if kind == "circulant":
        server = build_server(resumed, RUN_ID, tmp_path)
        assert server.state.a_rule == A_RULE and len(server.state.links) == 2
        return
    with pytest.raises(RunConfigError, match="resume: this run's checkpoint was made under A rule"):
        build_server(resumed, RUN_ID, tmp_path)
    assert checkpoint.load(tmp_path).a_rule == ""  # nothing was overwritten
    old.a_rule = A_RULE
    checkpoint.save(tmp_path, old)
    path = checkpoint.link_path(tmp_path, 0)
    path.write_bytes(legacy_file(old.links[0], 0, old.links.prefix_digest(0)))
    with pytest.raises(RunConfigError, match="resume: link 0 was made under A rule 'torch-v1'"):
        build_server(resumed, RUN_ID, tmp_path)
