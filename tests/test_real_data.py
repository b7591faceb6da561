"""A short real training run on the 10 Monkey Species set named by $MONKEYTRAIN_TEST_DATA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REAL_DATA = os.environ.get("MONKEYTRAIN_TEST_DATA")
PROJECT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not REAL_DATA, reason="set MONKEYTRAIN_TEST_DATA to the 10 Monkey Species folder")
def test_low_resolution_cpu_run_beats_twice_chance_and_uses_odd_files(tmp_path):
    command = [
        sys.executable, str(PROJECT / "monkeytrain" / "train.py"), "--data", REAL_DATA, "--cpu",
        "--image-size", "64", "--epochs", "5", "--batch-size", "32", "--num-workers", "2",
        "--lr", "0.05", "--ema-decay", "0",  # an EMA needs far more than these 150 steps
        "--run-name", "real", "--cache-dir", str(tmp_path / "cache"),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "real"
    results = json.loads((run_dir / "results.json").read_text())
    manifest = json.loads((run_dir / "data_manifest.json").read_text())

    assert results["test_images"] == 272  # the validation/ folder, scored as the test split
    assert results["test_accuracy"] > 2 * 0.1, results["test_accuracy"]
    assert results["selection_biased"] is False
    used = {Path(p).name for split in ("train", "val") for p in manifest["files"][split]}
    assert {"n9151jpg", "n9160.png"} <= used
    assert manifest["skipped_count"] == 0
    assert manifest["class_names"][0] == "mantled howler"
