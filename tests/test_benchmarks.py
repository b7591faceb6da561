"""The benchmark scripts in their tiny CPU modes, so they cannot rot.

Both run a tiny model on one thread (on a busy 2-core machine a second thread
mostly waits) and share one cache, so the synthetic set is generated once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY_MODEL = "resnet10t"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("benchmark-cache")


def benchmark(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("MONKEYTRAIN_DATA", None)
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_throughput_tiny_mode_prints_every_figure_and_ratio(tmp_path, cache_dir):
    done = benchmark([str(BENCHMARKS / "throughput.py"), "--tiny", "--model", TINY_MODEL,
                      "--cache-dir", str(cache_dir)], tmp_path)
    figures = {name: float(value) for name, value in
               re.findall(r"^(model alone|resident pipeline|stream pipeline)\s+([\d.]+) images/s", done.stdout, re.M)}
    assert set(figures) == {"model alone", "resident pipeline", "stream pipeline"} and min(figures.values()) > 0
    assert re.search(r"resident pipeline .* of model alone", done.stdout)
    ratio = float(re.search(r"resident views .*\(([\d.]+)x the raw uint8 size\)", done.stdout).group(1))
    assert ratio == 1.0  # on the CPU the views are held as they are, nothing more
    assert f", {TINY_MODEL}, 32 px, batch 8, no," in done.stdout  # the tiny mode's settings, and our model


def test_time_to_accuracy_reports_each_seed_and_the_mean(tmp_path, cache_dir):
    done = benchmark([str(BENCHMARKS / "time_to_accuracy.py"), "--seeds", "2", "--debug", "--image-size", "32",
                      "--model", TINY_MODEL, "--cpu-threads", "1", "--cache-dir", str(cache_dir)], tmp_path)
    per_seed = re.findall(r"^seed (\d+)\s+test accuracy\s+([\d.]+)%.*wall\s+([\d.]+) s$", done.stdout, re.M)
    assert [int(seed) for seed, _, _ in per_seed] == [0, 1]
    accuracies = [float(accuracy) for _, accuracy, _ in per_seed]
    mean = float(re.search(r"^test accuracy\s+([\d.]+)% mean, ([\d.]+) points std", done.stdout, re.M).group(1))
    assert mean == pytest.approx(sum(accuracies) / 2, abs=0.006)
    assert all(float(wall) > 0 for _, _, wall in per_seed)
    assert re.search(r"^data pipeline\s+resident\s+recipe cpu", done.stdout, re.M)
    phases = dict(re.findall(r"(\w+) ([\d.]+)", re.search(r"^phases \(mean s\)\s+(.*)$", done.stdout, re.M).group(1)))
    assert set(phases) == {"start_up", "data", "model", "training", "first_epoch", "validation", "test"}
    assert float(phases["start_up"]) > 0 and float(phases["training"]) >= float(phases["first_epoch"]) > 0
