"""The package's layering, read from the code's own imports (function-local ones included):
no import cycles, nothing imports the CLI, the core imports no feature."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minicpm"
CORE = {"model", "cache", "config", "loading", "tokenizer", "kernels", "files", "errors"}
FEATURES = {"training", "serving", "evaluation", "quantization", "formats", "generation", "vision", "bench", "lean"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_package else name.split(".")[:-1]
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `from pkg.mod import func` -> pkg.mod
                target = target.rpartition(".")[0]
            if target and target != name and (target == "minicpm" or not name.startswith(target + ".")):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imported(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else "minicpm"


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_nothing_imports_the_cli():
    users = {m for m, targets in import_graph().items() if layer(m) != "cli"
             and any(layer(t) == "cli" for t in targets)}
    assert users == set()


def test_only_the_cli_imports_the_package_root():
    """`minicpm.load`/`minicpm.save` join the layers for users; inside, a feature names what it
    uses (an import of the root would hide an edge to formats and generation)."""
    users = {m for m, targets in import_graph().items() if "minicpm" in targets and layer(m) != "cli"}
    assert users == set()


def test_core_imports_no_feature():
    graph = import_graph()
    known = CORE | FEATURES | {"cli"}
    assert {layer(m) for m in graph} - {"minicpm"} <= known, "a new top-level module: give it a layer"
    wrong = {(m, t) for m, targets in graph.items() if layer(m) in CORE
             for t in targets if layer(t) not in CORE}
    assert wrong == set()
