"""Time to accuracy: the training command, timed from process start to results.json, over seeds.

    python benchmarks/time_to_accuracy.py --data data/10-monkey-species [--seeds 3] [--output-dir DIR] [extra train.py flags]

Runs `monkeytrain/train.py` in a fresh process per seed (so imports, data
loading, compilation and the final evaluation all count), with `--seed 0`,
`--seed 1`, ... after the flags given. Prints one line per run (wall time,
test accuracy, the epoch chosen on the held-out validation split), then the
mean, spread and range of the test accuracy and the wall time, where the time
went (the mean seconds of each phase results.json records: start-up, data,
model, training with its first epoch and graph captures apart, validation,
test), and the data pipeline, recipe and peak GPU memory the runs reported.
The runs are kept in DIR/seed-N with --output-dir, else in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TRAIN = Path(__file__).resolve().parent.parent / "monkeytrain" / "train.py"


def run_once(flags: list[str], seed: int, output_dir: str | None) -> dict | None:
    """The results.json of one training run, with the wall time added; None if it failed."""
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = output_dir or scratch
        command = [sys.executable, str(TRAIN), *flags, "--output-dir", output_dir, "--run-name", f"seed-{seed}",
                   "--seed", str(seed)]
        started = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            return None
        run_dir = Path(output_dir) / f"seed-{seed}"
        results = json.loads((run_dir / "results.json").read_text())
        results["recipe"] = read_recipe(run_dir)
    return {**results, "wall": wall, "seed": seed}


def read_recipe(run_dir: Path) -> str:
    return yaml.safe_load((run_dir / "config.yaml").read_text()).get("recipe", "?")


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def report(flags: list[str], runs: list[dict]) -> None:
    print(f"command          {' '.join(['monkeytrain/train.py', *flags])}")
    for r in runs:
        print(f"seed {r['seed']:<3}         test accuracy {r['test_accuracy']:7.2%}  validation "
              f"{r['best_val_accuracy']:7.2%} (best epoch {r['best_epoch']}, {r['val_images']} images)  "
              f"wall {r['wall']:7.1f} s")
    accuracies = [100 * r["test_accuracy"] for r in runs]
    walls = [r["wall"] for r in runs]
    print(f"test accuracy    {statistics.mean(accuracies):.2f}% mean, {spread(accuracies):.2f} points std, "
          f"{min(accuracies):.2f}-{max(accuracies):.2f}%, {len(runs)} seed(s) on {runs[0]['test_images']} images")
    print(f"wall time        {statistics.mean(walls):.1f} s mean, {max(walls):.1f} s max  "
          "(process start to results.json)")
    print(f"phases (mean s)  {phase_line(runs)}")
    print(f"data pipeline    {runs[0]['data_pipeline']}  recipe {runs[0]['recipe']}  peak GPU memory "
          f"{max(r['peak_gpu_memory_bytes'] for r in runs) / 2**30:.2f} GiB")


def phase_line(runs: list[dict]) -> str:
    """'start_up 4.1, data 1.2, ...': each phase's mean over the runs (first_epoch and capture are part
    of training)."""
    phases = [r.get("phase_seconds", {}) for r in runs]
    names = list(phases[0])
    return ", ".join(f"{name} {statistics.mean(p.get(name, 0.0) for p in phases):.1f}" for name in names)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1, help="runs with seeds 0 .. N-1 (default 1)")
    parser.add_argument("--output-dir", help="keep each run in OUTPUT_DIR/seed-N (default: a temporary folder)")
    args, flags = parser.parse_known_args(argv)
    if any(flag.split("=")[0] in ("--run-name", "--seed") for flag in flags):
        parser.error("each run is named seed-N and given its seed here; drop --run-name and --seed")
    runs = []
    for seed in range(args.seeds):
        result = run_once(flags, seed, args.output_dir)
        if result is None:
            print(f"monkeytrain: error: the run with --seed {seed} failed (its messages are above).",
                  file=sys.stderr)
            return 1
        runs.append(result)
    report(flags, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
