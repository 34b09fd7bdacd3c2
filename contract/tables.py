"""pyproject's `[tool.flwr.app.config]` and the README's run-config table, from the sections.

`python -m contract.tables` prints the README table; `--write` rewrites pyproject in place,
and `python docs/generate.py` puts the table between the README's markers
(tests/test_config.py and tests/test_docs.py fail when either has drifted from
contract/config.py).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .config import RunConfig, key_index, section_field

ROOT = Path(__file__).resolve().parents[1]
README_HEADER = "| section | key | default | meaning |"
PYPROJECT_HEADER = "[tool.flwr.app.config]\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def markdown_table() -> str:
    """The README's run-config table: section, key, default, meaning."""
    rows = [README_HEADER, "|---|---|---|---|"]
    defaults = RunConfig().to_flower()
    for key, (section, name) in key_index().items():
        meaning = (section_field(section, name).description or "").replace("|", "\\|")
        rows.append(f"| {section} | `{key}` | `{json.dumps(defaults[key])}` | {meaning} |")
    return "\n".join(rows)


def pyproject_config() -> str:
    """The body of `[tool.flwr.app.config]`: every key and default, grouped by section."""
    lines, current = [], None
    defaults = RunConfig().to_flower()
    for key, (section, _) in key_index().items():
        if section != current:
            lines.append(f"# {section}")
            current = section
        lines.append(f"{key} = {_toml(defaults[key])}")
    return "\n".join(lines) + "\n"


def write(root: Path = ROOT) -> None:
    """Rewrite pyproject's config table in place (its last section); the README's is
    docs/generate.py's."""
    pyproject = root / "pyproject.toml"
    head = pyproject.read_text().split(PYPROJECT_HEADER, 1)[0]
    pyproject.write_text(head + PYPROJECT_HEADER + pyproject_config())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="rewrite pyproject's table")
    if parser.parse_args().write:
        write()
    else:
        print(markdown_table())
