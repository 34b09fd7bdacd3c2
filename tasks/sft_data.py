"""The shipped instruction set (`tasks/assets/sft-stdlib.jsonl`): how it is written and found.

`python -m tasks.sft_data` writes it, deterministically, from the held-out packages of the
stdlib corpus (tasks/corpus.py), the same code the shipped base model never saw. Every
public function or class with a docstring gives up to three prompt/response rows:

    explain   "What does `pkg.mod.name` do?"              -> the docstring's first paragraph
    write     "Write a Python function `name(args)`: ..." -> the function, docstring removed
    summarize "Summarize what this function does." + input = the code -> the docstring's
              first sentence

Columns: `instruction`, `input` (empty except for summarize), `response`, `package` (the
top-level package: a natural id, e.g. `label-column="package"` splits clients by it).
Only short pieces are kept (a row fits in about 160 tokens of the shipped tokenizer) so the
file stays small and most rows fit `seq-len` without truncation.
"""

from __future__ import annotations

import argparse
import ast
import json
import textwrap
from pathlib import Path

from tasks.base import TaskConfig
from tasks.corpus import SourceFile, split_corpus
from tasks.models import asset_candidates

FILE = "sft-stdlib.jsonl"
DEFAULT_OUT = Path(__file__).resolve().parent / "assets" / FILE
MAX_DOC = 300  # characters of an explain answer
MAX_CODE = 420  # characters of a written function
MAX_ROWS_PER_FILE = 12  # so a few big modules do not dominate


def shipped_path() -> Path:
    """The shipped instruction file: next to this module, or in the source tree of an
    editable install (a `flwr run` copy of the app holds only .py/.toml/.md/.json files)."""
    for path in asset_candidates(FILE):
        if path.is_file():
            return path
    tried = ", ".join(str(p) for p in asset_candidates(FILE))
    raise FileNotFoundError(
        f"dataset '': the shipped instruction set {FILE} was not found (tried: {tried}); "
        "install the project (pip install -e .) or write it with `python -m tasks.sft_data`"
    )


def with_source(config: TaskConfig) -> TaskConfig:
    """An sft config with `dataset` naming the data it reads: the shipped instruction file
    for ""; other tasks' configs unchanged."""
    if config.task != "sft" or config.dataset:
        return config
    return config.model_copy(update={"dataset": str(shipped_path())})


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def _first_sentence(paragraph: str) -> str:
    head = paragraph.split(". ")[0].rstrip(".")
    return head + "."


def _without_docstring(node: ast.FunctionDef) -> str:
    body = node.body[1:] or [ast.Pass()]
    bare = ast.FunctionDef(
        name=node.name,
        args=node.args,
        body=body,
        decorator_list=[],
        returns=node.returns,
        type_params=[],
    )
    return ast.unparse(ast.fix_missing_locations(bare))


def _module_name(source: SourceFile) -> str:
    parts = Path(source.path).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts)


def rows_of(source: SourceFile) -> list[dict[str, str]]:
    """The instruction rows of one source file (top-level public functions and classes)."""
    try:
        tree = ast.parse(source.text)
    except SyntaxError:
        return []
    module, rows = _module_name(source), []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or not doc.strip() or not doc.isascii():
            continue
        paragraph = _first_paragraph(doc)
        if len(paragraph) < 20:
            continue
        row = {"input": "", "package": source.package}
        if len(paragraph) <= MAX_DOC:
            rows.append(
                row
                | {"instruction": f"What does `{module}.{node.name}` do?", "response": paragraph}
            )
        if isinstance(node, ast.FunctionDef):
            code = _without_docstring(node)
            if len(code) <= MAX_CODE and code.isascii():
                signature = f"{node.name}({ast.unparse(node.args)})"
                task = f"Write a Python function `{signature}`: {_first_sentence(paragraph)}"
                rows.append(row | {"instruction": task, "response": code})
                summary = "Summarize what this function does in one sentence."
                rows.append(
                    row
                    | {
                        "instruction": summary,
                        "input": code,
                        "response": _first_sentence(paragraph),
                    }
                )
    return rows[:MAX_ROWS_PER_FILE]


def build_rows() -> list[dict[str, str]]:
    """Every row, in corpus order (held-out packages sorted, files sorted by path)."""
    split = split_corpus()
    return [row for p in split.federated for f in split.files(p) for row in rows_of(f)]


def write(path: Path) -> int:
    """Write the rows as JSON lines (keys in a fixed order); returns the row count."""
    keys = ("instruction", "input", "response", "package")
    lines = [json.dumps({k: r[k] for k in keys}, ensure_ascii=True) for r in build_rows()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=textwrap.dedent(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    count = write(args.out)
    print(f"{count} rows, {args.out.stat().st_size / 1e3:.0f} kB -> {args.out}")


if __name__ == "__main__":
    main()
