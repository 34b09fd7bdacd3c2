"""The docs: generated pages are current, the README is a front page, and links resolve.

`python docs/generate.py --check` is what CI relies on to fail on a stale results page or
config table; this test runs it, so `python -m pytest -q` (CI's command) does.
"""

import importlib.util
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
