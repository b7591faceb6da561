"""The SLURM scripts as a new cluster user meets them: where the log goes, the job's exit code, the
rendezvous port, what the log looks like. Real jobs on the local one-node SLURM (see test_slurm.py
for the cluster and for why jobs are submitted by `first` tests and checked by `last` ones)."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from test_slurm import (FINISHED, RECORDING_ACCELERATE, SLURM_DIR, STUB, as_train_py_takes_it,  # noqa: F401
                        job_environment, job_state, log_file, read_log, run_with_stand_ins, slurm_cluster, submit,
                        wait_for_job)

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


# --- the rendezvous port ----------------------------------------------------------------------

def job_port(job: int) -> int:
    return 20000 + job % 20000


@contextmanager
def port_taken(port: int) -> Iterator[None]:
    """Something else listening on `port` on every address: another job's rendezvous store, say."""
    with socket.socket() as holder:
        holder.bind(("", port))
        holder.listen()
        yield


def launch_node_with_port_taken(tmp_path: Path, **settings: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """launch_node.sh as SLURM job 7 with its port (20007) taken: (how it ended, the launcher's arguments)."""
    (tmp_path / "out").mkdir()
    with port_taken(job_port(7)):
        done = run_with_stand_ins([str(SLURM_DIR / "launch_node.sh")], tmp_path, tmp_path, SLURM_JOB_ID="7",
                                  MONKEYTRAIN_CPU="1", accelerate=RECORDING_ACCELERATE, **settings)
    args = tmp_path / "out" / "args"
    return done, args.read_text().splitlines() if args.exists() else []


def test_on_one_machine_a_taken_job_port_gives_way_to_the_next_free_one(tmp_path):
    """Two jobs on one node whose ids are 20000 apart (or anything on that port): the second fell back
    on Accelerate's warning and its own port choice, or failed."""
    done, args = launch_node_with_port_taken(tmp_path)
    assert done.returncode == 0, done.stderr
    assert int(args[args.index("--main_process_port") + 1]) > job_port(7), args


@pytest.mark.parametrize("settings", [{"NUM_MACHINES": "2"}, {"MAIN_PORT": str(job_port(7))}])
def test_a_taken_rendezvous_port_that_cannot_move_is_one_line(tmp_path, settings):
    """Machine 0 of several (the others cannot be told of another port), or a port the user chose:
    Accelerate stopped machine 0 with a traceback, and the other machines, finding a store on the port,
    joined whatever run it held."""
    done, args = launch_node_with_port_taken(tmp_path, **settings)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"MAIN_PORT={job_port(7)} is in use" in done.stderr and not args


def test_machines_of_a_slurm_job_meet_under_its_own_rendezvous_id(tmp_path):
    """A machine that reaches another job's rendezvous store (a port taken after it was chosen) waits
    for its own job's machines, instead of joining the other job under torchrun's run id "none"."""
    (tmp_path / "out").mkdir()
    recording = '#!/bin/sh\necho "$PET_RDZV_ID" > "$STUB_OUTPUT/rdzv_id"\n'
    done = run_with_stand_ins([str(SLURM_DIR / "launch_node.sh")], tmp_path, tmp_path, accelerate=recording,
                              SLURM_JOB_ID="7", NUM_MACHINES="2", MACHINE_RANK="1", MAIN_PORT="20007",
                              MONKEYTRAIN_CPU="1")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "rdzv_id").read_text().strip() == "7"


PRINT_MASTER_PORT = "import os\nprint('training process on port', os.environ['MASTER_PORT'])\n"


@pytest.fixture(scope="session")
def job_whose_port_is_taken(slurm_cluster, tmp_path_factory) -> Iterator[tuple[int, Path]]:
    """train_multinode.sbatch, submitted held so that its job-id port can be taken before it starts,
    with a training script that prints the port it was given: (job id, its folder)."""
    workdir = tmp_path_factory.mktemp("port-taken")
    (workdir / "train.py").write_text(PRINT_MASTER_PORT)
    env = job_environment(MONKEYTRAIN_CPU="1", MONKEYTRAIN_PROCS_PER_NODE="1",
                          MONKEYTRAIN_TRAIN_SCRIPT=str(workdir / "train.py"))
    job = submit(SLURM_DIR / "train_multinode.sbatch", workdir=workdir, env=env, sbatch_flags=["--nodes=1", "--hold"])
    try:
        with port_taken(job_port(job)):
            subprocess.run(["scontrol", "release", str(job)], check=True)
            yield job, workdir
    finally:
        subprocess.run(["scancel", str(job)], capture_output=True)


@pytest.mark.first
def test_the_job_whose_port_is_taken_is_submitted(job_whose_port_is_taken):
    job, _ = job_whose_port_is_taken
    assert job_state(job)["JobName"] == "monkeytrain-multinode"


@pytest.mark.last
def test_train_multinode_sbatch_takes_the_next_free_port_when_its_own_is_taken(job_whose_port_is_taken):
    job, workdir = job_whose_port_is_taken
    state = wait_for_job(job, timeout=600)
    log = read_log(log_file(workdir, job, "monkeytrain-multinode"))
    assert state["JobState"] == "COMPLETED", log
    port = int(re.search(r"rendezvous [^ ]+:(\d+)", log).group(1))
    assert port != job_port(job) and f"training process on port {port}\n" in log, log


def test_tune_sbatch_on_several_nodes_says_a_worker_trains_on_one(tmp_path):
    """`sbatch --nodes=2 slurm/tune.sbatch`: each worker would train on its first node, the other idle and billed."""
    (tmp_path / "out").mkdir()
    python = '#!/bin/sh\ntouch "$STUB_OUTPUT/started"\n'
    done = run_with_stand_ins(["bash", str(SLURM_DIR / "tune.sbatch")], tmp_path, tmp_path, bin_python=python,
                              SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2", MONKEYTRAIN_ROOT=str(SLURM_DIR.parent),
                              VIRTUAL_ENV=str(tmp_path))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "2 nodes" in done.stderr and "--nodes=1" in done.stderr
    assert not (tmp_path / "out" / "started").exists()


# --- job arrays -------------------------------------------------------------------------------

PRINT_FLAGS = "import sys\nprint('train.py flags:', *sys.argv[1:])\n"


@pytest.fixture(scope="session")
def array_job(slurm_cluster, tmp_path_factory) -> Iterator[tuple[int, Path]]:
    """`sbatch --array=0-1 slurm/train.sbatch --seed 10` with a training script that prints its flags, one
    process each: (the array's job id, its folder)."""
    workdir = tmp_path_factory.mktemp("array")
    (workdir / "train.py").write_text(PRINT_FLAGS)
    env = job_environment(MONKEYTRAIN_ACCELERATE_CONFIG="accelerate_configs/cpu.yaml",
                          MONKEYTRAIN_TRAIN_SCRIPT=str(workdir / "train.py"))
    job = submit(SLURM_DIR / "train.sbatch", "--seed", "10", workdir=workdir, env=env, sbatch_flags=["--array=0-1"])
    yield job, workdir
    subprocess.run(["scancel", str(job)], capture_output=True)


@pytest.mark.first
def test_the_array_job_is_submitted(array_job):
    job, _ = array_job
    assert job_state(f"{job}_0")["ArrayJobId"] == str(job)


@pytest.mark.last
def test_each_task_of_an_array_job_trains_its_own_run_with_its_own_seed(array_job):
    """The usual "three seeds" with Slurm's own array variables: the tasks trained one run, seed and all."""
    job, workdir = array_job
    for task in (0, 1):
        state = wait_for_job(f"{job}_{task}", timeout=600)
        log = read_log(Path(state["StdOut"]))
        assert state["JobState"] == "COMPLETED", log
        flags = log.split("train.py flags: ")[1].splitlines()[0].split()
        assert as_train_py_takes_it(flags, "--run-name") == f"slurm-{job}_{task}", log
        assert as_train_py_takes_it(flags, "--seed") == str(10 + task), log
        assert f"(task {task} of job array {job})" in log.splitlines()[0], log


# --- scancel ----------------------------------------------------------------------------------

def cancel_when_ready(job: int, stub_output: Path) -> None:
    """`scancel JOB` once both stub ranks are up: Slurm's SIGTERM to every process of the job."""
    deadline = time.monotonic() + 300
    while not all((stub_output / f"rank{rank}.ready").exists() for rank in (0, 1)):
        state = job_state(job)["JobState"]
        assert state not in FINISHED and time.monotonic() < deadline, f"ranks never started ({state})"
        time.sleep(0.5)
    subprocess.run(["scancel", str(job)], check=True)


@pytest.fixture(scope="session")
def cancelled_job(slurm_cluster, tmp_path_factory) -> Iterator[tuple[int, Path, Future]]:
    """A two-rank train.sbatch job (the stub as its training script), cancelled by a thread of its own once
    its ranks are up: (job id, its folder, the thread's end)."""
    workdir = tmp_path_factory.mktemp("cancelled")
    (workdir / "stub").mkdir()
    env = job_environment(MONKEYTRAIN_ACCELERATE_CONFIG="accelerate_configs/cpu_ddp.yaml",
                          MONKEYTRAIN_TRAIN_SCRIPT=str(STUB), STUB_OUTPUT=str(workdir / "stub"))
    job = submit(SLURM_DIR / "train.sbatch", workdir=workdir, env=env)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slurm-scancel") as canceller:
            yield job, workdir, canceller.submit(cancel_when_ready, job, workdir / "stub")
    finally:
        subprocess.run(["scancel", str(job)], capture_output=True)


@pytest.mark.first
def test_the_job_to_cancel_is_submitted(cancelled_job):
    job, _, _ = cancelled_job
    assert job_state(job)["JobName"] == "monkeytrain"


@pytest.mark.last
def test_scancel_of_a_two_rank_job_logs_our_stop_line_without_the_launchers_own(cancelled_job):
    """Slurm signals the launcher too, whose elastic agent logged "Received 15 death signal" and "Sending
    process N closing signal SIGTERM" per rank above the one line that says the signal was passed on."""
    job, workdir, cancelled = cancelled_job
    cancelled.result(timeout=600)
    wait_for_job(job, timeout=120)
    log = read_log(log_file(workdir, job))
    assert "launch_node.sh: machine 0: forwarding SIGTERM to the training processes" in log, log
    assert "death signal" not in log and "closing signal" not in log, log
