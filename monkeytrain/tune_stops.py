"""Stop signals between trials, and how a worker they stop exits: a requeue asked of SLURM after its warning,
and the signal's exit status (a stopped study is not a finished one to `&&`).
"""

from __future__ import annotations

import os
import signal

from monkeytrain.tune_study import say

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)  # preemption.STOP_SIGNALS, without its torch import


class StopSignals:
    """Stop signals that arrive between trials. While a trial runs, its Preemption holds the handlers;
    taking them back afterwards keeps what it noted, so a signal in a trial's last moments is not lost."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.listen()

    def listen(self) -> None:
        for sig in STOP_SIGNALS:
            holder = getattr(signal.getsignal(sig), "__self__", None)  # a bound handler: who noted it
            self.received = self.received or getattr(holder, "received", None)
            signal.signal(sig, self.note)

    def note(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


def stopped(received: str | None) -> int:
    from monkeytrain.preemption import ask_for_requeue, signal_exit_status

    if received == "SIGUSR1" and os.environ.get("SLURM_JOB_ID"):
        # SLURM's warning before a time limit, as for a training run (preemption.requeue_or_exit): between
        # trials or inside one (whose run leaves the requeue to tune: its flags are no command's), tune asks,
        # so that the task comes back and goes on with the study. A SIGTERM (scancel) ends it.
        say(ask_for_requeue(os.environ["SLURM_JOB_ID"]))
    say(f"stopped on {received or 'a signal'}; the same command continues the study.")
    # as train.py outside a launcher: a stopped study is not a finished one to `&&`
    return signal_exit_status(received) if received else 1
