"""The package's imports point one way: no cycle, no module importing a higher layer, at any depth.

The graph is built from the source (ast), so imports inside functions count too. Layers, bottom up,
as in the README's architecture section.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qwen_edit_jax")
PKG = "qwen_edit_jax"

# first matching prefix wins; a module may import only modules of its own layer or lower ones
LAYERS: list[tuple[str, int]] = [
    ("config", 0), ("errors", 0), ("packing", 0), ("utils", 0),
    ("parallel", 1),
    ("models", 2), ("weights", 2),
    ("lora", 3),
    ("loading", 4), ("convert", 4), ("preprocess", 4), ("encoding", 4),
    ("sampling", 5), ("pipeline", 5), ("sharding", 5),
    ("training", 6), ("caching", 6), ("testing", 6),
    ("demo", 7),
]
# same-layer pairs that must never meet: models hold no I/O, weights/ never imports a model class, the
# library never imports its fixtures (only the demo's command line does)
FORBIDDEN = [("weights", "models"), ("models", "weights")] + [
    (name, "testing") for name, _ in LAYERS if name not in ("testing", "demo")]
# function-level imports allowed only for optional heavy backends
LAZY_ALLOWED = {("qwen_edit_jax.models.kernels", "qwen_edit_jax.models.kernels.splash")}


def _modules() -> dict[str, str]:
    mods = {}
    for dirpath, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                mods[rel.removesuffix(".__init__")] = path
    return mods


def _imports(mod: str, path: str, mods: dict[str, str]) -> list[tuple[str, bool]]:
    """(imported project module, imported inside a function?) for every import statement."""
    tree = ast.parse(open(path).read())
    pkg = mod.split(".") if path.endswith("__init__.py") else mod.split(".")[:-1]
    parents: dict[ast.AST, ast.AST] = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}

    def in_function(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return True
        return False

    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[: len(pkg) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else (node.module or "")
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != mod and name != PKG and not mod.startswith(name + "."):
                out.append((name, in_function(node)))
    return out


def _layer(mod: str) -> tuple[str, int]:
    rel = mod.removeprefix(PKG + ".")
    for prefix, layer in LAYERS:
        if rel == prefix or rel.startswith(prefix + "."):
            return prefix, layer
    raise AssertionError(f"{mod} is in no layer; add it to LAYERS in {__file__}")


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, bool]]]:
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def test_no_import_cycle(graph):
    edges = {m: {t for t, _ in deps} for m, deps in graph.items()}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(v: str, stack: list[str]) -> None:
        state[v] = 1
        for w in sorted(edges[v]):
            if state.get(w) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(w):] + [w]))
            if w not in state:
                visit(w, stack + [w])
        state[v] = 2

    for v in sorted(edges):
        if v not in state:
            visit(v, [v])


def test_imports_point_down(graph):
    bad = []
    for mod, deps in graph.items():
        if mod == PKG:
            continue
        src_name, src = _layer(mod)
        for target, _ in deps:
            dst_name, dst = _layer(target)
            if dst > src or (src_name, dst_name) in FORBIDDEN:
                bad.append(f"{mod} (layer {src}) imports {target} (layer {dst})")
    assert not bad, "\n".join(bad)


def test_function_level_imports_only_for_optional_backends(graph):
    bad = [f"{m} imports {t} inside a function" for m, deps in graph.items() for t, lazy in deps
           if lazy and (m, t) not in LAZY_ALLOWED]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_cycle(tmp_path):
    """The graph builder itself: a two-module cycle through a function-level import is found."""
    (tmp_path / "a.py").write_text("from . import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from . import a\n")
    mods = {"p.a": str(tmp_path / "a.py"), "p.b": str(tmp_path / "b.py")}
    assert _imports("p.a", mods["p.a"], mods) == [("p.b", False)]
    assert ("p.a", True) in _imports("p.b", mods["p.b"], mods)
