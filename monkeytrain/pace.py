"""How long the rest of a run will take: an estimate after its first epoch, then
every tenth of the run, as a progress bar over epochs would show it; and where
the time of a finished run went, phase by phase, for results.json."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

ESTIMATES_PER_RUN = 10
LONG_RUN_SECONDS = 3600  # past this, a CPU run says how to make it shorter


def format_duration(seconds: float) -> str:
    """'45 s', '4 min 05 s', '2 h 10 min'."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class RemainingTime:
    """Estimates the time left from the mean wall time of the epochs this process has run."""

    def __init__(self, first_epoch: int, last_epoch: int, clock: Callable[[], float] = time.perf_counter):
        self.first, self.last, self.clock = first_epoch, last_epoch, clock
        self.started = clock()
        self.every = max(1, (last_epoch - first_epoch + 1) // ESTIMATES_PER_RUN)

    def due(self, epoch: int) -> Optional[float]:
        """Seconds left after `epoch` when an estimate is due (after the first epoch, then every
        tenth of the run, never after the last); otherwise None."""
        done, left = epoch - self.first + 1, self.last - epoch
        if done < 1 or left <= 0 or (done > 1 and done % self.every):
            return None
        return (self.clock() - self.started) / done * left

    def start_after(self, epoch: int) -> None:
        """Count from now, the end of `epoch`, one that a resume found partly or wholly trained: its time
        says little of an epoch's ("about 0 s left" after one resumed at its very end)."""
        self.first, self.started = epoch + 1, self.clock()

    def is_first(self, epoch: int) -> bool:
        return epoch == self.first


def estimate_line(seconds_left: float, epochs_left: int) -> str:
    return f"about {format_duration(seconds_left)} left ({epochs_left} more epoch{'s' * (epochs_left != 1)})"


def long_cpu_run_advice(seconds_left: float, recipe: str) -> Optional[str]:
    """One line for a CPU run that will take over an hour, naming the faster way; else None."""
    if seconds_left <= LONG_RUN_SECONDS:
        return None
    faster = ("--recipe cpu (small images, a few minutes on a laptop)" if recipe != "cpu"
              else "fewer --epochs or a smaller --image-size")
    return f"this CPU run will take about {format_duration(seconds_left)}; for a faster one use {faster}."


def report_time_left(pace: RemainingTime, epoch: int, log, on_cpu: bool, recipe: str) -> None:
    """After `epoch`: the estimate when one is due, and after the first epoch of a long CPU run, advice."""
    seconds_left = pace.due(epoch)
    if seconds_left is None:
        return
    log.info(estimate_line(seconds_left, pace.last - epoch))
    advice = long_cpu_run_advice(seconds_left, recipe) if on_cpu and pace.is_first(epoch) else None
    if advice:
        log.warn(advice)


class PhaseTimes:
    """Wall seconds per phase of a run (start-up, data, model, training, validation, test), summed
    over the phase's visits; the first training epoch apart too, since compilation lands in it, and
    the CUDA graph captures (part of training)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock, self.seconds = clock, {}
        self.started = clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        started = self.clock()
        try:
            yield
        finally:
            self.add(phase, self.clock() - started)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def summary(self) -> dict[str, float]:
        return {phase: round(seconds, 2) for phase, seconds in self.seconds.items()}


_process_start_counted = False  # a process's start belongs to its first run (tune runs several)


def start_up_seconds(phases: PhaseTimes) -> float:
    """The wait before a run's data phase: since its PhaseTimes began, and for the process's first
    run since the process started, so that the interpreter and the imports count too."""
    global _process_start_counted
    import psutil  # an Accelerate dependency

    in_run = phases.elapsed()
    if _process_start_counted:
        return in_run
    _process_start_counted = True
    return max(in_run, time.time() - psutil.Process().create_time())
