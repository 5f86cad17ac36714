"""The package's imports run one way: world and models -> algorithms -> weeks -> checks, and the instructor's
tools above all of them. Imports inside functions count: a lazy import hides a cycle from Python, not from here.
The layers are drawn in docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "helpers"

LAYERS = {
    "world": {"agora", "cache", "runtime", "lm", "zoo", "plots"},
    "algorithms": {"ppo", "trpo", "rewards", "rlhf", "sft", "dialogue"},
    "weeks": {"cai", "judges", "socratic", "redteam", "safety", "social", "scai", "widgets"},
    "checks": {"checks"},
    "tools": {"grading", "bench", "notebooks"},
}
ORDER = ["world", "algorithms", "weeks", "checks", "tools"]


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package that ``name`` imports, at the top or inside a function."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                full = f"{module}.{alias.name}"
                found.add(full if full in known else module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports_of(name, path, set(names)) for name, path in names.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``g`` as a path a -> ... -> a, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(g):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer_of(module: str) -> str:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    for layer, members in LAYERS.items():
        if top in members:
            return layer
    raise KeyError(module)


def test_find_cycle_on_hand_made_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_package_has_no_import_cycle():
    cycle = find_cycle({m: {d for d in deps if d != "helpers"} for m, deps in graph().items()})
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    unplaced = [m for m in graph() if m != "helpers" and not _placed(m)]
    assert not unplaced, f"modules without a layer in tests/test_architecture.py and docs/architecture.md: {unplaced}"


def _placed(module):
    try:
        layer_of(module)
        return True
    except KeyError:
        return False


@pytest.mark.parametrize("module", sorted(m for m in graph() if m != "helpers" and _placed(m)))
def test_imports_run_down_the_layers(module):
    here = ORDER.index(layer_of(module))
    upward = [d for d in graph()[module] if d != "helpers" and _placed(d) and ORDER.index(layer_of(d)) > here]
    assert not upward, f"{module} ({ORDER[here]}) imports from a higher layer: {sorted(upward)}"
