"""The SLURM scripts as a new cluster user meets them: where the log goes, the job's exit code, the
rendezvous port, what the log looks like. Real jobs on the local one-node SLURM (see test_slurm.py
for the cluster and for why jobs are submitted by `first` tests and checked by `last` ones)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from test_slurm import (SLURM_DIR, job_environment, job_state, log_file, read_log,  # noqa: F401
                        slurm_cluster, submit, wait_for_job)

# Each fails at once, in the script or in what it starts: a bad Accelerate config, tune without --space.
FAILING_AT_ONCE = {
    "train.sbatch": ("monkeytrain", [], "Accelerate config"),
    "train_multinode.sbatch": ("monkeytrain-multinode", ["--nodes=1"], "Accelerate config"),
    "tune.sbatch": ("monkeytrain-tune", ["--array=0"], "--space"),
}


@pytest.fixture(scope="session")
def jobs_without_a_log_folder(slurm_cluster, tmp_path_factory) -> dict[str, tuple[int, Path]]:
    """Each sbatch script submitted from an empty folder (no logs/ in it), as a new user does:
    script name -> (job id, the folder)."""
    jobs = {}
    for script, (_, sbatch_flags, _) in FAILING_AT_ONCE.items():
        workdir = tmp_path_factory.mktemp("no-log-folder")
        env = job_environment(MONKEYTRAIN_ACCELERATE_CONFIG="accelerate_configs/nope.yaml", MONKEYTRAIN_CPU="1")
        jobs[script] = submit(SLURM_DIR / script, workdir=workdir, env=env, sbatch_flags=sbatch_flags), workdir
    yield jobs
    for job, _ in jobs.values():
        subprocess.run(["scancel", str(job)], capture_output=True)


def the_log(script: str, job: int, workdir: Path) -> Path:
    name = FAILING_AT_ONCE[script][0]
    return workdir / f"{name}-{job}_0.out" if script == "tune.sbatch" else log_file(workdir, job, name)


@pytest.mark.first
def test_jobs_log_into_their_working_folder(jobs_without_a_log_folder):
    for script, (job, workdir) in jobs_without_a_log_folder.items():
        shown = job_state(job)["StdOut"]
        assert Path(shown).parent == workdir, (script, shown)


@pytest.mark.last
@pytest.mark.parametrize("script", FAILING_AT_ONCE)
def test_a_job_submitted_without_a_log_folder_still_writes_its_log(jobs_without_a_log_folder, script):
    """Slurm opens the log before the script runs and creates no folder: with --output=logs/... and no
    logs/, the job failed with Reason=JobLaunchFailure and no word anywhere the user would look."""
    job, workdir = jobs_without_a_log_folder[script]
    task = f"{job}_0" if script == "tune.sbatch" else job
    state = wait_for_job(task, timeout=600)
    log = read_log(the_log(script, job, workdir))
    assert state["JobState"] == "FAILED" and state["Reason"] != "JobLaunchFailure", (state, log)
    assert state["ExitCode"] == "2:0", state  # bad input: status 2, what sacct shows too
    assert FAILING_AT_ONCE[script][2] in log, log  # the one line that says what to do
