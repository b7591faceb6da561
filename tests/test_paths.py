"""An output or cache folder that cannot be made ends the real entry point in one sentence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent
QUICK = ["--debug", "--image-size", "32", "--model", "resnet10t"]


def train(arguments: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "MONKEYTRAIN_CACHE": str(cache), "PYTHONPATH": str(PROJECT)}
    environment.pop("MONKEYTRAIN_DATA", None)
    return subprocess.run([sys.executable, str(PROJECT / "monkeytrain" / "train.py"), *QUICK, *arguments],
                          cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag, folder", [("--output-dir", "/proc/nope/runs"), ("--cache-dir", "/proc/nope/cache")])
def test_an_unusable_folder_exits_2_with_one_error_line(tmp_path, flag, folder):
    done = train([flag, folder], cwd=tmp_path, cache=tmp_path / "cache")
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("monkeytrain: error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    assert errors[0].startswith(f"monkeytrain: error: cannot create or write the folder {folder}")
    assert errors[0].endswith(f"pick a writable {flag}.")
