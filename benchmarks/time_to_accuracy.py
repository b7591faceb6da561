"""Time to accuracy: the default training command, timed from process start to results.json.

    python benchmarks/time_to_accuracy.py --data data/10-monkey-species [extra train.py flags]

Runs `monkeytrain/train.py` in a fresh process (so imports, data loading,
compilation and the final evaluation all count), then prints the wall time,
the test accuracy, the epoch chosen on the held-out validation split, and the
data pipeline and peak GPU memory the run reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = Path(__file__).resolve().parent.parent / "monkeytrain" / "train.py"


def main(flags: list[str]) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, str(TRAIN), "--output-dir", scratch, "--run-name", "tta", *flags]
        started = time.perf_counter()
        done = subprocess.run(command, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            return done.returncode
        results = json.loads((Path(scratch) / "tta" / "results.json").read_text())
    print(f"command          {' '.join(['monkeytrain/train.py', *flags])}")
    print(f"wall time        {wall:8.1f} s  (process start to results.json)")
    print(f"test accuracy    {results['test_accuracy']:8.2%}  on {results['test_images']} images")
    print(f"best epoch       {results['best_epoch']:8d}  (validation accuracy {results['best_val_accuracy']:.2%} "
          f"on {results['val_images']} validation images)")
    print(f"data pipeline    {results['data_pipeline']:>8}  peak GPU memory "
          f"{results['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
