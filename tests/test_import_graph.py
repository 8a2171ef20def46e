"""No import cycle among the modules of ``visionzip/`` and ``llava/``.

The graph is read statically (``ast``): every ``import`` / ``from ... import`` in a module, at its top or
inside a function or class (a lazy import only hides a cycle until the function runs). Imports under
``if TYPE_CHECKING:`` are left out: they never run. An edge goes to the module named and, for
``from package import name``, to ``package.name`` when that is a module (else to ``package``); a package
that imports its modules with ``pkgutil`` (``visionzip.methods``) has an edge to each.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("visionzip", "llava")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.Module):
    """The Import / ImportFrom nodes of ``tree`` outside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for child in node.body for inner in ast.walk(child))
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


@functools.cache
def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        if is_package and "pkgutil.iter_modules" in path.read_text(encoding="utf-8"):
            # a package that imports all its modules (visionzip.methods: discovery of the methods)
            graph[name].update(m for m in files if m.rpartition(".")[0] == name)
        for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # a name that is a submodule is an edge to it; any other name needs the module itself
                targets = [
                    f"{source}.{alias.name}" if f"{source}.{alias.name}" in files else source for alias in node.names
                ]
            for target in targets:
                if target in files and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_reads_lazy_imports():
    """The walk sees an import inside a function and resolves relative imports (so the test can fail)."""
    graph = import_graph()
    assert "visionzip.config" in graph["visionzip.apply"]
    assert "visionzip.methods.base" in graph["visionzip.methods.visionzip"]
    assert "visionzip.methods.visionzip" in graph["visionzip.methods"]  # discovered by pkgutil
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
