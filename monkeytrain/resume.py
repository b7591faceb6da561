"""Preemption-safe training state: save on a schedule or on a signal, resume from the newest.

A state lives in `RUN/state/step-NNNNNNNN/`: Accelerate's own `save_state`
(model, optimizer, scheduler, grad scaler, every rank's RNG states) plus one
`progress-rankR.pt` per rank (epoch, batches done in it, best epoch so far,
the augmentation generator, the weight average). It is written to a
temporary folder by all ranks together, marked COMPLETE, then renamed into
place, so a kill at any moment leaves either the old states or the new one,
never a half-written folder that `--resume auto` would pick.

SIGUSR1 (SLURM's warning before preemption) or SIGTERM only set a flag; the
ranks agree on it at a step boundary (a collective, so none is left waiting),
all of them save, and the job requeues itself under SLURM or exits.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from monkeytrain.distributed import all_ranks_agree, broadcast_from_main
from monkeytrain.errors import UserError
from monkeytrain.selection import BestEpoch

COMPLETE = "COMPLETE"
STATE_PREFIX = "step-"
# Ranks compare their stop flags every this many optimizer steps (a collective:
# checking every step would cost a device sync each step).
STOP_CHECK_INTERVAL = 8


@dataclass
class Progress:
    """Where training stands: the next batch to train is `batch` of `epoch`."""

    epoch: int = 1
    batch: int = 0
    global_step: int = 0


def state_dirs(run_dir: Path) -> list[Path]:
    """Complete saved states of a run, oldest first."""
    root = run_dir / "state"
    if not root.is_dir():
        return []
    complete = [p for p in root.iterdir() if p.name.startswith(STATE_PREFIX) and (p / COMPLETE).is_file()]
    return sorted(complete, key=lambda p: p.name)


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """The state to resume from: None (start fresh), the newest complete one, or a given one."""
    if not resume:
        return None
    if resume == "auto":
        found = state_dirs(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise UserError(f"{path} is not a complete saved state; pass a RUN/state/step-* folder or --resume auto.")
    return path


class StopSignal:
    """Remembers a SIGUSR1 or SIGTERM until the ranks next agree on stopping."""

    def __init__(self) -> None:
        self.received: Optional[str] = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._note)

    def _note(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank received a signal (every rank must call this)."""
        return not all_ranks_agree(self.received is None, accelerator.device)


class TrainingState:
    """Saves and restores everything a bit-identical continuation needs."""

    def __init__(self, run_dir: Path, accelerator, averager, generator: torch.Generator, keep: int):
        self.root = run_dir / "state"
        self.accelerator, self.averager, self.generator, self.keep = accelerator, averager, generator, keep

    def save(self, progress: Progress, best: BestEpoch) -> Path:
        """All ranks call this together."""
        accelerator = self.accelerator
        final = self.root / f"{STATE_PREFIX}{progress.global_step:08d}"
        staging = self.root / f".tmp-{final.name}"
        if accelerator.is_main_process:
            for leftover in self.root.glob(".tmp-*"):  # from a save that a kill interrupted
                shutil.rmtree(leftover, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        torch.save(self._extras(progress, best), staging / f"progress-rank{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            self._publish(staging, final)
        accelerator.wait_for_everyone()
        return final

    def _extras(self, progress: Progress, best: BestEpoch) -> dict:
        return {
            "progress": dataclasses.asdict(progress), "best": dataclasses.asdict(best),
            "generator": self.generator.get_state(),
            "averager": self.averager.state_dict() if self.accelerator.is_main_process else None,
            "world_size": self.accelerator.num_processes,
        }

    def _publish(self, staging: Path, final: Path) -> None:
        marker = staging / COMPLETE
        with open(marker, "w") as handle:
            handle.write("complete\n")
            handle.flush()
            os.fsync(handle.fileno())
        if final.exists():  # the same step saved twice (a stop right after a scheduled save)
            self._retire(final)
        os.replace(staging, final)
        directory = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        for old in state_dirs(self.root.parent)[:-self.keep]:
            self._retire(old)

    def _retire(self, state: Path) -> None:
        """Delete a state so that a kill midway never leaves a COMPLETE folder missing files:
        first rename it out of sight (atomic), then delete it (the next save sweeps leftovers)."""
        retired = self.root / f".tmp-retired-{state.name}"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(state, retired)
        shutil.rmtree(retired, ignore_errors=True)

    def load(self, path: Path) -> tuple[Progress, BestEpoch]:
        """Restore a saved state on every rank; returns where to continue."""
        accelerator = self.accelerator
        mine = path / f"progress-rank{accelerator.process_index}.pt"
        if not mine.is_file():
            raise UserError(f"{path} was saved by a different number of processes; resume with the same launch.")
        accelerator.load_state(str(path))
        extras = torch.load(mine, map_location="cpu", weights_only=False)
        main_extras = torch.load(path / "progress-rank0.pt", map_location="cpu", weights_only=False)
        self.generator.set_state(extras["generator"])
        self.averager.load_state_dict(main_extras["averager"])
        return Progress(**extras["progress"]), BestEpoch(**extras["best"])


def agree_on_state(path: Optional[Path]) -> Optional[Path]:
    """Every rank resumes from the state the main process found."""
    return broadcast_from_main(path)


def requeue_or_exit(log) -> None:
    """Under SLURM, put this job back in the queue (it resumes with --resume auto); else just stop."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.info("stopped on a signal after saving the training state; continue with --resume auto.")
        return
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    log.info(f"stopped on a signal after saving; scontrol requeue {job}: "
             f"{'ok' if done.returncode == 0 else done.stderr.strip()}")
