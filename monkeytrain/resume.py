"""Saved training states: save on a schedule or on a signal, resume from the newest.

A state lives in `RUN/state/step-NNNNNNNN/`: Accelerate's own `save_state`
(model, optimizer, scheduler, grad scaler, every rank's RNG states) plus one
`progress-rankR.pt` per rank (epoch, batches done in it, best epoch so far,
the augmentation generator, the weight average). It is written to a
temporary folder by all ranks together, marked COMPLETE, then renamed into
place, so a kill at any moment leaves either the old states or the new one,
never a half-written folder that `--resume auto` would pick. When to save
and when to stop is `preemption.py`'s business.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from monkeytrain.distributed import broadcast_from_main
from monkeytrain.errors import UserError
from monkeytrain.selection import BestEpoch
from monkeytrain.storage import DiskFull, folder_size, fsync_folder, out_of_space

COMPLETE = "COMPLETE"
STATE_PREFIX = "step-"


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


class TrainingState:
    """Saves and restores everything a bit-identical continuation needs."""

    def __init__(self, run_dir: Path, accelerator, averager, generator: torch.Generator, keep: int):
        self.root = run_dir / "state"
        self.accelerator, self.averager, self.generator, self.keep = accelerator, averager, generator, keep

    def save(self, progress: Progress, best: BestEpoch) -> Path:
        """All ranks call this together. On a full disk the half-written state is deleted and
        `DiskFull` raised (by each rank that hit it); older complete states stay as they were."""
        accelerator = self.accelerator
        final = self.root / f"{STATE_PREFIX}{progress.global_step:08d}"
        staging = self.root / f".tmp-{final.name}"
        if accelerator.is_main_process:
            for leftover in self.root.glob(".tmp-*"):  # from a save that a kill interrupted
                shutil.rmtree(leftover, ignore_errors=True)
            staging.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(staging))
            torch.save(self._extras(progress, best), staging / f"progress-rank{accelerator.process_index}.pt")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                self._publish(staging, final)
        except Exception as error:  # torch and safetensors wrap ENOSPC in their own error types
            if not out_of_space(error, self.root):
                raise
            raise self._abandon(staging, final) from error
        accelerator.wait_for_everyone()
        return final

    def _abandon(self, staging: Path, final: Path) -> DiskFull:
        """Delete a state that did not fit; the error saying how much it had written by then."""
        written = folder_size(staging)  # before deleting: the least the state needs
        shutil.rmtree(staging, ignore_errors=True)
        return DiskFull(final, written, at_least=True, flag="--output-dir")

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
        fsync_folder(self.root)  # make the rename itself durable
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
