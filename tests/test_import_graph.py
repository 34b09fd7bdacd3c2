"""The layers of DESIGN.md section 5: each imports only layers below it, with no cycles.

Every import counts, including those inside functions (a lazy import is still a
dependency). Lowest first: the adapter core, the runtime (devices, kernels, process
trees), tasks, the contract both apps share, strategies, then the two apps (which never
import each other), then simulation; `testing` (tiny models, probes, attackers) and bench
sit on top, and no production package imports them.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    "seedlora": 0,
    "runtime": 1,
    "tasks": 2,
    "contract": 3,
    "strategies": 4,
    "client": 5,
    "server": 5,
    "simulation": 6,
    "testing": 7,
    "bench": 8,
}
PRODUCTION = (
    "seedlora",
    "runtime",
    "tasks",
    "contract",
    "strategies",
    "client",
    "server",
    "simulation",
)


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache  # parsed once for all the tests below
def _imports(path: Path) -> frozenset[str]:
    """Absolute module names `path` imports (relative imports resolved)."""
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return frozenset(found)


def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    files = [f for layer in LAYERS for f in (ROOT / layer).rglob("*.py")]
    modules = {_module(f): f for f in files}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_layer_imports_upward_or_sideways():
    wrong = []
    for module, targets in graph().items():
        layer = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != layer and LAYERS[other] >= LAYERS[layer]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_nothing_imports_tests():
    offenders = [
        str(f.relative_to(ROOT))
        for layer in LAYERS
        for f in (ROOT / layer).rglob("*.py")
        if any(m == "tests" or m.startswith("tests.") for m in _imports(f))
    ]
    assert not offenders


def test_production_never_imports_testing():
    offenders = [
        f"{module} -> {target}"
        for module, targets in graph().items()
        if module.split(".")[0] in PRODUCTION
        for target in targets
        if target.split(".")[0] in ("testing", "bench")
    ]
    assert not offenders, offenders


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_violation(tmp_path):
    """The graph is real: strategies import the contract, and the server imports strategies."""
    edges = graph()
    assert "contract.protocol" in edges["strategies.chain"]
    assert any(t.startswith("strategies.") for t in edges["server.rounds"])
