"""The docs: generated pages are current, the README is a front page, and links resolve.

`python docs/generate.py --check` is what CI relies on to fail on a stale results page or
config table; this test runs it, so `python -m pytest -q` (CI's command) does.
"""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 350
COMMANDS = (
    'pip install -c constraints.txt -e ".[dev]" && python -m simulation.launch',
    "python -m pytest -q",
)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lowercased, punctuation dropped, spaces to -."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def load_generator():
    """docs/generate.py as a module (docs/ is no package)."""
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_current(capsys):
    assert load_generator().main(["--check"]) == 0, capsys.readouterr().err


def test_check_fails_on_a_stale_page(monkeypatch, tmp_path):
    generate = load_generator()
    stale = tmp_path / "results.md"
    stale.write_text(generate.RESULTS_PAGE.read_text().replace("| 2", "| 3", 1))
    monkeypatch.setattr(generate, "RESULTS_PAGE", stale)
    monkeypatch.setattr(generate, "pages", lambda: {stale: generate.results_page()})
    assert generate.main(["--check"]) == 1
    assert generate.main([]) == 0 and generate.main(["--check"]) == 0


def test_deployment_rows_judge_a_full_row_and_not_one_cut_short(monkeypatch, tmp_path):
    """Every deployed layout's steady round is listed; its goal is judged against the
    floor's bound, or said to be unjudged when the row has no floor yet."""
    generate = load_generator()
    run = lambda s: {"steady_median_s": s, "workers": {}}  # noqa: E731
    goal = {"steady_s": 9.0, "bound_s": 8.5, "round_met": False}
    rows = [
        {"nodes": 2, "client_eval": "with-train", "simulated": run(2.0), "floor": run(5.0)},
        {"nodes": 4, "client_eval": "with-train", "simulated": run(3.0)},
    ]
    rows[0] |= {"deployed_partition": run(9.0), "goals": {"deployed_partition": goal}}
    rows[1] |= {"deployed_partition": run(30.0)}
    doc = {"preset": "p", "run_config": {"num-links": 2}, "rows": rows}
    (tmp_path / "deploy-p.json").write_text(json.dumps(doc))
    monkeypatch.setattr(generate, "RESULTS", tmp_path)
    got = {figure: value for figure, value, _ in generate.deployment()}
    head = "p, {} nodes, client-eval with-train: "
    assert got[head.format(2) + "steady round, deployed_partition"] == "9 s (4.5x simulated)"
    judged = got[head.format(2) + "deployed_partition <= floor + 1.1 x simulated + 1 s"]
    assert judged == "9 s vs bound 8.5 s: not met"
    unjudged = got[head.format(4) + "deployed_partition <= floor + 1.1 x simulated + 1 s"]
    assert unjudged.startswith("30 s;") and "floor not measured" in unjudged


def test_readme_is_a_front_page_that_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    head = text.split("```bash\n", 1)
    assert head[0].count("\n") == 2, "the command block comes right after the title"
    assert head[1].split("```", 1)[0].splitlines() == list(COMMANDS)


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: broken link {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: no heading for {target}"
