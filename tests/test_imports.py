"""The package's import graph has no cycle, and no module hides a builtin (``make lint`` runs this file).

A cycle is how a package loses its layers: two modules that import each other cannot be read, tested or moved one
without the other, and their import order starts to matter. The graph is read from the source with ``ast`` (no
module is executed), with every ``import`` counted, also those inside functions (a deferred import only hides a
cycle from the interpreter, not from the reader), and an import of ``dlp.a.b`` counted as one of the package
``dlp.a`` too, since Python runs ``dlp/a/__init__.py`` first (except from a module inside ``dlp.a`` itself).
"""

from __future__ import annotations

import ast
import builtins
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "dlp"


def module_files(package: Path) -> dict[str, Path]:
    """``dlp.x.y`` → its file, for every module and package under ``package``."""
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _imported(module: str, path: Path, node: ast.AST, known: dict[str, Path]) -> set[str]:
    """The package modules one import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = package[: len(package) - node.level + 1] if node.level else []
        target = ".".join(base + ([node.module] if node.module else []))
        names = [target] + [f"{target}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
    else:
        return set()
    found = set()
    for name in names:
        parts = name.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in known)
    # a module's own enclosing packages are already loading when it runs (peft's pattern: a package's __init__
    # imports its modules, which import each other): not an edge
    return {name for name in found if not module.startswith(f"{name}.")}


def import_graph(package: Path) -> dict[str, set[str]]:
    known = module_files(package)
    return {
        module: {
            found
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            for found in _imported(module, path, node, known)
        }
        - {module, package.name}  # the root package's __init__ imports nothing of its own
        for module, path in known.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return path[path.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def shadowing_names(package: Path) -> list[str]:
    """Modules named like a builtin or a standard-library module (``slice``, ``io``): importing such a submodule
    binds that name in its package's namespace, and a reader takes ``io.atomic_file`` for the standard library."""
    taken = set(dir(builtins)) | set(sys.stdlib_module_names)
    return sorted(name for name in module_files(package) if name.rsplit(".", 1)[-1] in taken)


def test_no_module_is_named_like_a_builtin_or_the_standard_library():
    assert shadowing_names(PACKAGE) == []


def test_the_shadowing_check_finds_slice_and_io(tmp_path):
    package = tmp_path / "pkg"
    (package / "stages").mkdir(parents=True)
    for name in ("__init__.py", "io.py", "rundir.py", "stages/__init__.py", "stages/slice.py", "stages/cut.py"):
        (package / name).write_text("")
    assert shadowing_names(package) == ["pkg.io", "pkg.stages.slice"]


def test_the_cycle_finder_finds_a_hand_made_cycle_and_a_deferred_import(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("def f():\n    from .sub.c import y  # deferred: still an edge\n")
    (package / "sub" / "__init__.py").write_text("from . import c\n")
    (package / "sub" / "c.py").write_text("import pkg.d\n")
    (package / "sub" / "e.py").write_text("from .c import w  # a sibling: its own package is not an edge\n")
    (package / "d.py").write_text("")
    graph = import_graph(package)
    assert graph["pkg.sub.e"] == {"pkg.sub.c"}
    assert graph["pkg.b"] == {"pkg.sub", "pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.d"}
    assert find_cycle(graph) is None
    (package / "d.py").write_text("from .a import z\n")
    assert find_cycle(import_graph(package)) == ["pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.d", "pkg.a"]
