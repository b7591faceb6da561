"""Runs monkeytrain/train.py's main in this process, sending itself SIGTERM after a given step.

    python tests/resume_checks.py STEP TRAIN_FLAGS...

The signal arrives between two optimizer steps, as a scheduler's would, and
the trainer must notice it at its next check, save its state and stop.
"""

from __future__ import annotations

import os
import signal
import sys

from monkeytrain import train

real_step_boundary = train.step_boundary


def signalling_step_boundary(kill_at: int):
    def make(*args, **kwargs):
        after_step = real_step_boundary(*args, **kwargs)
        progress = args[2]

        def hook(batches_done: int) -> bool:
            if progress.global_step + 1 == kill_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return after_step(batches_done)

        return hook

    return make


if __name__ == "__main__":
    kill_at, *flags = sys.argv[1:]
    train.step_boundary = signalling_step_boundary(int(kill_at))
    print(train.main(flags))
