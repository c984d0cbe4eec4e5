"""The package's shape holds (issue 23): folders that name the parts, no import cycle anywhere in the
engine, short functions, no argparse inside the engine, and bench/adapters using only public names.

Static checks over the source (``ast``), so they name the file and line that breaks them.
"""
from __future__ import annotations

import ast
from pathlib import Path

from test_io_imports import PACKAGE_ROOT, cycles, import_graph

ENGINE = PACKAGE_ROOT / "cryofastar_core"
SHELLS = ["bench", "relion_external", "plugin", "deploy", "scripts"]
MAX_FUNCTION_LINES = 100
MAX_TOP_LEVEL_MODULES = 8


def engine_modules(root: Path = PACKAGE_ROOT) -> list[str]:
    names = []
    for path in sorted((root / "cryofastar_core").rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        names.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return names


def _parsed(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        if ".venv" not in path.parts:
            yield path, ast.parse(path.read_text(), filename=str(path))


def test_engine_import_graph_is_acyclic():
    """Function-local imports count (tests/test_io_imports.py reads them); script entries do not."""
    assert cycles(import_graph(engine_modules())) == []


def test_checker_sees_a_cycle_between_two_folders(tmp_path):
    pkg = tmp_path / "cryofastar_core"
    for sub in ("a", "b"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "x.py").write_text("from cryofastar_core.b.y import g\n")
    (pkg / "b" / "y.py").write_text("def g():\n    from cryofastar_core.a.x import g\n")
    assert cycles(import_graph(engine_modules(tmp_path), tmp_path)) == [["cryofastar_core.a.x", "cryofastar_core.b.y"]]
    (pkg / "b" / "y.py").write_text("def g():\n    return 1\n\nif __name__ == '__main__':\n"
                                    "    from cryofastar_core.a.x import g\n")
    assert cycles(import_graph(engine_modules(tmp_path), tmp_path)) == []


def test_top_level_holds_only_what_every_part_uses():
    modules = sorted(p.name for p in ENGINE.glob("*.py") if p.name != "__init__.py")
    assert len(modules) <= MAX_TOP_LEVEL_MODULES, modules
    for folder in (p for p in ENGINE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        if any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"{folder} has modules but no __init__.py"
            assert (folder / "__init__.py").read_text().lstrip().startswith('"""'), \
                f"{folder}/__init__.py: say in a docstring what lives in this folder"


def test_no_function_longer_than_the_limit():
    long = []
    for folder in [ENGINE, *(PACKAGE_ROOT / s for s in ("relion_external", "plugin"))]:
        for path, tree in _parsed(folder):
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(PACKAGE_ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert long == []


def test_argparse_only_in_the_command_line_shells():
    found = []
    for path, tree in _parsed(ENGINE):
        if "cli" in path.relative_to(ENGINE).parts:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                found.append(f"{path.relative_to(PACKAGE_ROOT)}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module == "argparse":
                found.append(f"{path.relative_to(PACKAGE_ROOT)}:{node.lineno}")
    assert found == []


def _private_imports(path: Path, tree: ast.AST, importer_package: str | None) -> list[str]:
    """``from cryofastar_core.X import _name`` where X is outside the importer's own engine package."""
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cryofastar_core"):
            source_package = ".".join(node.module.split(".")[:2])
            if importer_package is not None and source_package == importer_package:
                continue
            bad += [f"{path.relative_to(PACKAGE_ROOT)}:{node.lineno} {node.module}.{a.name}"
                    for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return bad


def test_shells_and_other_parts_use_only_public_names():
    bad = []
    for shell in SHELLS:
        for path, tree in _parsed(PACKAGE_ROOT / shell):
            bad += _private_imports(path, tree, None)
    for path, tree in _parsed(ENGINE):
        rel = path.relative_to(ENGINE).parts
        own = "cryofastar_core." + (rel[0] if len(rel) > 1 else Path(rel[0]).stem)
        bad += _private_imports(path, tree, own)
    assert bad == []
