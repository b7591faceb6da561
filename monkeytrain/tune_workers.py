"""The workers of one study, as each sees the others: their names, the trials that count, the trials a lost
worker left running, and which worker ends the study (DIR/finish.claim, created atomically, so exactly one).
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from monkeytrain.tune_study import Setup, say

CLAIM_NAME = "finish.claim"
WORKER_INDEX_ENV = "MONKEYTRAIN_TUNE_WORKER"  # set in the processes of --workers K


@contextmanager
def runs_of_this_worker(study_dir: Path) -> Iterator[None]:
    """While it lasts, the runs that this process trains (its trials, the best run) know they are this worker's
    (distributed.TUNE_STUDY_VARIABLE); put back after, for a caller that goes on (a test)."""
    from monkeytrain.distributed import TUNE_STUDY_VARIABLE

    before = os.environ.get(TUNE_STUDY_VARIABLE)
    os.environ[TUNE_STUDY_VARIABLE] = str(study_dir)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TUNE_STUDY_VARIABLE, None)
        else:
            os.environ[TUNE_STUDY_VARIABLE] = before


def counted(trials: list) -> list:
    """Trials that use up the budget: complete, pruned, failed on their own, or running now."""
    from optuna.trial import TrialState

    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            or (t.state == TrialState.FAIL and "error" in t.user_attrs)]


def is_surplus(study, trial, wanted: int) -> bool:
    """Two workers may both see room for one more trial; the one numbered later gives way."""
    ahead = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
    return len(ahead) >= wanted


def progress(study, wanted: int) -> str:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    return f"{len(counted(trials)) - running} of {wanted} trials done, {running} running"


def worker_name() -> str:
    """host:pid, and under SLURM the array task (or job) and worker index, which survive a requeue."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if array else os.environ.get("SLURM_JOB_ID")
    index = os.environ.get(WORKER_INDEX_ENV)
    slurm = f"slurm-{job}" + (f".w{index}" if index else "") if job else ""
    return ":".join(part for part in (socket.gethostname(), str(os.getpid()), slurm) if part)


def worker_state(owner: str, me: str) -> str:
    """alive, gone or unknown: what this worker (`me`) can tell of another (`owner`, both as worker_name
    gives them). A process on this host is alive or gone by its pid, whatever its SLURM job: two workers of
    one job may share a host. One on another host is gone if it is this SLURM task's earlier life (before
    a requeue that moved it), else unknown: only that host knows."""
    host, pid, job = (owner.split(":") + ["", "", ""])[:3]
    my_host, _, my_job = (me.split(":") + ["", "", ""])[:3]
    if host == my_host and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return "gone"
        except PermissionError:
            pass  # another user's process: alive
        return "alive"
    return "gone" if job and job == my_job else "unknown"


def fail_abandoned(study, me: str) -> None:
    """Trials left running by a worker that is gone are failed, so that they stop counting."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_state(trial.user_attrs.get("worker", ""), me) == "gone":
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            say(f"trial {trial.number} was left running by {trial.user_attrs['worker']}, which is gone; "
                "marked failed, it does not count.")


def finish_is_mine(study, setup: Setup, reason: str) -> bool:
    """The last worker standing ends the study: none running, and this one claims it first."""
    from optuna.trial import TrialState

    running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    if running and reason != "finish":
        say(f"{progress(study, setup.trials)}; the worker that ends the last one finishes the study.")
        return False
    claim = setup.study_dir / CLAIM_NAME
    try:
        handle = open(claim, "x")  # O_EXCL: atomic, NFS included, so one worker wins
    except FileExistsError:
        owner = claim.read_text().strip()
    else:
        sign_claim(handle, claim, setup.worker)
        return True
    owner_is = worker_state(owner, setup.worker)
    if owner_is == "gone" or (reason == "finish" and owner_is == "unknown"):  # --finish: the user's call
        claim.write_text(setup.worker)  # take over; the best run resumes from its saved state
        return True
    say(f"{owner} is finishing the study.")
    return False


def sign_claim(handle, claim: Path, worker: str) -> None:
    """Write this worker's name into the claim it has just created. Should the disk be full, the claim goes
    again: left empty, it would name no worker that could be found gone, and hold the study's end for ever."""
    from monkeytrain.storage import write_failure

    try:
        with handle:
            handle.write(worker)
    except OSError as error:
        claim.unlink(missing_ok=True)
        raise write_failure(claim, error, len(worker.encode()), False, "--study-dir") from error
