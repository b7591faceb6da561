"""A short real training run on the 10 Monkey Species set named by $MONKEYTRAIN_TEST_DATA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REAL_DATA = os.environ.get("MONKEYTRAIN_TEST_DATA")
PROJECT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not REAL_DATA, reason="set MONKEYTRAIN_TEST_DATA to the 10 Monkey Species folder")
def test_cpu_recipe_run_beats_three_times_chance_and_uses_odd_files(tmp_path):
    # The CPU recipe's defaults (default EMA included), only with fewer epochs: with 3 the test
    # accuracy was 40.8% (seed 0) and 41.9% (seed 1), clear of the 30% bar at 3/8 of the cost of 8.
    command = [
        sys.executable, str(PROJECT / "monkeytrain" / "train.py"), "--data", REAL_DATA, "--cpu",
        "--epochs", "3", "--run-name", "real", "--cache-dir", str(tmp_path / "cache"),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "real"
    results = json.loads((run_dir / "results.json").read_text())
    manifest = json.loads((run_dir / "data_manifest.json").read_text())

    assert results["test_images"] == 272  # the validation/ folder, scored as the test split
    assert results["test_accuracy"] > 3 * 0.1, results["test_accuracy"]
    assert results["selection_biased"] is False
    used = {Path(p).name for split in ("train", "val") for p in manifest["files"][split]}
    assert {"n9151jpg", "n9160.png"} <= used
    assert manifest["skipped_count"] == 0
    assert manifest["class_names"][0] == "mantled howler"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["recipe"] == "cpu" and config["ema_decay"] > 0
    assert results["data_pipeline"] == "resident"
