"""The shape the trainer refactor gave the package, kept: train.py is wiring, and no function
takes more than six parameters (pass the object that owns them instead)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "monkeytrain"
MAX_PARAMETERS = 6  # self and cls not counted
MAX_TRAIN_LINES = 100
MAX_LINE_LENGTH = 120  # STYLE's bound, for code and tests alike


def parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = function.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return [name for name in names if name not in ("self", "cls")]


def test_no_function_in_the_package_takes_more_than_six_parameters():
    too_many = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}({', '.join(parameters(node))})"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(parameters(node)) > MAX_PARAMETERS
    ]
    assert not too_many, too_many


def test_train_py_stays_wiring():
    assert len((PACKAGE / "train.py").read_text().splitlines()) <= MAX_TRAIN_LINES


def test_no_line_of_the_package_or_its_tests_is_longer_than_120_characters():
    files = sorted([*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "tests").glob("*.py")])
    too_long = [f"{path.relative_to(PACKAGE.parent)}:{number}" for path in files
                for number, line in enumerate(path.read_text().splitlines(), start=1) if len(line) > MAX_LINE_LENGTH]
    assert not too_long, too_long


def test_the_readmes_layout_names_every_module_and_benchmark():
    """The Layout section is where a reader finds which file does what: a new file must appear there."""
    readme = (PACKAGE.parent / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    files = [path.name for path in sorted(PACKAGE.rglob("*.py")) if path.name != "__init__.py"]
    files += [path.name for path in sorted((PACKAGE.parent / "benchmarks").iterdir()) if path.is_file()]
    assert [name for name in files if name not in layout] == []
