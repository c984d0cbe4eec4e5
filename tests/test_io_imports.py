"""The io package imports in one direction (issue 15): no import cycle among its modules.

A cycle dodged with a function-local import still counts: the graph below is read with ``ast`` from
every import statement, at module level or inside functions, so moving an import into a function
does not hide it. Order: ``particle_set`` and ``relion_tables`` <- ``cs`` <- ``star`` <- ``particles``.
"""
from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

import cryofastar_core

PACKAGE_ROOT = Path(cryofastar_core.__file__).resolve().parent.parent  # the folder holding cryofastar_core/
IO = "cryofastar_core.io"


def module_file(name: str, root: Path = PACKAGE_ROOT) -> Path | None:
    """The source file of module ``name`` under ``root`` (a package's ``__init__.py``), or None."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(name: str, root: Path = PACKAGE_ROOT) -> set[str]:
    """Every ``cryofastar_core`` module that module ``name`` imports anywhere in its source (module level,
    functions, methods). ``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module,
    else ``pkg`` itself; importing a module also runs the ``__init__`` of each enclosing package that
    does not already enclose ``name``."""
    path = module_file(name, root)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    own_package = name if is_package else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                targets.add(sub if module_file(sub, root) is not None else source)
    out = set()
    for target in targets:
        if target != "cryofastar_core" and not target.startswith("cryofastar_core."):
            continue
        parts = target.split(".")
        for i in range(2, len(parts) + 1):
            parent = ".".join(parts[:i])
            if module_file(parent, root) is None:
                continue
            if i < len(parts) and (name == parent or name.startswith(parent + ".")):
                continue  # an enclosing package of the importer has already started
            out.add(parent)
    out.discard(name)
    return out


def _is_script_entry(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``: it runs after every import has finished, so no import in it can
    take part in an import-order cycle."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                    for c in test.comparators))


def _import_nodes(tree: ast.Module):
    """Every import statement of a module, at any depth, except inside its script entry."""
    todo = [n for n in tree.body if not _is_script_entry(n)]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        todo.extend(ast.iter_child_nodes(node))


def import_graph(start: list[str], root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """The ``cryofastar_core`` import graph reachable from the modules ``start``."""
    graph: dict[str, set[str]] = {}
    todo = list(start)
    while todo:
        name = todo.pop()
        if name in graph:
            continue
        graph[name] = imported_modules(name, root)
        todo.extend(graph[name] - graph.keys())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def io_modules(root: Path = PACKAGE_ROOT) -> list[str]:
    folder = root / "cryofastar_core" / "io"
    return sorted(f"{IO}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")


def io_cycles(root: Path = PACKAGE_ROOT) -> list[list[str]]:
    """Import cycles that pass through an io module (the package ``__init__`` included)."""
    graph = import_graph([IO, *io_modules(root)], root)
    return [c for c in cycles(graph) if any(m == IO or m.startswith(IO + ".") for m in c)]


def test_io_import_graph_is_acyclic():
    assert io_cycles() == [], "io modules import each other in a circle (function-local imports included)"


def test_graph_reader_sees_function_local_imports(tmp_path):
    """The checker itself: a cycle closed only by an import inside a function is reported."""
    io = tmp_path / "cryofastar_core" / "io"
    io.mkdir(parents=True)
    (tmp_path / "cryofastar_core" / "__init__.py").write_text("")
    (io / "__init__.py").write_text("from cryofastar_core.io.a import f\n")
    (io / "a.py").write_text("from cryofastar_core.io.b import g\n\ndef f():\n    return g()\n")
    (io / "b.py").write_text("def g():\n    from cryofastar_core.io.a import f\n    return f\n")
    assert io_cycles(tmp_path) == [[f"{IO}.a", f"{IO}.b"]]
    (io / "b.py").write_text("def g():\n    return 1\n")
    assert io_cycles(tmp_path) == []


def test_the_former_cycle_modules_are_in_the_graph():
    graph = import_graph([IO, *io_modules()])
    assert f"{IO}.particle_set" in graph[f"{IO}.star"] and f"{IO}.particle_set" in graph[f"{IO}.cs"]
    assert f"{IO}.star" not in graph[f"{IO}.cs"]
    assert f"{IO}.star" in graph[f"{IO}.particles"] and f"{IO}.cs" in graph[f"{IO}.particles"]


_STUB_PACKAGE = """
import importlib, sys, types
import cryofastar_core
pkg = types.ModuleType({io!r})
pkg.__path__ = [{path!r}]
sys.modules[{io!r}] = pkg  # the package without its __init__, which would otherwise fix the order
for name in {order!r}:
    importlib.import_module({io!r} + "." + name)
"""


@pytest.mark.parametrize("order", list(itertools.permutations(["star", "cs", "particles"])), ids="-".join)
def test_io_modules_import_in_any_order(order):
    """In a fresh interpreter, each order of the three formerly circular modules imports (the package's
    ``__init__`` is bypassed, since it would import them in its own order first)."""
    code = _STUB_PACKAGE.format(io=IO, path=str(PACKAGE_ROOT / "cryofastar_core" / "io"), order=list(order))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("module", ["star", "cs", "particles"])
def test_io_module_imports_first_in_fresh_interpreter(module):
    code = (f"import cryofastar_core.io.{module}\n"
            "from cryofastar_core.io import (CONFIDENCE_LABEL, CTF_FIELDS, ParticleSet, atomic_output, new_star,\n"
            "    read_map, read_particles, write_map, write_particles_cs, write_particles_star, write_stack)\n"
            "from cryofastar_core.io.particles import ParticleSet as P, check_stacks, read_particles as r\n"
            "from cryofastar_core.io.star import IMAGE_NAME, OPTICS_GROUP, build_optics, read_star_particles\n"
            "from cryofastar_core.io.cs import dataset_frame, dataset_to_relion31, read_cs_particles\n"
            "assert P is ParticleSet and r is read_particles\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
