"""The package's shape, checked: imports flow one way, only ui/ imports gradio, modules stay readable, and the
README's module table is the modules' own docstrings."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "rlhf_live"
LAYER = {
    "__init__": 9,
    "__main__": 9,
    "config": 0,
    "flags": 1,
    "logs": 0,
    "model": 1,
    "store": 2,
    "serving": 3,
    "learning": 3,
    "eval": 5,
    "runtime": 4,
    "api": 6,
    "ui": 7,
    "cli": 8,
}
"""Each part may import only parts of a lower layer, or itself; serving and learning share a layer: neither imports
the other (DESIGN.md, "Imports flow one way")."""
LONG_FUNCTIONS = {("learning/ppo.py", "step")}
"""PPO's one update reads top to bottom as cleanrl's does: it may stay one function."""


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text()), path


def _imports(tree: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_imports_flow_one_way_and_serving_and_learning_import_neither_the_other():
    wrong = []
    for name, tree, _ in _modules():
        part = name.split("/")[0].removesuffix(".py")
        for module in _imports(tree):
            if not module.startswith("rlhf_live."):
                continue
            other = module.split(".")[1]
            if other != part and (LAYER[other] >= LAYER[part]):
                wrong.append(f"{name} imports {module}")
    assert wrong == []


def test_only_ui_imports_gradio():
    importers = {name for name, tree, _ in _modules() if any(m.split(".")[0] == "gradio" for m in _imports(tree))}
    assert importers and all(name.startswith("ui/") for name in importers), importers


def test_modules_and_functions_stay_short():
    long_modules = {name: path.read_text().count("\n") for name, _, path in _modules()}
    assert {n: lines for n, lines in long_modules.items() if lines > 400} == {}
    long_functions = {
        (name, node.name)
        for name, tree, _ in _modules()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80
    }
    assert long_functions <= LONG_FUNCTIONS


def test_every_module_says_what_it_is():
    assert [name for name, tree, _ in _modules() if not ast.get_docstring(tree)] == []


def test_the_readme_module_table_is_the_modules_docstrings():
    spec = importlib.util.spec_from_file_location("module_table", ROOT / "scripts" / "module_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    readme = (ROOT / "README.md").read_text()
    # After a docstring changes: `python scripts/module_table.py --write`.
    assert table.readme_block(readme) == table.table()
