"""The README's module table, generated from the modules' own docstrings so it cannot drift.

python scripts/module_table.py          # print the table
python scripts/module_table.py --write  # put it between the README's markers
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- modules:start -->", "<!-- modules:end -->"
LAYERS = [
    "__init__",
    "config",
    "flags",
    "logs",
    "model",
    "store",
    "serving",
    "learning",
    "runtime",
    "eval",
    "api",
    "ui",
    "cli",
    "__main__",
]
"""The package's parts in the order imports flow (each imports only those before it; serving and learning neither)."""


def summary(path: Path) -> str:
    """A module's docstring up to its first blank line, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("|", "\\|")


def table() -> str:
    """Markdown rows: every module of the package, by folder, with what its docstring says it is."""
    rows = ["| module | what it is (its docstring) |", "|---|---|"]
    package = ROOT / "rlhf_live"

    def order(path: Path) -> tuple:
        parts = path.relative_to(package).with_suffix("").parts
        return (LAYERS.index(parts[0]), len(parts), parts[-1] != "__init__", parts)

    for path in sorted(package.rglob("*.py"), key=order):
        name = path.relative_to(package).as_posix()
        if name in {"__main__.py"}:
            continue
        rows.append(f"| `{name.replace('/__init__.py', '/')}` | {summary(path)} |")
    return "\n".join(rows)


def readme_block(text: str) -> str:
    """What sits between the README's markers."""
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def main() -> None:
    readme = ROOT / "README.md"
    if "--write" not in sys.argv:
        print(table())
        return
    text = readme.read_text()
    head, rest = text.split(START, 1)
    readme.write_text(f"{head}{START}\n{table()}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    main()
