"""The package's structure, as the developers' guide asks it: layers (checked by import-linter in test.sh), no import
of foldgpt written inside a function (but the CLI's dispatch), no private name used across modules, and nothing in
the package importing its top-level ``foldgpt/__init__.py`` back."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "foldgpt"
DISPATCH = ("cli/main.py", "dispatch")  # the one function that may import the command module it runs


def package_modules() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if path.name != "__init__.py" or path.parent != PACKAGE)


def foldgpt_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    found: list[ast.ImportFrom | ast.Import] = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "foldgpt") or (isinstance(node, ast.Import) and any(alias.name.split(".")[0] == "foldgpt" for alias in node.names)):
            found.append(node)
    return found


def inner_imports(path: Path) -> list[str]:
    """``name:line`` of every foldgpt import inside a function of ``path``."""
    tree = ast.parse(path.read_text())
    where = []
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if (str(path.relative_to(PACKAGE)), function.name) == DISPATCH:
            continue
        where += [f"{path.relative_to(PACKAGE)}:{node.lineno}" for node in foldgpt_imports(function)]
    return sorted(set(where))


def test_no_foldgpt_import_is_written_inside_a_function():
    found = [where for path in package_modules() for where in inner_imports(path)]
    assert found == [], f"imports of foldgpt inside functions (move them to the top of the module): {found}"


def test_no_private_name_is_imported_across_modules():
    found = []
    for path in [*package_modules(), *Path(PACKAGE.parent, "tests").glob("*.py")]:
        for node in foldgpt_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                found += [f"{path.name}: {node.module}.{alias.name}" for alias in node.names
                          if alias.name.startswith("_") and alias.name != "__version__"]
    assert found == []


def test_nothing_in_the_package_imports_its_top_level_module():
    found = []
    for path in package_modules():
        for node in foldgpt_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "foldgpt":
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
            if isinstance(node, ast.Import) and any(alias.name == "foldgpt" for alias in node.names):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert found == []


def test_every_public_name_of_the_package_resolves():
    import foldgpt

    for name in foldgpt.__all__:
        assert getattr(foldgpt, name) is not None, name


def test_the_type_stub_declares_every_lazy_export_from_its_module():
    """``__init__.pyi`` is what editors and type checkers see of the lazy exports: it must name each of them, from
    the module ``__getattr__`` imports it from."""
    import foldgpt

    stub = ast.parse((PACKAGE / "__init__.pyi").read_text())
    imported = {alias.asname or alias.name: node.module for node in stub.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assigned = {target.id for node in stub.body if isinstance(node, ast.Assign) for target in node.targets}
    assert sorted({*imported, *assigned}) == sorted(foldgpt.__all__)
    for name, module in imported.items():
        assert getattr(importlib.import_module(module), name) is getattr(foldgpt, name), name


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["compress", "--help"]])
def test_the_parser_imports_no_heavy_library(argv):
    """``foldgpt --help`` must stay fast: torch, transformers and lm-eval are imported by the commands that run."""
    code = ("import sys; from foldgpt.cli.main import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'lm_eval', 'peft', 'matplotlib') if m in sys.modules)\n"
            "print('HEAVY', heavy)")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []", result.stdout[-500:]
    assert time.perf_counter() - start < 30  # a generous bound against hangs; the speed target lives in benchmarks/
