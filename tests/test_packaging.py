"""pyproject.toml: a non-editable install ships every module of the package, sub-packages included."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import monkeytrain

PROJECT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_every_module_of_the_source_tree(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(PROJECT / "monkeytrain", source / "monkeytrain",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT / name, source / name)
    # Without build isolation: no download, the setuptools that torch brings along builds it.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(source)], check=True)
    wheel, = (tmp_path / "dist").glob("monkeytrain-*.whl")
    assert wheel.name.startswith(f"monkeytrain-{monkeytrain.__version__}-")  # the version --version prints
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    expected = {path.relative_to(source).as_posix() for path in (source / "monkeytrain").rglob("*.py")}
    assert "monkeytrain/data/views.py" in expected
    assert expected <= shipped, f"missing from the wheel: {sorted(expected - shipped)}"
