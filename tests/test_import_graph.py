"""The package's imports point one way: no cycle, no module importing a higher layer, at any depth.

The graph is built from the source (ast), so imports inside functions count too. Layers, bottom up,
as in the README's architecture section. Other packages are used through their public API only: no
import or attribute path through a private name (Orbax's or JAX's `_src` modules), no class
overriding a private method of another package's class, in the package, the scripts or the tests.
"""

from __future__ import annotations

import ast
import importlib
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "qwen_edit_jax")
PKG = "qwen_edit_jax"
# the project's own code: the package and the folders of scripts and tests beside it
OWN = ("qwen_edit_jax", "train", "sample", "convert", "benchmarks", "scripts", "tests")

# first matching prefix wins; a module may import only modules of its own layer or lower ones
LAYERS: list[tuple[str, int]] = [
    ("config", 0), ("errors", 0), ("packing", 0), ("utils", 0),
    ("parallel", 1),
    ("models", 2), ("weights", 2), ("imaging", 2), ("cache_format", 2),
    ("lora", 3),
    ("loading", 4), ("convert", 4), ("preprocess", 4), ("encoding", 4),
    ("sampling", 5), ("pipeline", 5),
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


def _ancestors(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def test_no_import_cycle(graph):
    # importing a.b.c runs a/b/__init__ first: a package the importer is not inside is an edge too
    edges = {m: {t for t, _ in deps} | {a for t, _ in deps for a in _ancestors(t)
                                         if a in graph and a != m and not m.startswith(a + ".")}
             for m, deps in graph.items()}
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


# ---- other packages: public API only --------------------------------------------------------------
# parity tests may call the reference's own private function they compare against (tests only; a
# rename there breaks the test, never the library)
PARITY_REFERENCES = {
    "diffusers.QwenImagePipeline._pack_latents": "tests/test_packing.py",
    "diffusers.QwenImagePipeline._unpack_latents": "tests/test_packing.py",
}
# Public, documented names that start with an underscore anyway.
PUBLIC_UNDERSCORE = {
    "os._exit",  # https://docs.python.org/3/library/os.html#os._exit (parallel.preemption: exit past a deadline)
}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_files() -> list[str]:
    out = []
    for top in OWN:
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            out += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    return sorted(out)


def _foreign(module: str) -> bool:
    return module.split(".")[0] not in (*OWN, "__future__")


def _foreign_names(tree: ast.AST) -> dict[str, str]:
    """Local name → dotted path in another package, for every name an import binds to one."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _foreign(a.name):
                    names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _foreign(node.module):
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """`ocp.type_handlers.NumpyHandler` → 'orbax.checkpoint.type_handlers.NumpyHandler' (other packages only)."""
    attrs = []
    while isinstance(node, ast.Attribute):
        attrs.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in names:
        return ".".join([names[node.id], *reversed(attrs)])
    return None


def _private_uses(path: str) -> list[str]:
    """Imports of, and attribute paths through, private names of other packages in one file."""
    tree = ast.parse(open(path).read())
    names = _foreign_names(tree)
    rel = os.path.relpath(path, REPO)
    bad = []
    for node in ast.walk(tree):
        dotted = []
        if isinstance(node, ast.Import):
            dotted = [a.name for a in node.names if _foreign(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _foreign(node.module):
            dotted = [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute):
            dotted = [d for d in [_dotted(node, names)] if d]
        bad += [f"{rel}:{node.lineno}: {d}" for d in dotted
                if any(_is_private(c) for c in d.split(".")[1:]) and PARITY_REFERENCES.get(d) != rel
                and d not in PUBLIC_UNDERSCORE]
    return bad


def _resolve(dotted: str):
    """The object at a dotted path (the longest importable module, then attributes); None if it is not there."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _private_overrides(path: str) -> list[str]:
    """Methods with a private name that a class defines over one of another package's classes."""
    tree = ast.parse(open(path).read())
    names = _foreign_names(tree)
    rel = os.path.relpath(path, REPO)
    bad = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        private = [f for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(f.name)]
        bases = [d for d in (_dotted(b, names) for b in cls.bases) if d]
        if not private or not bases:
            continue
        for base in (_resolve(d) for d in bases):
            mro = [k for k in getattr(base, "__mro__", ()) if k is not object]
            bad += [f"{rel}:{f.lineno}: {cls.name}.{f.name} overrides {k.__module__}.{k.__qualname__}.{f.name}"
                    for f in private for k in mro if f.name in vars(k)]
    return bad


def test_no_private_modules_or_names_of_other_packages():
    bad = [b for f in _own_files() for b in _private_uses(f)]
    assert not bad, "private API of another package:\n" + "\n".join(bad)


def test_no_overrides_of_private_methods_of_other_packages():
    bad = [b for f in _own_files() for b in _private_overrides(f)]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_private_use(tmp_path):
    """The checks themselves: a private-module import, a private attribute path and a private override are found
    (the probe's names are assembled, so that a grep for private imports does not find this file)."""
    src_ = "_" + "src"
    src = tmp_path / "m.py"
    src.write_text("import orbax.checkpoint as ocp\n"
                   f"from orbax.checkpoint.{src_}.futures import future\n"
                   "import jax\n"
                   f"x = jax.{src_}.config\n"
                   "import threading\n"
                   "class H(ocp.type_handlers.TypeHandler):\n"
                   "    def _helper(self):\n"  # a private method of its own: fine
                   "        pass\n"
                   "class T(threading.Thread):\n"
                   "    def _bootstrap(self):\n"  # overrides the standard library's private method
                   "        pass\n")
    uses = _private_uses(str(src))
    assert any(f"orbax.checkpoint.{src_}.futures.future" in u for u in uses)
    assert any(f"jax.{src_}.config" in u for u in uses)
    overrides = _private_overrides(str(src))
    assert len(overrides) == 1 and "T._bootstrap overrides threading.Thread._bootstrap" in overrides[0]
