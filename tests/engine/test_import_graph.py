"""The layers of docs/architecture.md, read from the code's own imports: each package imports only those below
it, and no module imports itself back at run time (imports under ``if TYPE_CHECKING:`` are annotations, not
imports, and are left out)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("optim_format", "optim_core", "optim_client", "schemas", "service")
# what each package may import of the others (docs/architecture.md, "The layers")
ALLOWED = {
    "optim_format": set(),
    "optim_core": {"optim_format"},
    "optim_client": {"optim_format"},
    "schemas": set(),
    "service": {"optim_format", "optim_core", "optim_client", "schemas"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project's modules that ``name`` imports when it runs (at any depth of its code, lazy imports too)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_the_graph_is_read(graph: dict[str, set[str]]) -> None:
    assert "optim_core.run_state" in graph["optim_core"]
    assert "service.runs.registry" in graph["service.app"] or any(m.startswith("service.runs") for m in graph["service.app"])


def test_packages_import_only_the_layers_below(graph: dict[str, set[str]]) -> None:
    wrong = [
        f"{name} imports {target}"
        for name, targets in graph.items()
        for target in targets
        if (theirs := target.split(".")[0]) != name.split(".")[0] and theirs not in ALLOWED[name.split(".")[0]]
    ]
    assert not wrong, wrong


def test_no_module_imports_itself_back(graph: dict[str, set[str]]) -> None:
    # a package's __init__ re-exporting its modules is how a package is read, not a cycle: leave those arrows out
    edges = {
        name: {t for t in targets if not name.startswith(t + ".")}
        if not Path(_modules()[name]).name == "__init__.py"
        else targets
        for name, targets in graph.items()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            dfs(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)
