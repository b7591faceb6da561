"""An output or cache folder that cannot be made ends the real entry point in one sentence."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
from conftest import started_at_once

PROJECT = Path(__file__).resolve().parent.parent
QUICK = ["--debug", "--image-size", "32", "--model", "resnet10t"]
UNUSABLE = {"--output-dir": "/proc/nope/runs", "--cache-dir": "/proc/nope/cache"}


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> Iterator[dict[str, subprocess.Popen]]:
    """flag -> the entry point run with that flag naming an unusable folder, both started at once."""
    runs = {}
    for flag, folder in UNUSABLE.items():
        cwd = tmp_path_factory.mktemp("paths")
        environment = {**os.environ, "MONKEYTRAIN_CACHE": str(cwd / "cache"), "PYTHONPATH": str(PROJECT)}
        environment.pop("MONKEYTRAIN_DATA", None)
        runs[flag] = ([sys.executable, str(PROJECT / "monkeytrain" / "train.py"), *QUICK, flag, folder], cwd,
                      environment)
    with started_at_once(runs) as processes:
        yield processes


@pytest.mark.parametrize("flag, folder", UNUSABLE.items())
def test_an_unusable_folder_exits_2_with_one_error_line(started, flag, folder):
    _, stderr = started[flag].communicate(timeout=300)
    assert started[flag].returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("monkeytrain: error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith(f"monkeytrain: error: cannot create or write the folder {folder}")
    assert errors[0].endswith(f"pick a writable {flag}.")
