"""The package's modules import each other without a cycle: each reads straight down.

The graph is built from the source (AST), so imports inside functions count too. ``convert/``,
``infer/`` and ``train/`` are installed as ``zaya_jax.convert`` etc. and are named so here. Importing
``a.b.c`` also runs the ``__init__`` of ``a.b``: that is an edge too, unless ``a.b`` is a package the
importer itself lives in (already being initialised).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"zaya_jax": "zaya_jax", "zaya_jax.convert": "convert", "zaya_jax.infer": "infer", "zaya_jax.train": "train"}


def modules() -> dict[str, pathlib.Path]:
    """Module name -> source file, for every module of the package."""
    out = {}
    for package, folder in PACKAGES.items():
        for file in sorted((ROOT / folder).rglob("*.py")):
            rel = file.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "zaya_jax" and parts and parts[0] in ("convert", "infer", "train"):
                continue  # not there: those folders live at the top level
            out[".".join([package, *parts])] = file
    return out


def _targets(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules an import statement names (``from x import y``: ``x.y`` when that is a module)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    source = ".".join(filter(None, (base if node.level else "", node.module or "")))
    named = [f"{source}.{alias.name}" for alias in node.names]
    return [n for n in named if n in known] or [source]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules its source imports (anywhere in the file), parent packages included."""
    found = modules()
    graph = {}
    for module, file in found.items():
        is_package = file.name == "__init__.py"
        own = {module.rsplit(".", i)[0] for i in range(module.count(".") + 1)} if is_package else {
            module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}
        edges = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, module, is_package, set(found)):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # the module and the packages it runs on the way
                    name = ".".join(parts[:i])
                    if name in found and name not in own and name != module:
                        edges.add(name)
        graph[module] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    assert {"zaya_jax.model", "zaya_jax.convert.pipeline", "zaya_jax.infer.generation", "zaya_jax.train.step"} <= set(graph)
    assert "zaya_jax.moe" in graph["zaya_jax.model"]  # `from . import moe`
    assert "zaya_jax.sharded_load" in graph["zaya_jax.checkpoint"]  # module level
    assert "zaya_jax.convert" in graph["zaya_jax.checkpoint"]  # inside save()


def test_finder_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_library_reads_straight_down():
    """The library (zaya_jax's own modules but the command line, the demo and the planner, which plans the
    engine's and the train step's programs) imports nothing from
    convert/, infer/ or train/: loading, the model and sharding sit below those. One exception:
    ``checkpoint.save`` writes through ``convert.save`` (its staged temporary directory)."""
    allowed = {("zaya_jax.checkpoint", "zaya_jax.convert")}
    upper = ("zaya_jax.convert", "zaya_jax.infer", "zaya_jax.train", "zaya_jax.demo", "zaya_jax.cli", "zaya_jax.plan")
    graph = import_graph()
    library = [m for m in graph if not m.startswith(upper) and m != "zaya_jax"]
    reaching_up = sorted((m, t) for m in library for t in graph[m]
                         if t.startswith(upper) and (m, t) not in allowed)
    assert not reaching_up


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
