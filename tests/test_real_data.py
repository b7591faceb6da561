"""A short real training run on the 10 Monkey Species set named by $MONKEYTRAIN_TEST_DATA.

The run is a process of its own, started by the first test of the session and checked by the
last: it trains while the rest of the suite runs. Not a job for conftest's background thread, whose
other jobs take most of the session already.
"""

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
ODD_FILES = {"n9151jpg", "n9160.png"}  # no extension; a PNG among the JPEGs
needs_the_data = pytest.mark.skipif(not REAL_DATA, reason="set MONKEYTRAIN_TEST_DATA to the 10 Monkey Species folder")


def start_training_on_the_real_data(folder: Path) -> subprocess.Popen:
    # The CPU recipe's defaults (default EMA included), only with fewer epochs: with 3 the test
    # accuracy was 40.8% (seed 0) and 41.9% (seed 1), clear of the 30% bar at 3/8 of the cost of 8.
    # One thread, as the whole suite (see conftest's `one_thread_per_run`).
    command = [
        sys.executable, str(PROJECT / "monkeytrain" / "train.py"), "--data", REAL_DATA, "--cpu",
        "--epochs", "3", "--run-name", "real", "--cache-dir", str(folder / "cache"), "--cpu-threads", "1",
    ]
    with open(folder / "output.txt", "w") as output:  # a file, not a pipe, which nobody reads until the end
        return subprocess.Popen(command, cwd=folder, stdout=output, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def real_run(tmp_path_factory) -> tuple[Path, subprocess.Popen]:
    folder = tmp_path_factory.mktemp("real")
    with start_training_on_the_real_data(folder) as training:
        yield folder, training
        training.kill()  # still running only if the last test did not wait for it


@needs_the_data
@pytest.mark.first
def test_the_real_data_set_is_the_kaggle_layout_with_its_two_odd_files(real_run):
    root = Path(REAL_DATA)
    train = [p for p in (root / "training" / "training").glob("n*/*") if p.is_file()]
    test = [p for p in (root / "validation" / "validation").glob("n*/*") if p.is_file()]
    assert (len(train), len(test)) == (1097, 272)
    assert ODD_FILES <= {p.name for p in train + test}


@needs_the_data
@pytest.mark.last
def test_cpu_recipe_run_beats_three_times_chance_and_uses_odd_files(real_run):
    folder, training = real_run
    assert training.wait(timeout=1200) == 0, (folder / "output.txt").read_text()[-3000:]
    run_dir = folder / "runs" / "real"
    results = json.loads((run_dir / "results.json").read_text())
    manifest = json.loads((run_dir / "data_manifest.json").read_text())

    assert results["test_images"] == 272  # the validation/ folder, scored as the test split
    assert results["test_accuracy"] > 3 * 0.1, results["test_accuracy"]
    assert results["selection_biased"] is False
    used = {Path(p).name for split in ("train", "val") for p in manifest["files"][split]}
    assert ODD_FILES <= used
    assert manifest["skipped_count"] == 0
    assert manifest["class_names"][0] == "mantled howler"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["recipe"] == "cpu" and config["ema_decay"] > 0
    assert results["data_pipeline"] == "resident"
