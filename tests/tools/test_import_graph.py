"""The import graph of the whole tree (the package, ``scripts/`` and ``tests/``), read with ``ast``.

Every ``import`` and ``from ... import`` is resolved to a module of the tree: absolute imports of
the package, relative imports, imports inside functions, a script's imports of its folder (a
script runs with ``scripts/`` first on ``sys.path``) and a test's imports of ``tests/`` (pytest
puts ``tests/`` and the test's own folder on ``sys.path``). ``from pkg import name`` is an edge to
``pkg.name`` when that is a module of the tree, else to ``pkg``. Imports under ``if TYPE_CHECKING:``
never run and are left out.

Top-level imports (at module level, in class bodies, under ``if``/``try``) run when the module is
imported: a cycle among them is an import-order bug waiting to happen, and fails here. Imports
inside functions run later, when the function is called; the tree has no cycle through them either
(a package deferring an import of its own ``__init__`` is the usual way one creeps in).
"""
from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "diffsynth_attention"
FOLDERS = (PACKAGE, "scripts", "tests")


class Module:
    def __init__(self, name: str, path: Path, root: Path):
        self.name, self.path, self.root, self.rel = name, path, root, path.relative_to(root)
        self.is_package = path.name == "__init__.py"
        self.folder = self.rel.parts[0]


def modules(root: Path = ROOT) -> dict:
    """Every Python module of the tree, by dotted name (scripts as ``scripts.<name>``, tests by their
    path under ``tests/``, e.g. ``tests.support.helpers``)."""
    found = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = Module(".".join(parts), path, root)
    return found


def _type_checking(node) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree):
    """(node, top_level) for every import statement, skipping ``if TYPE_CHECKING:`` blocks."""
    def walk(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for sub in child.orelse:
                    yield from walk_one(sub, top)
                continue
            yield from walk_one(child, top)

    def walk_one(child, top):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, top
        inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from walk(child, inner)

    yield from walk(tree, True)


def _candidates(mod: Module, name: str) -> list:
    """Tree modules an absolute import of ``name`` may mean, from ``mod``'s point of view."""
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return [name]
    if mod.folder == "scripts":
        return ["scripts." + name]
    if mod.folder == "tests":
        own = mod.name.rsplit(".", 1)[0] if not mod.is_package else mod.name
        return ["tests." + name, own + "." + name]  # tests/ on sys.path, and the test's own folder
    return []


def _resolve(mod: Module, node, tree_modules: dict) -> list:
    """The tree modules one import statement imports."""
    targets = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            targets += [c for c in _candidates(mod, alias.name) if c in tree_modules][:1]
        return targets
    if node.level:
        base = mod.name.split(".") if mod.is_package else mod.name.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        bases = [".".join(base + ([node.module] if node.module else []))]
    else:
        bases = [c for c in _candidates(mod, node.module) if c in tree_modules][:1]
    for base in bases:
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            targets.append(sub if sub in tree_modules else base)
    return [t for t in targets if t in tree_modules]


def graph(tree_modules: dict, top_level_only: bool) -> dict:
    """{module: {imported module: (path, line) of the first such import}}."""
    edges = {name: {} for name in tree_modules}
    for name, mod in tree_modules.items():
        tree = ast.parse(mod.path.read_text(), str(mod.path))
        for node, top in _imports(tree):
            if top_level_only and not top:
                continue
            for target in _resolve(mod, node, tree_modules):
                if target != name:
                    edges[name].setdefault(target, (mod.rel, node.lineno))
    return edges


def cycles(edges: dict) -> list:
    """One shortest cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return [_shortest_cycle(edges, c) for c in components]


def _shortest_cycle(edges: dict, component: set) -> list:
    best = None
    for start in sorted(component):
        parent, queue = {start: None}, deque([start])
        while queue:
            v = queue.popleft()
            for w in sorted(edges[v]):
                if w not in component:
                    continue
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    path = path[::-1] + [start]
                    if best is None or len(path) < len(best):
                        best = path
                    queue.clear()
                    break
                if w not in parent:
                    parent[w] = v
                    queue.append(w)
    return best


def describe(edges: dict, cycle: list) -> str:
    steps = [f"  {a} -> {b}  ({edges[a][b][0]}:{edges[a][b][1]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


HARNESS = "scripts.harness"  # the benchmark harness: a development module, not installed
SCRIPT_FACING = (PACKAGE, HARNESS, f"{HARNESS}.bench", f"{PACKAGE}.tools.cli")


def _public_names(root: Path) -> set:
    """The package's ``__all__`` (read from its ``__init__.py``; empty when it has none)."""
    tree = ast.parse((root / PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def script_violations(tree_modules: dict) -> list:
    """A script imports only the public API (``diffsynth_attention`` and the names of its
    ``__all__``), the benchmark harness ``scripts/harness/bench.py`` and the command line
    ``diffsynth_attention.tools.cli`` (whose ``main`` the thin CLI scripts call), at top level or
    inside a function; never another package module, another script or a test helper, and no
    name with a leading underscore. The harness itself (``scripts/harness/``) is the one surface
    that reaches into the package for them."""
    edges = graph(tree_modules, top_level_only=False)
    public = _public_names(next(iter(tree_modules.values())).root)
    bad = []
    for name, mod in sorted(tree_modules.items()):
        if mod.folder != "scripts" or name == HARNESS or name.startswith(HARNESS + "."):
            continue
        bad += [f"{name} imports {t}" for t in edges[name] if t not in SCRIPT_FACING and not t.startswith(HARNESS + ".")]
        for node, _ in _imports(ast.parse(mod.path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif node.level == 0 and node.module and node.module.split(".")[0] == PACKAGE:
                names = [f"{node.module}.{a.name}" for a in node.names]
                if node.module == PACKAGE:
                    bad += [f"{name}:{node.lineno} imports {PACKAGE}.{a.name}, not in its __all__" for a in node.names
                            if a.name not in public and f"{PACKAGE}.{a.name}" not in tree_modules]
            else:
                continue
            for dotted in names:
                if dotted.split(".")[0] == PACKAGE and any(p.startswith("_") and not p.startswith("__") for p in dotted.split(".")):
                    bad.append(f"{name}:{node.lineno} imports the private {dotted}")
    return bad


@pytest.fixture(scope="module")
def tree_modules():
    return modules()


def test_the_graph_sees_every_kind_of_import(tree_modules):
    """The resolver finds absolute, relative and function-level imports of the package and the
    tests' imports of tests/support (else the checks below would pass on an empty graph)."""
    every = graph(tree_modules, top_level_only=False)
    top = graph(tree_modules, top_level_only=True)
    assert len(tree_modules) > 100 and sum(map(len, top.values())) > 200
    assert "diffsynth_attention.tuning.timing" in top["scripts.harness.bench"]  # the harness, absolute
    assert "scripts.harness.bench_calls" in top["scripts.harness.bench"]  # relative, inside scripts/harness
    assert "scripts.harness.bench" in every["scripts.benchmark"]
    assert "diffsynth_attention.dispatch" in top["tests.conftest"]  # absolute, from a test
    assert "diffsynth_attention.tools.cli" in top["scripts.warm_cache"]
    lazy = "diffsynth_attention.dispatch.hot"  # attention_forward: ``from .baked import traced_attention``
    assert "diffsynth_attention.dispatch.baked" in every[lazy] and "diffsynth_attention.dispatch.baked" not in top[lazy]
    assert "tests.support.flaky" in top["tests.dispatch.test_faults"]
    assert "tests.support.virtual" in set(every["tests.tuning.test_tuner"]) - set(top["tests.tuning.test_tuner"])


def test_a_cycle_and_a_script_importing_a_script_are_found(tmp_path):
    """A synthetic tree: a -> b -> c -> a (one import inside a function, one relative), and
    scripts that import another script, a private module, a package module other than the
    script-facing ones (at top level and inside a function) and a name outside ``__all__``; a
    script importing only the public API, the harness and the command line passes."""
    pkg = tmp_path / PACKAGE
    (pkg / "tools").mkdir(parents=True)
    (pkg / "__init__.py").write_text('__all__ = ["explain"]\n')
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from diffsynth_attention.c import x\n")
    (pkg / "c.py").write_text("from .a import *\nx = 1\n")
    (pkg / "_private.py").write_text("")
    for name in ("__init__", "cli"):
        (pkg / "tools" / f"{name}.py").write_text("")
    (tmp_path / "scripts" / "harness").mkdir(parents=True)
    (tmp_path / "scripts" / "harness" / "__init__.py").write_text("")
    (tmp_path / "scripts" / "harness" / "bench.py").write_text("from diffsynth_attention.a import b\n")  # the harness reaches in
    (tmp_path / "scripts" / "one.py").write_text("import two\nfrom diffsynth_attention import _private\n")
    (tmp_path / "scripts" / "two.py").write_text("from diffsynth_attention.a import b\n"
                                                 "def f():\n    import diffsynth_attention.tools\n")
    (tmp_path / "scripts" / "three.py").write_text("from diffsynth_attention import explain, hidden\n")
    (tmp_path / "scripts" / "fine.py").write_text(
        "import diffsynth_attention as da\nfrom diffsynth_attention import explain\n"
        "from harness import bench\nfrom harness.bench import x\n"
        "def main():\n    from diffsynth_attention.tools.cli import main\n")
    (tmp_path / "tests").mkdir()
    found = modules(tmp_path)
    assert cycles(graph(found, top_level_only=True)) == []  # b -> c only inside a function
    every = graph(found, top_level_only=False)
    (cycle,) = cycles(every)
    assert cycle[0] == cycle[-1] and set(cycle) == {f"{PACKAGE}.{m}" for m in "abc"}
    assert "b.py:2" in describe(every, cycle)
    assert script_violations(found) == ["scripts.one imports scripts.two",
                                        "scripts.one imports diffsynth_attention._private",
                                        "scripts.one:2 imports the private diffsynth_attention._private",
                                        "scripts.three:1 imports diffsynth_attention.hidden, not in its __all__",
                                        "scripts.two imports diffsynth_attention.a",
                                        "scripts.two imports diffsynth_attention.tools"]


@pytest.mark.parametrize("top_level_only", [True, False], ids=["top-level", "with-function-level"])
def test_no_import_cycle_in_the_tree(tree_modules, top_level_only):
    """No cycle anywhere in the tree (package, scripts and tests): not among top-level imports, and
    not even through an import deferred into a function (a package's own ``__init__`` included)."""
    edges = graph(tree_modules, top_level_only=top_level_only)
    found = cycles(edges)
    assert not found, "import cycles:\n" + "\n".join(describe(edges, c) for c in found)


def test_scripts_import_no_script_no_test_and_nothing_private(tree_modules):
    bad = script_violations(tree_modules)
    assert not bad, "\n".join(bad)


def test_tests_share_helpers_only_through_support(tree_modules):
    """No test module imports another test module: what several tests share lies in tests/support."""
    edges = graph(tree_modules, top_level_only=False)
    bad = [f"{name} imports {t}" for name, mod in tree_modules.items() if mod.folder == "tests"
           for t in edges[name] if t.rsplit(".", 1)[-1].startswith("test_")]
    assert not bad, "\n".join(bad)


# The package's layers, bottom up: a module of one may import its own layer, the layers below it and
# the package's top-level modules, never a layer above (issue 33: store/key.py -> backends and
# dispatch/plan.py -> tools were the last arrows running back up).
LAYERS = ("store", "backends", "tuning", "dispatch", "integrations", "tools")


def upward_arrows(tree_modules: dict) -> list:
    edges = graph(tree_modules, top_level_only=False)

    def layer(name: str):
        parts = name.split(".")
        return LAYERS.index(parts[1]) if parts[0] == PACKAGE and len(parts) > 1 and parts[1] in LAYERS else None

    return [f"{a} ({LAYERS[layer(a)]}) imports {t} ({LAYERS[layer(t)]}), a layer above it"
            for a, targets in sorted(edges.items()) if layer(a) is not None
            for t in targets if layer(t) is not None and layer(t) > layer(a)]


def test_no_arrow_runs_back_up_the_layers(tree_modules):
    bad = upward_arrows(tree_modules)
    assert not bad, "\n".join(bad)


def test_an_upward_arrow_is_found(tmp_path):
    for rel, text in {f"{PACKAGE}/__init__.py": "", f"{PACKAGE}/store/__init__.py": "",
                      f"{PACKAGE}/store/key.py": f"from {PACKAGE}.backends import base\n",
                      f"{PACKAGE}/backends/__init__.py": "", f"{PACKAGE}/backends/base.py": "",
                      "scripts/.keep": "", "tests/.keep": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = upward_arrows(modules(tmp_path))
    assert found and "store.key (store) imports" in found[0] and "backends" in found[0]
