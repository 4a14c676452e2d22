"""No module reaches into another's private names (a leading underscore): neither ``from x import _name``
nor ``x._name`` on a module of the package it imported. Built from the source (AST), as the import-graph
test is; a module's own names, dunders and third-party modules are not counted."""

from __future__ import annotations

import ast

from test_import_graph import ROOT, modules

FOLDERS = ("zaya_jax", "infer", "train", "convert", "bench")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    base = module if is_package else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    return ".".join(filter(None, (base if node.level else "", node.module or "")))


def sources() -> dict:
    """Every source file of FOLDERS -> its module name."""
    files = {file: name for name, file in modules().items()}
    files.update({f: f.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".")
                  for f in sorted((ROOT / "bench").rglob("*.py"))})
    return {f: m for f, m in files.items() if f.relative_to(ROOT).parts[0] in FOLDERS}


def private_uses(files: dict, ours: set[str]) -> list[str]:
    """``file:line: what`` for each use in ``files`` (a path -> its module) of a private name of another module
    of ``ours`` (module names)."""
    problems = []
    for file, module in files.items():
        tree = ast.parse(file.read_text(), str(file))
        is_package = file.name == "__init__.py"
        aliases: dict[str, str] = {}  # a local name -> the module of ours it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in ours:
                        aliases[a.asname or a.name.partition(".")[0]] = a.name if a.asname else a.name.partition(".")[0]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(module, is_package, node)
                for a in node.names:
                    if f"{source}.{a.name}" in ours:
                        aliases[a.asname or a.name] = f"{source}.{a.name}"
                    elif (source in ours or source.startswith(("zaya_jax", "bench"))) and _private(a.name):
                        problems.append(f"{file.name}:{node.lineno}: from {source} import {a.name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                chain, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    chain.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id in aliases:
                    target = ".".join([aliases[value.id], *reversed(chain[1:])])
                    if target in ours and target != module:
                        problems.append(f"{file.name}:{node.lineno}: {target}.{node.attr}")
    return problems


def test_no_private_name_crosses_a_module():
    assert private_uses(sources(), set(modules())) == []


def test_the_check_finds_each_form(tmp_path):
    source = tmp_path / "user.py"
    source.write_text("import zaya_jax.finite\nfrom zaya_jax import finite as f\nfrom zaya_jax.finite import _finite\n"
                      "from zaya_jax.finite import check\nf._finite(1)\nzaya_jax.finite._finite(2)\n"
                      "f.check._cache\nf.__name__\nself._own\n")
    found = private_uses({source: "zaya_jax.user"}, set(modules()) | {"zaya_jax.user"})
    assert found == ["user.py:3: from zaya_jax.finite import _finite", "user.py:5: zaya_jax.finite._finite",
                     "user.py:6: zaya_jax.finite._finite"]
