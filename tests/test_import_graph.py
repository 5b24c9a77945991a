"""No import cycles, no upward imports between layers, and no private names across modules in
``refitcore/`` and ``pytest_trtrefit/``.

The checker reads every module's AST (function-level imports included: an import hidden inside a
function still makes a cycle, it only moves the failure to run time), builds the module import
graph, and reports every strongly connected component as a cycle. It also reports
``from x import _y`` and ``x._y`` where ``x`` is another project module and ``_y`` is not a module
(a private module such as ``_trt`` is the package's own business; its private names are not).
Importing a submodule does not count as importing its parent package (Python runs the parent's
``__init__`` first, but that is no dependency of the importer on what the parent re-exports).

Layers: refitcore's subpackages are the pipeline, and a module may import only from its own layer
or the layers below it (:data:`LAYERS`, lowest first). The package root (``refitcore/__init__``, the
lazy public face) is above every layer: nothing inside refitcore imports it.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("refitcore", "pytest_trtrefit")
# Lowest first. A module is in the first layer one of whose prefixes it equals or starts with (then ".").
LAYERS = (
    ("base", ("refitcore.errors", "refitcore.dtypes", "refitcore._trt", "refitcore._version", "refitcore.options",
              "refitcore.progress")),
    ("capture", ("refitcore.capture",)),
    ("conversion", ("refitcore.conversion",)),
    ("partition", ("refitcore.partition",)),
    ("backends", ("refitcore.backends",)),
    ("engine", ("refitcore.engine",)),
    ("refitting", ("refitcore.refitting",)),
    ("cache", ("refitcore.cache",)),
    ("compiler", ("refitcore.compiler",)),
    ("gating", ("refitcore.gating",)),
    ("cli", ("refitcore.cli",)),
    ("public", ("refitcore",)),
    ("plugin", ("pytest_trtrefit",)),
)


# ---- the checker ------------------------------------------------------------------------------
def find_modules(root: Path, packages) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under ``root/<package>``."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _base(module: str, path: Path, level: int, target: str | None) -> str:
    """The absolute module an ``ImportFrom`` names."""
    if level == 0:
        return target or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{target}" if target else package


def scan(modules: dict[str, Path]):
    """(edges {module: {imported module: line}}, private-name uses [(module, line, text)])."""
    edges: dict[str, dict[str, int]] = {m: {} for m in modules}
    private: list[tuple[str, int, str]] = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        bound: dict[str, str] = {}   # local name -> project module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        edges[module].setdefault(alias.name, node.lineno)
                        if alias.asname:
                            bound[alias.asname] = alias.name
                    head = alias.name.split(".")[0]
                    if not alias.asname and head in modules:
                        bound[head] = head
            elif isinstance(node, ast.ImportFrom):
                base = _base(module, path, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in modules:
                        edges[module].setdefault(sub, node.lineno)
                        bound[alias.asname or alias.name] = sub
                    elif base in modules:
                        edges[module].setdefault(base, node.lineno)
                        if _is_private(alias.name):
                            private.append((module, node.lineno, f"from {base} import {alias.name}"))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and _is_private(node.attr)):
                target = bound[node.value.id]
                if target != module and f"{target}.{node.attr}" not in modules:
                    private.append((module, node.lineno, f"{node.value.id}.{node.attr} ({target})"))
        edges[module].pop(module, None)
    return edges, private


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(edges[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for succ in successors:
                if succ not in edges:
                    continue
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(edges[succ])))
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def describe_cycle(component: list[str], edges: dict[str, dict[str, int]]) -> str:
    """One concrete loop through a component, with the line of each import: 'a:3 -> b:7 -> a'."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    queue = [start]
    while queue:   # breadth-first, back to start
        node = queue.pop(0)
        for succ in edges[node]:
            if succ == start:
                loop = paths[node] + [start]
                return " -> ".join(f"{m}:{edges[m][n]}" for m, n in zip(loop, loop[1:])) + f" -> {start}"
            if succ in members and succ not in paths:
                paths[succ] = paths[node] + [succ]
                queue.append(succ)
    return " <-> ".join(component)


def layer_of(module: str, layers) -> int | None:
    """The index of ``module``'s layer (None: in no layer)."""
    for i, (_, prefixes) in enumerate(layers):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


def upward_imports(edges: dict[str, dict[str, int]], layers) -> list[str]:
    """Every import of a module in a higher layer: 'a:line imports b (layer x above layer y)'."""
    out = []
    for module, targets in sorted(edges.items()):
        mine = layer_of(module, layers)
        for target, line in sorted(targets.items()):
            theirs = layer_of(target, layers)
            if mine is not None and theirs is not None and theirs > mine:
                out.append(f"upward import: {module}:{line} imports {target} "
                           f"(layer {layers[theirs][0]!r} is above {layers[mine][0]!r})")
    return out


def problems(root: Path, packages, layers=LAYERS) -> list[str]:
    edges, private = scan(find_modules(root, packages))
    out = [f"import cycle: {describe_cycle(c, edges)}" for c in cycles(edges)]
    out += upward_imports(edges, layers)
    out += [f"private name of another module: {m}:{line}: {text}" for m, line, text in private]
    return out


# ---- the project ------------------------------------------------------------------------------
def test_no_import_cycles_and_no_private_names_across_modules():
    found = problems(ROOT, PACKAGES)
    assert not found, "\n".join(found)


def test_the_checker_sees_the_project():
    modules = find_modules(ROOT, PACKAGES)
    edges, _ = scan(modules)
    assert {"refitcore.engine", "refitcore.engine.bundle", "pytest_trtrefit.plugin"} <= set(modules)
    # function-level imports count: the backends package picks its modules inside functions
    assert "refitcore.backends.tensorrt" in edges["refitcore.backends"]
    assert "refitcore.engine.bundle" in edges["refitcore.engine.refittable"]
    assert "refitcore.engine.refittable" not in edges["refitcore.engine.bundle"]


# ---- the checker catches what it should (a tiny synthetic package) ----------------------------
def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_catches_a_planted_cycle_hidden_in_a_function(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n\ndef f():\n    return b.g()\n",
        "b.py": "def g():\n    from .sub.c import h\n    return h()\n",
        "sub/__init__.py": "",
        "sub/c.py": "import os\n\ndef h():\n    import pkg.a\n    return pkg.a\n",
        "clean.py": "import os\nfrom .b import g\n",
    })
    found = problems(root, ["pkg"])
    assert len(found) == 1, found
    assert found[0].startswith("import cycle: pkg.a:1 -> pkg.b:2 -> pkg.sub.c:4 -> pkg.a"), found


def test_checker_catches_private_names(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "_impl.py": "_secret = 1\nPUBLIC = 2\n",
        "a.py": "from ._impl import _secret\n",
        "b.py": "from . import _impl\n\nX = _impl._secret + _impl.PUBLIC\n",
        "c.py": "import pkg.a as other\n\nY = other._hidden\n",
        "ok.py": "from ._impl import PUBLIC\nfrom . import _impl\nfrom os import _exit\n\n"
                 "class K:\n    def f(self):\n        return self._x, _impl.__name__\n",
    })
    found = problems(root, ["pkg"])
    assert sorted(found) == [
        "private name of another module: pkg.a:1: from pkg._impl import _secret",
        "private name of another module: pkg.b:3: _impl._secret (pkg._impl)",
        "private name of another module: pkg.c:3: other._hidden (pkg.a)",
    ], found


def test_checker_catches_a_planted_upward_import(tmp_path):
    layers = (("low", ("pkg.low",)), ("high", ("pkg.high",)), ("top", ("pkg",)))
    root = _package(tmp_path, {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/a.py": "import os\n\ndef f():\n    from pkg.high.b import g\n    return g()\n",
        "low/c.py": "from pkg.low import a\n",
        "high/__init__.py": "",
        "high/b.py": "from pkg.low.c import a\n\ndef g():\n    return 1\n",
        "high/d.py": "import pkg\n",
    })
    found = problems(root, ["pkg"], layers)
    assert found == [
        "import cycle: pkg.high.b:1 -> pkg.low.c:1 -> pkg.low.a:4 -> pkg.high.b",
        "upward import: pkg.high.d:1 imports pkg (layer 'top' is above 'high')",
        "upward import: pkg.low.a:4 imports pkg.high.b (layer 'high' is above 'low')",
    ], found


def test_every_refitcore_module_has_a_layer():
    modules = [m for m in find_modules(ROOT, PACKAGES) if m != "refitcore"]
    assert [m for m in modules if layer_of(m, LAYERS) is None] == []
    assert layer_of("refitcore.engine.bundle", LAYERS) < layer_of("refitcore.refitting.mapping", LAYERS)


def test_checker_passes_a_clean_package(tmp_path):
    root = _package(tmp_path, {"__init__.py": "from .a import f\n", "a.py": "from . import b\n",
                               "b.py": "import os\n"})
    assert problems(root, ["pkg"]) == []


if __name__ == "__main__":   # python tests/test_import_graph.py: print what the test would report
    print("\n".join(problems(ROOT, PACKAGES)) or f"no cycles, no private names ({os.fspath(ROOT)})")
