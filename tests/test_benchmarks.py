"""The benchmark scripts in their tiny CPU modes, so they cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_throughput_tiny_mode_prints_every_figure_and_ratio(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "throughput.py"), "--tiny", "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = {name: float(value) for name, value in
               re.findall(r"^(model alone|gpu pipeline|stream pipeline)\s+([\d.]+) images/s", done.stdout, re.M)}
    assert set(figures) == {"model alone", "gpu pipeline", "stream pipeline"} and min(figures.values()) > 0
    assert re.search(r"gpu pipeline .* of model alone", done.stdout)
    ratio = float(re.search(r"resident views .*\(([\d.]+)x the raw uint8 size\)", done.stdout).group(1))
    assert ratio == 1.0  # on the CPU the views are held as they are, nothing more


def test_time_to_accuracy_reports_the_run(tmp_path):
    done = subprocess.run([sys.executable, str(BENCHMARKS / "time_to_accuracy.py"), "--debug", "--image-size", "32",
                           "--cache-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    wall = float(re.search(r"wall time\s+([\d.]+) s", done.stdout).group(1))
    accuracy = float(re.search(r"test accuracy\s+([\d.]+)%", done.stdout).group(1))
    assert wall > 0 and 0 <= accuracy <= 100
    assert re.search(r"data pipeline\s+stream", done.stdout)
