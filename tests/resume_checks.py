"""Runs of monkeytrain/train.py's main that interrupt themselves at a chosen point.

    interrupted(POINT, STEP)                      the runs inside it, in this process
    killed_in(FOLDER, POINT, STEP, TRAIN_FLAGS)   one run in FOLDER, in the (child) process that calls it

POINT is where, relative to optimizer step STEP:
    term        SIGTERM while step STEP ends, as a scheduler's signal would arrive: the
                trainer must notice it at its next check, save its state and stop.
    usr1        SIGUSR1 there instead, as SLURM's warning of a time limit (--signal=B:USR1@...).
    kill        SIGKILL just after step STEP (with its scheduled save, if any).
    kill-save   SIGKILL in the middle of saving the state of step STEP: its files are
                written, it is not yet marked complete and moved into place.

Tests run the SIGTERM point in their own process; a SIGKILL needs a process of its own, which
test_resume.py forks from the session's forkserver (see forked.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Iterator

from forked import run_in
from monkeytrain import train
from monkeytrain.statestore import StateStore
from monkeytrain.trainer import Trainer

OUTPUT = "output.txt"  # what a killed_in run printed, in its folder


@contextlib.contextmanager
def interrupted(point: str, step: int) -> Iterator[None]:
    """Runs of train.main inside the block interrupt themselves at `point` of step `step`."""
    after_step, publish = Trainer.after_optimizer_step, StateStore._publish

    def after_optimizer_step(trainer: Trainer) -> bool:
        if point in ("term", "usr1") and trainer.progress.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM if point == "term" else signal.SIGUSR1)
        stopping = after_step(trainer)
        if point == "kill" and trainer.progress.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return stopping

    def publish_(store: StateStore, staging, final) -> None:
        if point == "kill-save" and final.name.endswith(f"{step:08d}"):
            os.kill(os.getpid(), signal.SIGKILL)
        publish(store, staging, final)

    Trainer.after_optimizer_step, StateStore._publish = after_optimizer_step, publish_
    try:
        yield
    finally:
        Trainer.after_optimizer_step, StateStore._publish = after_step, publish


def killed_in(folder: Path, point: str, step: int, flags: list[str]) -> None:
    """train.main(FLAGS) in FOLDER, interrupted at POINT of step STEP; its output goes to FOLDER/OUTPUT."""
    run_in(folder, OUTPUT)
    with interrupted(point, step):
        print(train.main(flags))
