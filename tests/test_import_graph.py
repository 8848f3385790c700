"""No import cycles in product code (``engine/``, ``models/``, ``kernels/``).

The graph is read from the source with ``ast``: every ``import`` and ``from ... import`` anywhere in a module counts,
including the ones inside functions (a lazy import hides a cycle from Python's import machinery, not from a reader:
two modules that need each other are one module in two files). A strongly connected component of more than one
module is a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "models", "kernels")


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``packages`` (a package is its ``__init__``)."""
    mods = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the product modules it imports (at any depth of its body)."""
    mods = module_files(root, packages)

    def known(name: str) -> str | None:
        # `import engine.rewards.geneval` and `from engine.rewards.geneval import x` both reach the longest known
        # prefix; `from engine.rewards import geneval` names a submodule
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(known(a.name) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod if is_pkg else mod.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    source = ".".join(p for p in (base, node.module) if p)
                else:
                    source = node.module
                for a in node.names:
                    sub = f"{source}.{a.name}"
                    edges.add(sub if sub in mods else known(source))
        edges.discard(None)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_product_code_has_no_import_cycles():
    graph = import_graph(ROOT)
    assert len(graph) > 50, "the scan found too few modules to be the product tree"
    assert "engine.loop" in graph and "engine.context" in graph["engine.loop"], "the scan misses plain imports"
    found = cycles(graph)
    assert not found, "import cycles (function-level imports count): " + "; ".join(" <-> ".join(c) for c in found)


def test_the_scan_finds_a_cycle_hidden_in_a_function(tmp_path):
    """The checker itself: a lazy import inside a function closes a cycle; relative imports resolve."""
    pkg = tmp_path / "engine"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import g\n")
    (pkg / "a.py").write_text("from engine.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from .. import c\n    return c\n")
    (pkg / "c.py").write_text("X = 1\n")
    graph = import_graph(tmp_path, packages=("engine",))
    assert graph["engine.a"] == {"engine.sub.b"} and graph["engine.sub"] == {"engine.sub.b"}
    assert graph["engine.sub.b"] == {"engine.c"}  # `from .. import c` names the submodule
    assert cycles(graph) == []
    (pkg / "sub" / "b.py").write_text("def g():\n    from ..a import x\n    return x\n")
    graph = import_graph(tmp_path, packages=("engine",))
    assert cycles(graph) == [["engine.a", "engine.sub.b"]]
    assert cycles({"x": {"y"}, "y": set()}) == []
