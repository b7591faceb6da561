"""The workers of one study: lost workers' trials, surplus trials, and who ends the study (its claim)."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from monkeytrain.storage import DiskFull
from monkeytrain.tune_finish import stopped_finishing
from monkeytrain.tune_study import STUDY_NAME, Setup, open_study, study_storage
from monkeytrain.tune_workers import CLAIM_NAME, counted, fail_abandoned, finish_is_mine, is_surplus
from test_storage import fill_to_the_brim, full_disk  # noqa: F401  (a real 2 MiB tmpfs)


def test_the_end_of_a_study_is_taken_over_only_from_a_worker_that_is_gone(tmp_path, monkeypatch):
    """A stopped finish lets go of the claim, for any host's next worker; a claim left behind is taken over
    from a dead process here, from this SLURM task's earlier life, or with --finish from another host, but
    never from a live process here."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # no requeue asked by the stop below
    study, here = open_study(tmp_path, optuna.pruners.NopPruner()), os.uname().nodename
    setup = Setup(tmp_path, {}, [], 1, None, f"{here}:5:slurm-7")  # this worker: SLURM job 7, on this host

    def claimed_by(owner: str, reason: str) -> bool:
        (tmp_path / CLAIM_NAME).write_text(owner)
        return finish_is_mine(study, setup, reason)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert claimed_by(f"{here}:{dead}", "trials") and claimed_by("elsewhere:1:slurm-7", "trials")
    assert not claimed_by("elsewhere:1", "trials") and claimed_by("elsewhere:1", "finish")
    live = f"{here}:{os.getpid()}:slurm-7"  # another worker of the same job, on this host
    assert not claimed_by(live, "trials") and not claimed_by(live, "finish")

    stopped_finishing("SIGTERM", setup)
    assert not (tmp_path / CLAIM_NAME).exists()


def test_a_claim_the_disk_has_no_room_for_is_one_line_and_leaves_no_empty_claim(full_disk, tmp_path):
    """An empty finish.claim names no worker that could be found gone: every later run said " is finishing the
    study." and ended, leaving the study unfinished."""
    fill_to_the_brim(full_disk)
    setup = Setup(full_disk, {}, [], 1, None, "host:5")
    with pytest.raises(DiskFull, match=f"of {full_disk} to write {CLAIM_NAME} "):
        finish_is_mine(open_study(tmp_path, optuna.pruners.NopPruner()), setup, "trials")
    assert not (full_disk / CLAIM_NAME).exists()


def test_trials_left_running_by_a_lost_worker_stop_counting(tmp_path):
    """SIGKILL leaves a trial running: a later worker on the same host (the dead pid) or the same SLURM
    task after a requeue to another host fails it; another host's or a live process's trial is left alone,
    a live one of the same SLURM job too (two workers of one job on one host)."""
    study = optuna.create_study(study_name=STUDY_NAME, storage=study_storage(tmp_path), direction="maximize")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    owners = [f"vm:{dead}", "elsewhere:1:slurm-7_1", f"vm:{os.getpid()}:slurm-7_1", "elsewhere:1",
              f"vm:{os.getpid()}"]
    for owner in owners:
        study.ask().set_user_attr("worker", owner)
    fail_abandoned(study, "vm:5:slurm-7_1")  # this SLURM task's next life, on host vm
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL, TrialState.FAIL, TrialState.RUNNING,
                                                     TrialState.RUNNING, TrialState.RUNNING]
    assert len(counted(study.get_trials())) == 3  # failed by a lost worker: not counted
    assert is_surplus(study, study.ask(), wanted=2) and not is_surplus(study, study.get_trials()[2], wanted=1)
