"""Layers that point one way: every module of the package imports on its own, the import graph
has no cycle, and imports only point down the layer order.

The graph is read from the source with ``ast``: every ``import`` statement, at module level and
inside functions (a deferred import is still a dependency), except those under ``if
TYPE_CHECKING:`` and the lazy ``__getattr__`` of a package ``__init__`` (which exists to reach
every submodule on demand).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import interp_lib

PACKAGE_DIR = Path(interp_lib.__file__).resolve().parent
PACKAGE = "interp_lib"

# Lowest first: a module may import modules of its own layer or a lower one, never a higher one.
# A name covers the module and, for a package, everything in it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("interp_lib", "models", "data", "units", "paths", "artifacts", "errors", "runtime", "streaming",
                    "checkpoint", "safe_serialize", "signing", "versions", "display")),
    ("analyses", ("calibration", "selective", "attribution", "patching", "heads", "probing", "stats",
                  "explain", "circuits")),
    ("figures", ("plots",)),
    ("notebook glue", ("claims", "findings", "notebook", "results")),
    ("commands", ("runner", "notebook_params", "tasks", "cluster", "cli")),
]

# Edges that still break the rules, each with what should replace it. Every entry must still
# exist and still be needed (a layer violation, or an edge that closes a cycle): the test fails
# on a stale entry, so this list only shrinks. Empty it; do not add to it.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}


# --------------------------------------------------------------------------------------------
# Reading the package
# --------------------------------------------------------------------------------------------

def package_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (packages by __init__)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if "__pycache__" in parts:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
            or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every import statement of one module as (dotted target, line), resolved against the
    package's modules."""

    def __init__(self, module: str, is_package: bool, modules: set[str]):
        self.module, self.modules = module, modules
        self.base = module if is_package else module.rpartition(".")[0]
        self.is_package = is_package
        self.found: list[tuple[str, int]] = []
        self.depth = 0

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        if self.is_package and self.depth == 0 and node.name == "__getattr__":
            return  # the lazy attribute hook of a package: reaches every submodule by design
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                self.found.append((self._closest(alias.name), node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.base.split(".")
            base = ".".join(parts[:len(parts) - (node.level - 1)])
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
            if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
                return
        for alias in node.names:
            submodule = f"{target}.{alias.name}"
            self.found.append((submodule if submodule in self.modules else self._closest(target), node.lineno))

    def _closest(self, name: str) -> str:
        while name not in self.modules and "." in name:
            name = name.rpartition(".")[0]
        return name


def import_graph() -> dict[str, dict[str, int]]:
    """importer -> {imported module: first line}, self-imports left out."""
    modules = package_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        visitor = _Imports(name, path.name == "__init__.py", set(modules))
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges: dict[str, int] = {}
        for target, line in visitor.found:
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    """The index of ``module``'s layer in LAYERS; KeyError naming it when it has none."""
    relative = module[len(PACKAGE) + 1:] if module != PACKAGE else PACKAGE
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if relative == name or relative.startswith(name + "."):
                return index
    raise KeyError(module)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _edges_without_known(graph: dict[str, dict[str, int]]) -> dict[str, set[str]]:
    return {a: {b for b in targets if (a, b) not in KNOWN_VIOLATIONS} for a, targets in graph.items()}


def _short(module: str) -> str:
    return module[len(PACKAGE) + 1:] if module.startswith(PACKAGE + ".") else module


# --------------------------------------------------------------------------------------------
# The checks on the graph
# --------------------------------------------------------------------------------------------

def test_every_module_has_a_layer():
    missing = []
    for module in package_modules():
        try:
            layer_of(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"modules with no layer in tests/test_layers.py LAYERS: {missing}"


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(_edges_without_known(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(_short(m) for m in cycle)


def test_imports_point_down_the_layers():
    graph = import_graph()
    wrong = []
    for importer, targets in graph.items():
        for target, line in targets.items():
            if layer_of(target) > layer_of(importer) and (importer, target) not in KNOWN_VIOLATIONS:
                wrong.append(f"{_short(importer)} ({LAYERS[layer_of(importer)][0]}, line {line}) imports "
                             f"{_short(target)} ({LAYERS[layer_of(target)][0]})")
    assert not wrong, "imports that point up the layers:\n" + "\n".join(wrong)


def test_known_violations_are_still_needed():
    """An allow-listed edge that is gone, or no longer breaks a rule, must leave the list."""
    graph = import_graph()
    clean = _edges_without_known(graph)
    stale = []
    for (importer, target), why in KNOWN_VIOLATIONS.items():
        if target not in graph.get(importer, {}):
            stale.append(f"{_short(importer)} -> {_short(target)}: the import is gone")
            continue
        if layer_of(target) > layer_of(importer):
            continue
        with_edge = {a: set(b) for a, b in clean.items()}
        with_edge.setdefault(importer, set()).add(target)
        if find_cycle(with_edge) is None:
            stale.append(f"{_short(importer)} -> {_short(target)}: breaks no rule any more")
    assert not stale, "remove from KNOWN_VIOLATIONS:\n" + "\n".join(stale)


def test_the_graph_reader_sees_deferred_imports_and_skips_type_checking(tmp_path):
    """The reader on a planted module: a function-level import counts, a TYPE_CHECKING one and
    a package's lazy __getattr__ do not."""
    source = textwrap.dedent("""
        from typing import TYPE_CHECKING
        from . import paths
        if TYPE_CHECKING:
            from .runner import RunConfig
        def later():
            from .cli import main
            import interp_lib.results
        def __getattr__(name):
            from . import notebook
    """)
    modules = {"interp_lib", "interp_lib.paths", "interp_lib.runner", "interp_lib.cli", "interp_lib.results",
               "interp_lib.notebook", "interp_lib.explain", "interp_lib.explain.x"}
    as_module = _Imports("interp_lib.explain.x", False, modules)
    as_module.visit(ast.parse(source.replace("from . import paths", "from .. import paths")
                              .replace("from .runner", "from ..runner").replace("from .cli", "from ..cli")
                              .replace("from . import notebook", "from .. import notebook")))
    assert sorted(t for t, _ in as_module.found) == ["interp_lib.cli", "interp_lib.notebook",
                                                     "interp_lib.paths", "interp_lib.results"]
    as_package = _Imports("interp_lib", True, modules)
    as_package.visit(ast.parse(source))
    assert sorted(t for t, _ in as_package.found) == ["interp_lib.cli", "interp_lib.paths", "interp_lib.results"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


# --------------------------------------------------------------------------------------------
# Every module imports on its own
# --------------------------------------------------------------------------------------------

# Imports each module in a fresh child of one interpreter that has loaded the third-party
# packages (torch, pandas, ...) but no module of interp_lib: each child starts with none of the
# package in memory, as a fresh process would, at the cost of a fork instead of a torch import.
_ISOLATED_IMPORTS = textwrap.dedent("""
    import importlib, json, os, sys, traceback
    modules, third_party, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    package = modules[0].split(".")[0]
    for name in third_party:
        try:
            importlib.import_module(name)
        except Exception:
            pass  # optional: the module's own import will say
    loaded = [m for m in sys.modules if m == package or m.startswith(package + ".")]
    assert not loaded, f"{package} modules loaded before the children start: {loaded}"
    failures = {}
    for module in modules:
        if hasattr(os, "fork"):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read)
                try:
                    importlib.import_module(module)
                    message = ""
                except BaseException:
                    message = traceback.format_exc(limit=-3)
                os.write(write, message.encode())
                os._exit(0)
            os.close(write)
            with os.fdopen(read, encoding="utf-8", errors="replace") as pipe:
                message = pipe.read()
            _, status = os.waitpid(pid, 0)
            if status and not message:
                message = f"the child importing it died (wait status {status})"
        else:
            import subprocess
            done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
            message = done.stderr[-2000:] if done.returncode else ""
        if message:
            failures[module] = message
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(failures, handle)
""")


def _third_party_imports() -> list[str]:
    """Top-level packages the package's modules import at module level (not interp_lib)."""
    names: set[str] = set()
    for path in package_modules().values():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return sorted(n for n in names - {PACKAGE, "__future__"}
                  if n not in sys.stdlib_module_names and importlib.util.find_spec(n) is not None)


def isolated_import_failures(modules: list[str], third_party: list[str], root: Path, scratch: Path
                              ) -> dict[str, str]:
    """module -> traceback for each of ``modules`` (found under ``root``) that fails to import
    in an interpreter holding none of its package."""
    out = scratch / "failures.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _ISOLATED_IMPORTS, json.dumps(modules),
                           json.dumps(third_party), str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=scratch)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_isolation_check_catches_an_import_that_needs_another_first(tmp_path):
    """A planted cycle that works from one end only: ``a`` imports ``helper`` from ``b``, and ``b``
    imports ``a`` before defining ``helper``. Importing ``a`` first works; importing ``b`` first
    (as a process whose first use is ``b`` would) fails."""
    package = tmp_path / "planted_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from planted_pkg.b import helper\nVALUE = helper()\n")
    (package / "b.py").write_text("import planted_pkg.a\ndef helper():\n    return 1\n")
    failures = isolated_import_failures(["planted_pkg.a", "planted_pkg.b", "planted_pkg"], ["json"],
                                        tmp_path, tmp_path)
    assert sorted(failures) == ["planted_pkg.b"]
    assert "ImportError" in failures["planted_pkg.b"] and "partially initialized" in failures["planted_pkg.b"]


def test_every_module_imports_on_its_own(tmp_path):
    modules = sorted(package_modules())
    failures = isolated_import_failures(modules, _third_party_imports(), PACKAGE_DIR.parent, tmp_path)
    assert not failures, "modules that do not import on their own:\n" + "\n".join(
        f"{name}: {message.strip().splitlines()[-1]}" for name, message in failures.items())
    assert len(modules) > 30  # the walk found the package, not an empty folder


@pytest.mark.parametrize("module", ["interp_lib.runner", "interp_lib.cli", "interp_lib.artifacts",
                                    "interp_lib.runtime", "interp_lib.errors", "interp_lib.results"])
def test_command_and_recording_modules_are_cheap(module):
    """`interp-lib --help` and a notebook's record_metrics cell load no torch, pandas or scipy."""
    code = (f"import sys, {module}, interp_lib; interp_lib.record_metrics; "
            "print(sorted(m for m in ('torch', 'pandas', 'scipy', 'numpy', 'papermill') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=PACKAGE_DIR.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
