"""The run directory: one per run, named alike on every rank, checked before anything is written; the
records of what it trains on, written before training."""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

import yaml

from monkeytrain.checkpoint import BEST_NAME
from monkeytrain.config import config_yaml, flag_name, recorded_config, warn, with_absolute_paths
from monkeytrain.distributed import broadcast_from_main, failing_alike_on_every_rank
from monkeytrain.errors import UserError
from monkeytrain.results import json_with_matrix_rows
from monkeytrain.runrecords import DATA_RECORD, own_test_folder, trained_every_epoch
from monkeytrain.selection import BEFORE_SELECT_ON
from monkeytrain.statestore import state_dirs
from monkeytrain.storage import check_writable_dir
from monkeytrain.tracking import METRICS_NAME, RUN_ID_NAME

RESULTS_NAME = "results.json"  # written last: a run directory that holds it is finished
CONFIG_NAME = "config.yaml"
LOCK_NAME = ".in-use"  # held by the run that trains in the folder; see claimed()
# What a resumed run may change: where and how it runs, saves, logs and evaluates. Any other flag (the
# model, the data, the batch size, the epochs that the schedule spans, ...) would not continue the run.
MAY_CHANGE_ON_RESUME = {"num_workers", "cache_dir", "data_pipeline", "recipe", "pretrained", "mixed_precision",
                        "compile", "cuda_graphs", "tta_flip", "tta_shift", "resume", "save_every",
                        "save_every_minutes", "keep_states", "report_to", "log_checkpoint", "output_dir", "run_name",
                        "cpu", "cpu_threads", "debug", "score_test", "strict_data"}

# Flags added since runs began: what a run whose config.yaml lacks one had, and goes on with when resumed
BEFORE_THE_FLAG = {"select_on": BEFORE_SELECT_ON, "hflip": 0.5, "random_erasing": 0.0}


def prepare_run_dir(config, accelerator) -> Path:
    """The run directory; a finished run is never reopened, one with a checkpoint only to resume. A state
    given to --resume continues its own run, in its own folder (where its best checkpoint is)."""
    if config.resume and config.resume != "auto":
        continue_in_its_run(config, Path(config.resume).resolve().parent.parent)  # RUN/state/step-N
    if not config.run_name:
        config.run_name = broadcast_from_main(new_run_name(Path(config.output_dir))
                                              if accelerator.is_main_process else None)
        if config.resume == "auto" and accelerator.is_main_process:  # a new name never has a state to resume
            warn(f"--resume auto without --run-name has no run to continue: a new run {config.run_name} starts; "
                 "to continue a stopped run, give its name with --run-name (its stop line says both).")
    run_dir = Path(config.output_dir) / config.run_name
    # First: a run still going in the folder is what the user must hear of, not advice to resume it
    problem = broadcast_from_main(in_use(run_dir / LOCK_NAME) if accelerator.is_main_process else None)
    if problem:
        raise UserError(problem)
    if (run_dir / RESULTS_NAME).exists():
        raise UserError(finished_run(run_dir, config))
    if (run_dir / BEST_NAME).exists() and not config.resume:
        raise UserError(holds_a_checkpoint(run_dir))
    problem = None
    if accelerator.is_main_process:
        try:
            check_writable_dir(run_dir, "--output-dir")  # now, not as a traceback at the first save
        except UserError as error:
            problem = str(error)
    problem = broadcast_from_main(problem)  # every rank stops; none is left waiting for the main one
    if problem:
        raise UserError(problem)
    return run_dir


def write_run_records(log, config, manifest: dict) -> None:
    """config.yaml and data_manifest.json, before training, by the main process (the others' logs write
    nothing). Should that fail (a full disk, a folder made read-only), every rank ends with its one line:
    the others would meet the main one's end at their next collective, as a lost connection (gloo, exit
    status 1) or only at NCCL's timeout."""
    def write() -> None:
        log.write_file(CONFIG_NAME, config_yaml(config))
        log.write_file(DATA_RECORD, json.dumps(manifest, indent=2))

    failing_alike_on_every_rank(write)


def write_results(log, results: dict) -> None:
    """results.json, last (it marks the run finished), by the main process: should that fail (a full disk), every
    rank ends with its line, as in write_run_records; the others would end with status 0, as if the run had."""
    failing_alike_on_every_rank(lambda: log.write_file(RESULTS_NAME, json_with_matrix_rows(results)))


def finished_run(run_dir: Path, config) -> str:
    """Why a finished run is not reopened, and what to do instead: a state given by its path names that run
    itself, so "another --run-name" would only be refused next as a state of another run."""
    if config.resume and config.resume != "auto":
        return (f"{run_dir} holds a finished run (results.json), which its states cannot continue; start a new "
                f"run without --resume (from its weights: --pretrained {run_dir / BEST_NAME}).")
    return f"{run_dir} holds a finished run (results.json); pick another --run-name."


def holds_a_checkpoint(run_dir: Path) -> str:
    """Why a new run is not begun in a stopped run's folder; --resume auto is offered only where it would
    continue the run, from a saved state (without one it starts over, replacing the checkpoint). A run whose
    training ended is scored from its best checkpoint first: its newest state is most often from before the
    end (none is saved for it), so a resume trains its last epochs again."""
    saved = bool(state_dirs(run_dir))
    if trained_every_epoch(run_dir):
        resume = ", or train its last epochs again from its newest saved state with --resume auto" if saved else ""
        return (f"{run_dir} holds a run whose training ended but that was never scored (no results.json); "
                f"{score_its_checkpoint(run_dir)}{resume}; or pick another --run-name.")
    if saved:
        return (f"{run_dir} holds a stopped run (a checkpoint and a saved state); pick another --run-name, move "
                "it away, or continue it with --resume auto.")
    return (f"{run_dir} already holds a checkpoint, and no saved state to continue the run from; pick another "
            "--run-name, or move it away.")


def score_its_checkpoint(run_dir: Path) -> str:
    """How to score the best checkpoint of a run whose training ended: on its test split's own folder, or on
    images it did not train on, where its test split was held out of the training folder."""
    command = f"monkeytrain evaluate --checkpoint {run_dir / BEST_NAME}"
    folder = own_test_folder(run_dir, began_config(run_dir / CONFIG_NAME))  # from any working directory
    if folder is not None:
        return f"score its best checkpoint on its test split with `{command} {folder}`"
    listed = f" (its {DATA_RECORD} lists its test split's files)" if (run_dir / DATA_RECORD).is_file() else ""
    return f"score its best checkpoint with `{command} FOLDER` on images it did not train on{listed}"


def new_run_name(output_dir: Path) -> str:
    """The time to the second, with -2, -3, ... for runs started within the same second: claimed by
    creating its folder, so that runs started together (a loop of seeds sent to the background) never
    share one. A folder that cannot be made is reported by the writable check that follows."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for number in itertools.count(1):
        name = stamp if number == 1 else f"{stamp}-{number}"
        try:
            (output_dir / name).mkdir(parents=True)
        except FileExistsError:
            continue
        except OSError:
            pass  # for the writable check to report
        return name


def continue_in_its_run(config, state_run: Path) -> None:
    """--resume RUN/state/step-N continues RUN: its folder unless --run-name names that one."""
    if not config.run_name:
        config.output_dir, config.run_name = str(state_run.parent), state_run.name
    elif (Path(config.output_dir) / config.run_name).resolve() != state_run:
        raise UserError(f"--resume {config.resume} is a state of the run {state_run}, whose best checkpoint is "
                        "there; leave out --run-name (and --output-dir) to continue that run.")


def check_resumed_run(run_dir: Path, config, accelerator) -> None:
    """A run asked to resume goes on with its own flags from its newest saved state; without one (stopped
    before its first save) it starts over, saying so: its metrics.jsonl and W&B run id go, so that neither
    holds the epochs of two runs (W&B drops a step logged below its last one)."""
    if config.resume != "auto" or state_dirs(run_dir):
        check_resumed_config(run_dir, config, accelerator.is_main_process)
    elif accelerator.is_main_process and (run_dir / METRICS_NAME).is_file():
        warn(f"{run_dir} has no saved state to resume from (stopped before its first save): training starts "
             "over from epoch 1, replacing its metrics.jsonl and best.safetensors.")
        for name in (METRICS_NAME, RUN_ID_NAME):
            (run_dir / name).unlink(missing_ok=True)


def check_resumed_config(run_dir: Path, config, is_main_process: bool = True) -> None:
    """A run that resumes from a state goes on with the flags it began with (its config.yaml), checked
    before that file is written again: a changed model or data set would fail on loading, a changed batch
    size or epoch count would bend the learning-rate schedule, silently. Without a readable config.yaml
    (deleted by hand) nothing can be checked: the main process warns, and the run goes on."""
    saved = run_dir / CONFIG_NAME
    if not config.resume:
        return
    began = began_config(saved)
    if began is None:
        if is_main_process:
            warn(f"{saved} is missing or unreadable, so the flags of this resume cannot be checked against those "
                 "the run began with: it goes on with the flags given, and records them there.")
        return
    goes_on_as_it_began(began, config, saved, is_main_process)
    began, now = with_absolute_paths(began), with_absolute_paths(recorded_config(config))
    if began.get("data") is None and not config.data:
        now["data"] = None  # began before config.yaml named the data; the state's data manifest is checked on loading
    changed = [name for name, value in now.items()
               if name in began and began[name] != value and name not in MAY_CHANGE_ON_RESUME]
    if len(changed) == 1:
        raise UserError(changed_on_resume(changed[0], now[changed[0]], began[changed[0]], saved, config))
    if changed:  # all in one line: one at a time, a resume with the flags left out took a try for each
        flags = ", ".join(f"--{flag_name(name)} {began[name]}" if began[name] is not None else
                          f"no --{flag_name(name)}" for name in changed)
        raise UserError(f"{saved.parent} began with other flags than this resume's ({saved}): {flags}; a resumed "
                        f"run goes on with the flags it began with: give them again (--config {saved} gives them "
                        "all), or start a new run.")


def goes_on_as_it_began(began: dict, config, saved: Path, is_main_process: bool) -> None:
    """A run begun before a flag existed (its config.yaml has no such key) goes on as it began, not with the
    flag's default: a run begun before --select-on chose its best epoch on accuracy, and its saved best is
    one; balanced accuracy from here on would weigh one metric against the other."""
    for name, value in BEFORE_THE_FLAG.items():
        if name not in began and getattr(config, name) != value:
            if is_main_process:
                warn(f"{saved.parent} began before --{flag_name(name)} existed: it goes on with "
                     f"--{flag_name(name)} {value}, as it began ({saved}).")
            setattr(config, name, value)


def changed_on_resume(name: str, value, began, saved: Path, config) -> str:
    """Why a resume with a flag changed from `began` (config.yaml's value) to `value` is refused."""
    if name == "data" and not config.data:  # from $MONKEYTRAIN_DATA or the default folder
        return (f"the data found without --data ({value or 'the built-in synthetic set'}) is not the {began} that "
                f"{saved.parent} began with ({saved}); give --data {began} to resume it, or start a new run.")
    flag, run = f"--{flag_name(name)}", saved.parent
    if value is None:  # dropped on resume
        return f"{run} began with {flag} {began} ({saved}); give it again to resume the run, or start a new run."
    if began is None:
        what = "with the data found without --data" if name == "data" else f"without {flag}"
        return (f"{run} began {what} ({saved}), not with {flag} {value}; a resumed run goes on with its own "
                "flags: drop it, or start a new run.")
    # Not "drop it": the value may be the default of a flag the resume leaves out (--seed 0 for a run begun
    # with --seed 5), and no flag was given to drop.
    return (f"{run} began with {flag} {began} ({saved}), not {value}; a resumed run goes on with the flags it "
            f"began with: give {flag} {began}, or start a new run.")


def began_config(saved: Path) -> dict | None:
    """The config a run recorded when it began; None where there is no readable mapping to hold it to."""
    try:
        began = yaml.safe_load(saved.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return began if isinstance(began, dict) else None


@contextlib.contextmanager
def claimed(run_dir: Path, accelerator) -> Iterator[None]:
    """Hold the run directory while the run uses it; after, remove it if nothing was written in it (a run
    stopped by bad input). Another run given the same --run-name meanwhile (a command started twice, jobs
    of an array given one name) would mix its metrics, states and checkpoint with this one's: it ends with
    one line instead. The main process holds an flock, which the system lets go should it be killed."""
    lock, problem = None, None
    if accelerator.is_main_process:
        try:
            lock = lock_file(run_dir / LOCK_NAME)
        except UserError as error:
            problem = str(error)
    problem = broadcast_from_main(problem)  # every rank stops, as in prepare_run_dir
    if problem:
        raise UserError(problem)
    try:
        yield
    finally:
        if lock is not None:
            with contextlib.suppress(OSError):
                (run_dir / LOCK_NAME).unlink()  # while still locked: see lock_file's check
            os.close(lock)
        if accelerator.is_main_process:
            remove_if_empty(run_dir)


def lock_file(path: Path) -> int | None:
    """An open file descriptor that holds an exclusive flock on `path`, naming this process in it; None
    where the file system has no locks (some network ones): the run goes unguarded, as it used to."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None  # the folder just passed the writable check: a file system that refuses this file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            problem = held_by_another(path, fd)
            os.close(fd)
            raise UserError(problem) from None
        except OSError:
            os.close(fd)
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):  # not a file its last holder had just removed
                with contextlib.suppress(OSError):  # who holds it, for the message: a full disk goes without
                    os.ftruncate(fd, 0)
                    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
                return fd
        os.close(fd)


def in_use(path: Path) -> str | None:
    """Why the run folder of the lock file `path` cannot be used, if a running run holds it; the lock is only
    tried, and let go at once (claimed() takes it for this run)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file: no run in it now (or a file system without; claimed() says the rest)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return held_by_another(path, fd)
    except OSError:
        return None
    finally:
        os.close(fd)  # lets go of the shared lock, if it was taken
    return None


def held_by_another(path: Path, fd: int) -> str:
    """The line for a run folder whose lock file (open as `fd`) another run holds, naming that run's process."""
    holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
    return (f"{path.parent} is in use by a run that is still going ({holder}); wait for it to end, or pick "
            "another --run-name.")


def remove_if_empty(run_dir: Path) -> None:
    """The run directory goes if nothing was written in it."""
    try:
        run_dir.rmdir()
    except OSError:  # it holds a run's files (or is gone already)
        pass
