"""Where a training run's wall time goes, phase by phase, down to the parts of a training step.

    python benchmarks/cpu_profile.py --data data/10-monkey-species --epochs 3     # the CPU recipe, 3 epochs
    python benchmarks/cpu_profile.py --debug --image-size 32 --model resnet10t    # smoke run (tests use it)

Runs `monkeytrain/train.py`'s `main` in this process with the flags given (any
train.py flag; the run goes to a temporary folder unless --output-dir is given),
with timers wrapped around the functions each phase calls, and prints the wall
time split into: start-up (interpreter, imports, accelerator), data (decoding or
loading the cached views, channel statistics, the rest), model, and per training
step augmentation, mixing, forward, backward, optimizer step, average (EMA)
update and the rest of the loop; validation (its test-time views, the forward
passes, best-checkpoint writes); the final test (scoring, plots); and what is
left (config and log writes). On a CPU every operation finishes before the
Python call that started it returns, so wall timers around calls measure the
work itself; on a GPU they would measure launches, so this is a CPU tool (give
--cpu on a machine with one). On a machine shared with other work, OpenMP
threads wait on each other and the per-tensor loops (optimizer step, EMA) take
a larger share: compare shares of an idle machine's runs, and A/B a change in
alternating runs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # an Accelerate dependency
from accelerate import Accelerator

from monkeytrain import checkpoint, engine, results, tracking, train, trainer
from monkeytrain.averaging import EmaWeights
from monkeytrain.data import augment, pipeline, prepare

# (module or class, attribute, timer name): each call of the attribute adds its wall time to the timer
TIMED = [
    (pipeline, "cached_views", "views decode or cache load"),
    (prepare, "channel_stats", "channel statistics"),
    (augment.Augmenter, "train", "augmentation"),
    (engine, "forward_backward", "forward_backward"),
    (Accelerator, "backward", "backward"),
    (engine, "update_weights", "update_weights"),
    (EmaWeights, "apply", "average update"),
    (EmaWeights, "advance", "average decay (host)"),
    (augment.EvalViews, "prepare", "test-time views"),
    (trainer, "evaluate", "validation passes"),
    (results, "evaluate", "test pass"),
    (checkpoint.BestCheckpoint, "save", "checkpoint writes"),
    (tracking, "write_run_plots", "plots"),
]


class Timers:
    """Wall seconds and calls per timer name."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrapped(self, function: Callable, name: str) -> Callable:
        def timed_call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1
        return timed_call

    def mixer_maker(self, make_mixer: Callable) -> Callable:
        """batch_mixer whose mixing function is timed as 'mixing'."""
        return lambda *args, **kwargs: self.wrapped(make_mixer(*args, **kwargs), "mixing")

    @contextmanager
    def around(self, timed: list) -> Iterator[None]:
        """Wrap each (owner, attribute) in a timer for the duration; put the originals back after."""
        originals = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in timed]
        originals.append((trainer, "batch_mixer", trainer.batch_mixer))
        try:
            for owner, attribute, name in timed:
                setattr(owner, attribute, self.wrapped(getattr(owner, attribute), name))
            trainer.batch_mixer = self.mixer_maker(trainer.batch_mixer)
            yield
        finally:
            for owner, attribute, original in originals:
                setattr(owner, attribute, original)


def breakdown(phases: dict[str, float], timers: Timers, wall: float) -> list[tuple[int, str, float]]:
    """(indent, name, seconds) rows: the run's phases, each split into the parts timed inside it."""
    s, calls = defaultdict(float, timers.seconds), timers.calls
    training = phases.get("training", 0.0)
    step_parts = s["forward_backward"] + s["update_weights"] + s["average decay (host)"]
    rows = [(0, "start-up (interpreter, imports, accelerator)", phases.get("start_up", 0.0)),
            (0, "data", phases.get("data", 0.0)),
            (1, "views decode or cache load", s["views decode or cache load"]),
            (1, "channel statistics", s["channel statistics"]),
            (0, "model (creation, size check, optimizer)", phases.get("model", 0.0)),
            (0, f"training ({calls['forward_backward']} batches)", training),
            (1, "augmentation", s["augmentation"]),
            (1, "mixing", s["mixing"]),
            (1, "forward and loss", s["forward_backward"] - s["augmentation"] - s["mixing"] - s["backward"]),
            (1, "backward", s["backward"]),
            (1, "optimizer step", s["update_weights"] - s["average update"]),
            (1, "average (EMA) update", s["average update"] + s["average decay (host)"]),
            (1, "rest of the loop (schedule, zero_grad, metrics, progress bar)", training - step_parts),
            (0, f"validation ({calls['validation passes']} passes)", phases.get("validation", 0.0)),
            (1, "evaluation passes", s["validation passes"]),
            (2, "test-time views (these and the test pass's)", s["test-time views"]),
            (1, f"best-checkpoint writes ({calls['checkpoint writes']})", s["checkpoint writes"]),
            (0, "test (reload best, score, plots)", phases.get("test", 0.0)),
            (1, "test pass", s["test pass"]),
            (1, "plots", s["plots"])]
    counted = sum(phases.get(name, 0.0) for name in ("start_up", "data", "model", "training", "validation", "test"))
    rows.append((0, "rest (config, manifest and results writes, logs)", wall - counted))
    return rows


def print_breakdown(rows: list[tuple[int, str, float]], wall: float) -> None:
    print(f"{'phase':<66}{'seconds':>9}{'share':>8}")
    for indent, name, seconds in rows:
        print(f"{'  ' * indent + name:<66}{seconds:9.2f}{seconds / wall:8.1%}")
    print(f"{'wall (process start to the end of the run)':<66}{wall:9.2f}{1:8.1%}")


def main() -> None:
    flags = sys.argv[1:]
    timers = Timers()
    with tempfile.TemporaryDirectory() as scratch, timers.around(TIMED):
        found = train.main(flags if "--output-dir" in flags else [*flags, "--output-dir", scratch])
    wall = time.time() - psutil.Process().create_time()
    if not found or found.get("stopped"):
        sys.exit("the run did not finish; nothing to break down")
    print(f"command  python monkeytrain/train.py {' '.join(flags)}")
    print(f"test accuracy {found['test_accuracy']:.2%}")
    print_breakdown(breakdown(found["phase_seconds"], timers, wall), wall)


if __name__ == "__main__":
    main()
