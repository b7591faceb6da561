"""The benchmark scripts in their tiny CPU modes, so they cannot rot.

All run a tiny model on one thread (on a busy 2-core machine a second thread
mostly waits) and share one cache, so the synthetic set is generated once. They
are background jobs (conftest's `background_jobs`): the first test of the session
hands them over, the last ones read what they printed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Job

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TINY_MODEL = "resnet10t"


def benchmark(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("MONKEYTRAIN_DATA", None)
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=environment)


def tiny_commands(cache_dir: Path, runs_dir: Path) -> dict[str, list[str]]:
    return {
        "throughput": [str(BENCHMARKS / "throughput.py"), "--tiny", "--model", TINY_MODEL,
                       "--cache-dir", str(cache_dir)],
        "time_to_accuracy": [str(BENCHMARKS / "time_to_accuracy.py"), "--seeds", "2", "--debug", "--image-size",
                             "32", "--model", TINY_MODEL, "--cpu-threads", "1", "--cache-dir", str(cache_dir),
                             "--output-dir", str(runs_dir)],
        "cpu_profile": [str(BENCHMARKS / "cpu_profile.py"), "--debug", "--image-size", "32", "--model", TINY_MODEL,
                        "--cpu-threads", "1", "--cache-dir", str(cache_dir)],
    }


@pytest.fixture(scope="session")
def kept_runs(tmp_path_factory) -> Path:
    """Where time_to_accuracy's tiny run keeps its runs (--output-dir)."""
    return tmp_path_factory.mktemp("tta-runs")


@pytest.fixture(scope="session")
def benchmark_runs(tmp_path_factory, background_jobs, kept_runs) -> dict[str, Job]:
    """Each script's tiny run, one after the other (the second reuses the first's synthetic set)."""
    cache_dir = tmp_path_factory.mktemp("benchmark-cache")
    return {name: background_jobs.submit(functools.partial(benchmark, command, tmp_path_factory.mktemp(name)))
            for name, command in tiny_commands(cache_dir, kept_runs).items()}


def printed(job: Job) -> str:
    done = job.result()
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.first
def test_results_md_gives_each_benchmark_command(benchmark_runs):
    results = (BENCHMARKS / "RESULTS.md").read_text()
    for name in benchmark_runs:  # and their tiny runs are handed to the background thread
        assert f"python benchmarks/{name}.py" in results


@pytest.mark.last
def test_throughput_tiny_mode_prints_every_figure_and_ratio(benchmark_runs):
    stdout = printed(benchmark_runs["throughput"])
    figures = {name: float(value) for name, value in
               re.findall(r"^(model alone|resident pipeline|stream pipeline)\s+([\d.]+) images/s", stdout, re.M)}
    assert set(figures) == {"model alone", "resident pipeline", "stream pipeline"} and min(figures.values()) > 0
    assert re.search(r"resident pipeline .* of model alone", stdout)
    ratio = float(re.search(r"resident views .*\(([\d.]+)x the raw uint8 size\)", stdout).group(1))
    assert ratio == 1.0  # on the CPU the views are held as they are, nothing more
    assert f", {TINY_MODEL}, 32 px, batch 8, no," in stdout  # the tiny mode's settings, and our model


@pytest.mark.last
def test_time_to_accuracy_reports_each_seed_and_the_mean(benchmark_runs, kept_runs):
    stdout = printed(benchmark_runs["time_to_accuracy"])
    kept = {run.name: json.loads((run / "results.json").read_text()) for run in kept_runs.iterdir()}
    assert sorted(kept) == ["seed-0", "seed-1"]
    per_seed = re.findall(r"^seed (\d+)\s+test accuracy\s+([\d.]+)%.*wall\s+([\d.]+) s$", stdout, re.M)
    assert [int(seed) for seed, _, _ in per_seed] == [0, 1]
    accuracies = [float(accuracy) for _, accuracy, _ in per_seed]
    mean = float(re.search(r"^test accuracy\s+([\d.]+)% mean, ([\d.]+) points std", stdout, re.M).group(1))
    assert mean == pytest.approx(sum(accuracies) / 2, abs=0.006)
    assert all(float(wall) > 0 for _, _, wall in per_seed)
    assert [f"{100 * kept[f'seed-{seed}']['test_accuracy']:.2f}" for seed, _, _ in per_seed] == [
        accuracy for _, accuracy, _ in per_seed]
    assert re.search(r"^data pipeline\s+resident\s+recipe cpu", stdout, re.M)
    phases = dict(re.findall(r"(\w+) ([\d.]+)", re.search(r"^phases \(mean s\)\s+(.*)$", stdout, re.M).group(1)))
    assert set(phases) == {"start_up", "data", "model", "training", "first_epoch", "validation", "test"}
    assert float(phases["start_up"]) > 0 and float(phases["training"]) >= float(phases["first_epoch"]) > 0


def test_time_to_accuracy_names_and_seeds_each_run_itself():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "time_to_accuracy.py"), "--seeds", "2",
                           "--run-name", "mine"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("drop --run-name and --seed")


@pytest.mark.last
def test_cpu_profile_splits_the_wall_time_into_phases_and_the_training_step_into_its_parts(benchmark_runs):
    stdout = printed(benchmark_runs["cpu_profile"])
    rows = {name.strip(): float(seconds) for name, seconds in
            re.findall(r"^ *(\S.*?) +(-?[\d.]+) +-?[\d.]+%$", stdout, re.M)}
    step_parts = ["augmentation", "mixing", "forward and loss", "backward", "optimizer step", "average (EMA) update",
                  "rest of the loop (schedule, zero_grad, metrics, progress bar)"]
    phases = ["start-up (interpreter, imports, accelerator)", "data", "model (creation, size check, optimizer)",
              "training (6 batches)", "validation (2 passes)", "test (reload best, score, plots)",
              "rest (config, manifest and results writes, logs)"]
    assert set(step_parts + phases) <= set(rows), stdout  # --debug: 2 epochs of 3 batches, each validated
    assert all(rows[name] >= 0 for name in step_parts + phases)  # a part counted twice would leave a rest < 0
    # each timer still wraps what the run calls (one renamed or bypassed would read 0)
    timed = ["augmentation", "forward and loss", "backward", "optimizer step", "average (EMA) update",
             "evaluation passes", "test pass"]
    assert all(rows[name] > 0 for name in timed), stdout
