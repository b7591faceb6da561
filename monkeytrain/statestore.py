"""The store of saved training states: where they live, how they are published, retired and loaded.

A state lives in `RUN/state/step-NNNNNNNN/` (NNNNNNNN: optimizer steps done):
Accelerate's own `save_state` (model, optimizer, scheduler, grad scaler,
every rank's RNG states) plus one `progress-rankR.pt` per rank holding what
the trainer adds (where training stands, the augmentation generator, the
weight average). It is written to a temporary folder by all ranks together,
marked COMPLETE, then renamed into place, so a kill at any moment leaves
either the old states or the new one, never a half-written folder that
`--resume auto` would pick; a save that any rank fails to write (a full disk, a failing one) is
deleted, and every rank stops with the same one line. COMPLETE lists every file of the state with its
size, and a load first checks them all: Accelerate's `load_state` passes over
a missing or damaged `random_states_R.pkl` without a word, which would resume
with other randomness, a silently different run. What goes in (and which files of the run a state keeps
a copy of, see `runrecords.py`) is the trainer's business; when to save and when to
stop is `preemption.py`'s.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import SafetensorError

from monkeytrain.distributed import broadcast_from_main, first_problem_of_any_rank
from monkeytrain.errors import UserError, first_line
from monkeytrain.storage import (DiskFull, WriteFailed, folder_size, fsync_folder, is_disk_full, out_of_space,
                                 over_quota, space_refusal, write_atomically)
from monkeytrain.tracking import run_folder_gone

COMPLETE = "COMPLETE"
STATE_PREFIX = "step-"
SCALER = "scaler.pt"  # Accelerate's name for the grad scaler's state (fp16 only)
# What torch.save says of a file it failed to write (a failing disk, a folder gone): no errno, its own words.
TORCH_WRITE_WORDS = ("PytorchStreamWriter failed", "unexpected pos", "cannot be opened", "Parent directory")
TORCH_ASSERTION_PREFIX = re.compile(r"^\[enforce fail at [^\]]*\][ .]*")  # where in torch's C++ it failed


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
    return given_state(resume)


def given_state(resume: str) -> Path:
    """The state that --resume names, checked complete: a RUN/state/step-* folder, or a run's folder (or its
    state/ folder) for the newest complete state in it, the one --resume auto would take."""
    path = Path(resume)
    if (path / COMPLETE).is_file():
        return path
    run_dir = run_of(path)
    if run_dir is None:
        raise UserError(not_a_state(path))
    found = state_dirs(run_dir)
    if not found:
        raise UserError(f"{run_dir} has no complete saved state to resume (stopped before its first save?); start it "
                        f"over with --resume auto --output-dir {run_dir.parent} --run-name {run_dir.name}, or start "
                        "a new run.")
    return found[-1]


def run_of(path: Path) -> Optional[Path]:
    """The run whose folder, or state/ folder, `path` is; None for any other path."""
    if path.name.startswith(STATE_PREFIX):  # a state left incomplete, or one that is not there
        return None
    if (path / "state").is_dir() or (path / "config.yaml").is_file():
        return path
    if path.name == "state" and path.is_dir():
        return path.parent
    return None


def not_a_state(path: Path) -> str:
    """Why --resume cannot take `path`, and what it takes: a run's best checkpoint is weights alone."""
    if path.is_file() and path.suffix == ".safetensors":
        return (f"{path} holds weights alone, not a saved training state; to train from them, start a new run with "
                f"--pretrained {path}; to continue its run, give --resume its folder (or a RUN/state/step-* folder).")
    return f"{path} is not a complete saved state; pass a RUN/state/step-* folder or --resume auto."


def resumed_state(resume: Optional[str]) -> Optional[str]:
    """--resume as the run takes it: a run's folder (or its state/ folder) as its newest complete state, which the
    run directory and the resume both follow from; anything else as it is, for the run to check (given_state)."""
    if not resume or resume == "auto" or run_of(Path(resume)) is None:
        return resume
    return str(given_state(resume))


class StateStore:
    """Saves and loads the states of one run, every rank together."""

    def __init__(self, run_dir: Path, accelerator, keep: int):
        self.root = run_dir / "state"
        self.accelerator, self.keep = accelerator, keep

    def save(self, step: int, extras: dict, shared: dict, copies: Sequence[Path] = ()) -> Path:
        """Save the Accelerate state, this rank's `extras` and, from the main process, `shared`
        (the same on every rank) and a copy of each file of `copies` as the state of optimizer step `step`.

        All ranks call this together, and return or fail together: a state that one of them could not
        write (a full disk or quota, a failing disk, the run folder gone) is deleted, and every rank raises
        the same one line (the rank that failed its DiskFull or WriteFailed); older complete states stay
        as they were."""
        final = self.root / f"{STATE_PREFIX}{step:08d}"
        staging = self.root / f".tmp-{final.name}"
        self._on_main(lambda: self._make_staging(staging), staging, final)
        self._on_every_rank(lambda: self._write(staging, extras, shared), staging, final)
        self._on_main(lambda: self._complete(staging, final, copies), staging, final)
        return final

    def _make_staging(self, staging: Path) -> None:
        """An empty staging folder in `state/`, made in the run folder as it is: never the run folder
        itself, which would bring back one deleted while the run trained (a stop saves before the next
        metrics line finds it gone) as a folder of its name holding a state and nothing else."""
        try:
            self.root.mkdir(exist_ok=True)
        except FileNotFoundError:
            raise run_folder_gone(self.root.parent) from None
        for leftover in self.root.glob(".tmp-*"):  # from a save that a kill interrupted
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir()

    def _write(self, staging: Path, extras: dict, shared: dict) -> None:
        """This rank's part of the state: Accelerate's files (the main process writes the model's, optimizer's
        and scheduler's; each rank its RNG states) and its progress file."""
        accelerator = self.accelerator
        accelerator.save_state(str(staging))
        mine = {**extras, **(shared if accelerator.is_main_process else {}), "world_size": accelerator.num_processes}
        torch.save(mine, staging / progress_file(accelerator.process_index))

    def _on_main(self, work: Callable[[], None], staging: Path, final: Path) -> None:
        """`work` on the main process; the others wait for it, and raise its line if it failed."""
        failure = None
        if self.accelerator.is_main_process:
            failure = self._failure_of(work, staging, final)
        self._stop_on(failure, broadcast_from_main(described(failure)), staging)

    def _on_every_rank(self, work: Callable[[], None], staging: Path, final: Path) -> None:
        """`work` on every rank; once all are done, every rank raises the first rank's failure, if any. A
        rank's error alone would leave the others waiting at the next barrier, then a gloo traceback."""
        failure = self._failure_of(work, staging, final)
        self._stop_on(failure, first_problem_of_any_rank(described(failure)), staging)

    def _stop_on(self, failure: Optional[Exception], problem: Optional[str], staging: Path) -> None:
        """Raise `problem` (the line every rank agreed on) once the staging folder is gone; this rank's own
        `failure` where it is that line, with its type and cause."""
        if problem is None:
            return
        if self.accelerator.is_main_process:  # every rank is done with it: the barrier was the agreement
            shutil.rmtree(staging, ignore_errors=True)
        if failure is not None and described(failure) == problem:
            raise failure
        raise UserError(problem)

    def _failure_of(self, work: Callable[[], None], staging: Path, final: Path) -> Optional[Exception]:
        """What `work` raised, as the error to stop with (None: it went well): a write that failed for lack
        of space is `DiskFull`, any other failed write `WriteFailed`, both naming the state `final`."""
        try:
            work()
            return None
        except Exception as error:  # torch and safetensors wrap the system's error in their own types
            if out_of_space(error, self.root):
                failure: Exception = self._disk_full(error, staging, final)
            elif failed_write(error):
                failure = WriteFailed(final, write_trouble(error), "--output-dir")
            else:
                return error  # a UserError as it is; anything else is a bug, with its traceback
            failure.__cause__ = error
            return failure

    def _disk_full(self, error: Exception, staging: Path, final: Path) -> DiskFull:
        """The error of a state that did not fit, saying the least it needs: what was written by then, or the
        size of the newest state saved before (a writer may delete its own partial file)."""
        earlier = state_dirs(self.root.parent)
        needed = max(folder_size(staging), folder_size(earlier[-1]) if earlier else 0)
        return DiskFull(final, needed, at_least=True, flag="--output-dir", quota=quota_used_up(error, self.root))

    def load(self, path: Path, restore: Optional[Callable[[dict, dict], None]] = None) -> tuple[dict, dict]:
        """Restore the Accelerate state on every rank; returns this rank's extras, and the main
        rank's (which hold what was `shared`). `restore(mine, main)`, when given, puts the extras back
        in place here, so that extras this version cannot read are one line too, as damaged files are."""
        try:
            mine, main = self._load(path)
        except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError,
                SafetensorError) as error:  # the model's weights: safetensors raises its own type
            raise unloadable(path, error) from None
        if restore is not None:
            self._restore(path, restore, mine, main)
        return mine, main

    @staticmethod
    def _restore(path: Path, restore: Callable[[dict, dict], None], mine: dict, main: dict) -> None:
        """`restore(mine, main)`; extras with a field this version lacks, or lacking one it reads, come from
        another version of monkeytrain (a newer one, say, after a downgrade) or from other flags."""
        try:
            restore(mine, main)
        except (KeyError, TypeError) as error:
            raise UserError(f"the saved state {path} holds what this run cannot read ({type(error).__name__}: "
                            f"{first_line(error)}): was it saved by another version of monkeytrain, or with other "
                            "flags? Resume it as it was saved, or start a new run.") from None

    def _load(self, path: Path) -> tuple[dict, dict]:
        accelerator = self.accelerator
        self._check_recorded_files(path)
        main = torch.load(self._present(path, progress_file(0)), map_location="cpu", weights_only=False)
        saved_by = main.pop("world_size", None)
        if saved_by != accelerator.num_processes:
            raise UserError(f"{path} was saved by {saved_by} processes and this run has {accelerator.num_processes}; "
                            f"resume it with {saved_by} (accelerate launch --num_processes {saved_by}, or torchrun "
                            f"--nproc_per_node {saved_by}), or start a new run.")
        if accelerator.scaler is not None and not (path / SCALER).is_file():  # fp16's grad scaler
            raise UserError(f"{path} was saved without the grad scaler that --mixed-precision fp16 resumes; resume "
                            "it with the --mixed-precision it was saved with (bf16 or no), or start a new run.")
        for name in files_to_load(accelerator):  # on every rank, every rank's files: all of them stop, or none
            self._present(path, name)
        accelerator.load_state(str(path))
        if accelerator.process_index == 0:
            return main, main
        mine = torch.load(path / progress_file(accelerator.process_index), map_location="cpu", weights_only=False)
        mine.pop("world_size")
        return mine, main

    def _check_recorded_files(self, path: Path) -> None:
        """Each file that COMPLETE lists is there, at the size it was saved with (a state saved before
        COMPLETE listed its files is checked by `files_to_load` alone)."""
        for name, size in recorded_sizes(path).items():
            found = self._present(path, name).stat().st_size
            if found != size:
                raise UserError(f"the saved state {path} has a damaged {name} ({found:,} bytes, not the {size:,} "
                                f"it was saved with); {self._way_out(path)}")

    def _present(self, path: Path, name: str) -> Path:
        """`path / name`; a UserError naming the file when it is missing (deleted by hand, as a save
        always writes every one). A missing progress file of another rank would otherwise read as a
        state of another number of processes, and a missing random_states_R.pkl is skipped by Accelerate."""
        file = path / name
        if file.is_file():
            return file
        raise UserError(f"the saved state {path} is missing {name}; {self._way_out(path)}")

    def _way_out(self, path: Path) -> str:
        """What to do about a damaged state. Moved away, it is out of --resume auto's reach: resumed by its
        path instead, the one before would leave it the newest, for the next --resume auto (a SLURM
        requeue) to fail on."""
        earlier = [state for state in state_dirs(self.root.parent) if state.name < path.name]
        instead = f"move it away and --resume auto takes the one before ({earlier[-1]}), or " if earlier else ""
        return f"{instead}start a new run."

    def _complete(self, staging: Path, final: Path, copies: Sequence[Path]) -> None:
        """Add a copy of each file of `copies` to the state in `staging`, then publish it as `final`."""
        for original in copies:
            write_atomically(staging / original.name, original.read_bytes())
        self._publish(staging, final)

    def _publish(self, staging: Path, final: Path) -> None:
        sizes = {file.name: file.stat().st_size for file in sorted(staging.iterdir()) if file.is_file()}
        write_atomically(staging / COMPLETE, json.dumps({"files": sizes}, indent=1).encode())
        # The same step saved twice (a stop right after a scheduled save): the older copy goes out of
        # sight, the new one takes its name at once, and only then is the older deleted, which takes long
        # enough for a kill to fall into (with --keep-states 1 that would leave no state at all).
        replaced = self._out_of_sight(final) if final.exists() else None
        os.replace(staging, final)
        fsync_folder(self.root)  # make the rename itself durable
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)
        for old in state_dirs(self.root.parent)[:-self.keep]:
            self._retire(old)

    def _retire(self, state: Path) -> None:
        """Delete a state so that a kill midway never leaves a COMPLETE folder missing files:
        first rename it out of sight (atomic), then delete it (the next save sweeps leftovers)."""
        shutil.rmtree(self._out_of_sight(state), ignore_errors=True)

    def _out_of_sight(self, state: Path) -> Path:
        """`state` renamed to a name that neither --resume auto nor state_dirs takes; that name."""
        retired = self.root / f".tmp-retired-{state.name}"
        shutil.rmtree(retired, ignore_errors=True)
        os.replace(state, retired)
        return retired


def unloadable(path: Path, error: Exception) -> UserError:
    """The one line for a state that Accelerate or torch failed to load. Weights that do not fit the model
    (the run's config.yaml edited, or deleted, and another --model given) are no damage: the state before
    would fail alike."""
    if isinstance(error, RuntimeError) and str(error).startswith("Error(s) in loading state_dict"):
        return UserError(f"the saved state {path} holds the weights of a model other than the one this run builds "
                         f"({first_line(error).rstrip(':')}); resume with the --model it was saved with, or start "
                         "a new run.")
    missing = f": {error.filename}" if isinstance(error, OSError) and error.filename else ""  # which file
    return UserError(f"the saved state {path} cannot be loaded ({first_line(error)}{missing}); move it away and "
                     "--resume auto takes the newest one left, or start a new run.")


def progress_file(rank: int) -> str:
    """What the trainer adds to a state, for rank `rank`."""
    return f"progress-rank{rank}.pt"


def files_to_load(accelerator) -> list[str]:
    """The files that loading a state into `accelerator` reads, for every rank: Accelerate's own (named as
    its save_state names them: model, optimizer and scheduler per object prepared, the grad scaler, objects
    registered for checkpointing, each rank's RNG states) and each rank's progress file."""
    def numbered(stem: str, suffix: str, count: int) -> list[str]:
        return [f"{stem}{f'_{i}' if i else ''}{suffix}" for i in range(count)]

    ranks = range(accelerator.num_processes)
    return [*numbered("model", ".safetensors", len(accelerator._models)),
            *numbered("optimizer", ".bin", len(accelerator._optimizers)),
            *numbered("scheduler", ".bin", len(accelerator._schedulers)),
            *([SCALER] if accelerator.scaler is not None else []),
            *(f"custom_checkpoint_{i}.pkl" for i in range(len(accelerator._custom_objects))),
            *(f"random_states_{rank}.pkl" for rank in ranks), *(progress_file(rank) for rank in ranks)]


def recorded_sizes(state: Path) -> dict[str, int]:
    """{file name: size} of the files a state was saved with, as its COMPLETE lists them; empty for a
    state saved before COMPLETE listed them (it holds the word complete)."""
    try:
        return {str(name): int(size) for name, size in json.loads((state / COMPLETE).read_text())["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError):  # not a JSON object of files and sizes
        return {}


def agree_on_state(path: Optional[Path]) -> Optional[Path]:
    """Every rank resumes from the state the main process found."""
    return broadcast_from_main(path)


def described(failure: Optional[Exception]) -> Optional[str]:
    """The line that every rank stops with for `failure` (None: no failure): a UserError's message; for
    anything else, a bug that its own rank shows with its traceback, what the other ranks say instead."""
    if failure is None:
        return None
    if isinstance(failure, UserError):
        return str(failure)
    return (f"saving the training state failed on another process ({type(failure).__name__}: "
            f"{first_line(failure)}); its traceback says where.")


def failed_write(error: Exception) -> bool:
    """Whether `error` is a file that could not be written: the system's error, or one that Accelerate,
    safetensors or torch reported in their own types."""
    return (isinstance(error, (OSError, WriteFailed, SafetensorError))
            or isinstance(error, RuntimeError) and any(words in str(error) for words in TORCH_WRITE_WORDS))


def write_trouble(error: Exception) -> str:
    """A failed write's cause in a few words, for WriteFailed."""
    if isinstance(error, WriteFailed):
        return error.reason
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return TORCH_ASSERTION_PREFIX.sub("", first_line(error))


def quota_used_up(error: Exception, folder: Path) -> bool:
    """Whether the space that ran out is the user's quota (EDQUOT), not the device's: as the error says, or,
    where the writer gave only its own words (torch's "unexpected pos"), as a small write into `folder` now
    says (on a cluster `df` shows terabytes free, which "no space left" would contradict)."""
    if is_disk_full(error):
        return over_quota(error)
    return space_refusal(folder) == errno.EDQUOT
