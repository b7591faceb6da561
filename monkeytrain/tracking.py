"""Run logs: the main process prints and appends metrics.jsonl; other ranks log nothing.

Both loggers share one interface, so the training loop never asks which rank it is on.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


class RunLog:
    """Console lines and `metrics.jsonl` in the run directory."""

    def __init__(self, run_dir: Path):
        self.metrics_path = run_dir / "metrics.jsonl"

    def info(self, message: str) -> None:
        print(message, flush=True)

    def warn(self, message: str) -> None:
        print(f"monkeytrain: warning: {message}", file=sys.stderr, flush=True)

    def epoch(self, metrics: dict) -> None:
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        print(format_epoch(metrics), flush=True)


class SilentLog(RunLog):
    """What every rank but the main one gets."""

    def __init__(self) -> None:
        pass

    def info(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    def epoch(self, metrics: dict) -> None:
        pass


def make_run_log(run_dir: Path, is_main_process: bool) -> RunLog:
    return RunLog(run_dir) if is_main_process else SilentLog()


def format_epoch(m: dict) -> str:
    return (
        f"epoch {m['epoch']:>3}/{m['epochs']}  "
        f"train loss {m['train_loss']:.4f} acc {m['train_accuracy']:.2%}  "
        f"val loss {m['val_loss']:.4f} acc {m['val_accuracy']:.2%}  "
        f"lr {m['lr']:.2e}  {m['images_per_second']:.0f} img/s  {m['epoch_seconds']:.1f}s"
        + ("  *best*" if m.get("is_best") else "")
    )
