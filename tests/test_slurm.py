"""The SLURM scripts, run by a real one-node SLURM (slurm/local_cluster.sh), not a mock.

The `slurm_cluster` fixture starts the cluster (installing slurm-wlm and munge
with apt-get the first time; needs root) and stops it at the end of the session
if it was not already running. When SLURM cannot be started the tests that need
it are skipped, except in CI (CI=true), where that is a failure. The helpers
`submit`, `job_state`, `wait_for_job` and `log_file` are meant for more SLURM
tests; accounting is off, so job states come from `scontrol show job` (kept for
MinJobAge = 1 h after a job ends).

A job that requeues itself is held by Slurm for about two minutes before it
runs again, and most SLURM jobs here spend their time waiting (for their turn
on the node, for their ranks to start). So the jobs are submitted by tests
marked `first` (see conftest.py), which run before every other test of the
session; threads of their own send each job its signal when it is ready; and
tests marked `last`, which run after all the others, check how the jobs ended.
The rest of the suite runs meanwhile instead of waiting.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import Job, write_image_folder
from forked import free_port

PROJECT = Path(__file__).resolve().parent.parent
SLURM_DIR = PROJECT / "slurm"
CLUSTER = SLURM_DIR / "local_cluster.sh"
TRAIN_SCRIPT = PROJECT / "monkeytrain" / "train.py"
STUB = Path(__file__).with_name("signal_stub.py")
# The sbatch files ask for GPUs and 32 cores; a CPU-only node must be told otherwise.
CPU_NODE = ["--gres=none", f"--cpus-per-task={os.cpu_count()}"]
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}
TINY = ["--image-size", "32", "--epochs", "1", "--batch-size", "4", "--num-workers", "0",
        "--max-batches-per-epoch", "2"]


# --- helpers ------------------------------------------------------------------

def job_environment(**extra: str) -> dict[str, str]:
    """This environment for a job (sbatch passes it on), without settings that would change
    what the scripts do by default, and with this interpreter's `accelerate` first on PATH."""
    dropped = {"MONKEYTRAIN_DATA", "MONKEYTRAIN_RESUME_FLAG", "MONKEYTRAIN_ACCELERATE_CONFIG", "MONKEYTRAIN_CPU",
               "MONKEYTRAIN_PROCS_PER_NODE", "MONKEYTRAIN_TRAIN_SCRIPT", "MONKEYTRAIN_ROOT", "HF_HUB_OFFLINE",
               "WANDB_MODE", "NUM_MACHINES", "MACHINE_RANK", "MAIN_ADDR", "MAIN_PORT", "MONKEYTRAIN_REQUEUE_FILE",
               "WANDB_API_KEY", "WANDB_BASE_URL"}
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("SLURM_")}
    env["NETRC"] = os.devnull  # no `wandb login` either: W&B is not used unless a test says so
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def submit(script: Path, *train_args: str, workdir: Path, env: dict[str, str], sbatch_flags=()) -> int:
    """sbatch `script` from the checkout (SLURM_SUBMIT_DIR) with the job working in `workdir`, where
    its log goes; returns the job id at once (`wait_for_job` waits for its end: sooner than
    `sbatch --wait`, which looks again only after 2, 8 and then 32 s)."""
    command = ["sbatch", "--parsable", f"--chdir={workdir}", *CPU_NODE, *sbatch_flags, str(script), *train_args]
    done = subprocess.run(command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60)
    job_id = done.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch failed: {done.stdout}{done.stderr}"
    return int(job_id)


def job_state(job_id: int) -> dict[str, str]:
    """`scontrol show job` as a dict: JobState, Restarts, ExitCode, StdOut, ..."""
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", str(job_id)],
                           capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", shown))


def wait_for_job(job_id: int, timeout: float = 300) -> dict[str, str]:
    """Poll until the job has ended (it may pass through PENDING/RUNNING/REQUEUED on the way)."""
    deadline = time.monotonic() + timeout
    while (state := job_state(job_id))["JobState"] not in FINISHED:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job_id)])
            raise AssertionError(f"job {job_id} still {state['JobState']} after {timeout} s; cancelled")
        time.sleep(0.5)
    return state


def log_file(workdir: Path, job_id: int, job_name: str = "monkeytrain") -> Path:
    """Where the scripts' `--output=%x-%j.out` puts the job's log: its working folder."""
    return workdir / f"{job_name}-{job_id}.out"


def read_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no log file {path})"


def stand_in_commands(folder: Path, **commands: str) -> Path:
    """A folder, to put first on PATH, of executables named as the keywords and holding their text."""
    folder.mkdir()
    for name, text in commands.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


# For tests that run no SLURM: records what it is told to do (not `scontrol show ...`), shows nothing.
RECORDING_SCONTROL = '#!/bin/sh\n[ "$1" = show ] || echo "$@" >> "$SCONTROL_CALLS"\n'


def checkpoint_header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


# --- fixtures -----------------------------------------------------------------

@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local SLURM for the session (the requeued job outlives this module's other tests,
    see above); stopped at the end unless it was already up."""
    was_running = False
    try:
        was_running = subprocess.run([str(CLUSTER), "status"], capture_output=True, timeout=60).returncode == 0
        started = subprocess.run([str(CLUSTER), "start"], capture_output=True, text=True, timeout=900)
        problem = None if started.returncode == 0 else (started.stderr.strip().splitlines() or ["no output"])[-1]
    except (OSError, subprocess.TimeoutExpired) as error:
        problem = str(error)
    if problem:
        reason = f"could not start a local SLURM with slurm/local_cluster.sh start: {problem}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: SLURM is required in CI)", pytrace=False)
        pytest.skip(reason)
    yield
    if not was_running:
        subprocess.run([str(CLUSTER), "stop"], capture_output=True)


def wait_for_log(job: int, log: Path, text: str, timeout: float) -> None:
    """Poll the job's log until `text` appears; the job must not end first."""
    deadline = time.monotonic() + timeout
    while text not in read_log(log):
        state = job_state(job)["JobState"]
        assert state not in FINISHED, f"job {job} ended ({state}) before printing {text!r}:\n{read_log(log)[-4000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{read_log(log)[-4000:]}"
        time.sleep(0.2)


@dataclass
class RequeuedJob:
    job: int
    log: Path
    run_dir: Path
    epochs: int
    requeued: Future  # done once the job has been signalled and has requeued itself


def signal_after_first_epoch(job: int, log: Path, epochs: int) -> None:
    wait_for_log(job, log, f"epoch   1/{epochs}", timeout=300)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True)
    wait_for_log(job, log, "scontrol requeue", timeout=120)


@pytest.fixture(scope="session")
def requeued_job(slurm_cluster, tmp_path_factory):
    """A train_multinode.sbatch job on this one node, two CPU ranks, sent SLURM's warning signal
    (SIGUSR1 to the batch shell) after its first epoch, by a thread of its own; Slurm then holds the
    requeued job for about two minutes before it resumes. Cancelled at the end of the session if it is
    still there. The multi-node script, because its requeue has the most parts: the batch shell
    forwards the signal through a srun step and requeues after the launchers' step has ended;
    train.sbatch's (launch_node.sh's own) is checked without SLURM."""
    workdir = tmp_path_factory.mktemp("requeue")
    epochs = 8  # a signal sent after the first is noticed (every 8 steps, or at an epoch's end) well before the last
    env = job_environment(MONKEYTRAIN_CPU="1", MONKEYTRAIN_CACHE=str(workdir / "cache"))
    job = submit(SLURM_DIR / "train_multinode.sbatch", "--model", "resnet10t", "--image-size", "32",
                 "--batch-size", "16", "--epochs", str(epochs), "--output-dir", str(workdir / "runs"),
                 workdir=workdir, env=env, sbatch_flags=["--nodes=1"])
    log = log_file(workdir, job, "monkeytrain-multinode")
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slurm-requeue") as watcher:
            yield RequeuedJob(job, log, workdir / "runs" / f"slurm-{job}", epochs,
                              watcher.submit(signal_after_first_epoch, job, log, epochs))
    finally:
        subprocess.run(["scancel", str(job)], capture_output=True)  # nothing to do once it has completed


# --- real training ------------------------------------------------------------

@pytest.mark.first
def test_the_requeue_job_is_submitted_requeueable(requeued_job):
    """Started first: the job the last test of the session checks (signalled once its first epoch is done)."""
    assert job_state(requeued_job.job)["Requeue"] == "1"


@pytest.fixture(scope="session")
def two_rank_job(slurm_cluster, tmp_path_factory) -> tuple[int, Path]:
    """A two-rank train.sbatch job on the synthetic set, submitted by the first tests of the session
    and checked by the last: (job id, its working folder)."""
    workdir = tmp_path_factory.mktemp("two-ranks")
    env = job_environment(MONKEYTRAIN_ACCELERATE_CONFIG="accelerate_configs/cpu_ddp.yaml",
                          MONKEYTRAIN_CACHE=str(workdir / "cache"))
    job = submit(SLURM_DIR / "train.sbatch", "--debug", "--model", "resnet10t", "--image-size", "32",
                 "--epochs", "1", "--output-dir", str(workdir / "runs"), workdir=workdir, env=env)
    yield job, workdir
    subprocess.run(["scancel", str(job)], capture_output=True)  # nothing to do once it has completed


@pytest.mark.first
def test_train_sbatch_directives_reach_slurm(two_rank_job):
    """What the script's #SBATCH lines ask for, as Slurm holds the job (its run is checked last)."""
    job, workdir = two_rank_job
    state = job_state(job)
    assert state["JobName"] == "monkeytrain" and state["Requeue"] == "1", state
    assert state["NumNodes"].split("-")[0] == "1" and state["StdOut"] == str(log_file(workdir, job)), state


@pytest.mark.last
def test_train_sbatch_trains_two_cpu_ranks_to_completion(two_rank_job):
    job, workdir = two_rank_job
    state = wait_for_job(job, timeout=300)
    log = read_log(log_file(workdir, job))
    assert state["JobState"] == "COMPLETED", log[-4000:]
    run_dir = workdir / "runs" / f"slurm-{job}"  # the run name the script gives
    assert (run_dir / "best.safetensors").is_file()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["synthetic_data"] is True
    assert "2 processes on cpu" in log  # the trainer's start-up line, from rank 0


def node_command() -> str:
    """What train_multinode.sbatch has srun run on every node (the bash -c '...' text)."""
    match = re.search(r"bash -c '([^']*)' \"\$root/slurm/launch_node\.sh\" \\\n",
                      (SLURM_DIR / "train_multinode.sbatch").read_text())
    assert match, "train_multinode.sbatch no longer runs slurm/launch_node.sh through bash -c '...' $root/..."
    return match.group(1)


def train_on_two_machines_and_one(tmp_path: Path) -> tuple[list[int], list[Path]]:
    """The multi-node launch line, as two machines on this host, one CPU rank each (no SLURM needed),
    and a one-process run of the same command started alongside them: their exit codes and logs."""
    data = write_image_folder(tmp_path / "data", classes=3, per_class=8)
    common = ["--data", str(data), *TINY, "--model", "resnet10t", "--output-dir", str(tmp_path / "runs")]
    port = str(free_port())
    logs = [tmp_path / f"machine{rank}.log" for rank in (0, 1)] + [tmp_path / "one.log"]
    commands, environments = [], []
    for rank in (0, 1):
        # What train_multinode.sbatch exports, plus what SLURM sets on each node; run from the job's
        # working directory.
        commands.append(["bash", "-c", node_command(), str(SLURM_DIR / "launch_node.sh"), "--run-name", "two",
                         "--cache-dir", str(tmp_path / "cache-two"), *common])
        environments.append(job_environment(SLURM_JOB_ID="4242", SLURM_NODEID=str(rank), NUM_MACHINES="2",
                                            MAIN_ADDR="127.0.0.1", MAIN_PORT=port, MONKEYTRAIN_CPU="1",
                                            MONKEYTRAIN_PROCS_PER_NODE="1"))
    # The reference: one process, its own cache and output folder.
    commands.append([sys.executable, str(TRAIN_SCRIPT), "--cpu", *common, "--run-name", "one",
                     "--cache-dir", str(tmp_path / "cache-one"), "--output-dir", str(tmp_path / "runs-one")])
    environments.append(job_environment())
    processes = []
    for command, env, log, cwd in zip(commands, environments, logs, [tmp_path, tmp_path, tmp_path]):
        with open(log, "w") as sink:  # files, not pipes: a full pipe would stall one machine and both hang
            processes.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT))
    try:
        return [process.wait(timeout=300) for process in processes], logs
    finally:
        for process in processes:
            process.kill()


@pytest.fixture(scope="session")
def two_machines(tmp_path_factory, background_jobs) -> tuple[Path, Job]:
    """`train_on_two_machines_and_one` as a background job, handed over by the first tests of the
    session and checked by the last: (its folder, the job)."""
    folder = tmp_path_factory.mktemp("two-machines")
    return folder, background_jobs.submit(lambda: train_on_two_machines_and_one(folder))


@pytest.mark.first
def test_train_multinode_sbatch_starts_launch_node_sh_on_every_node(two_machines):
    command = node_command()  # and the two-machine run of it is handed to the background thread
    assert "MACHINE_RANK=$SLURM_NODEID" in command and command.endswith('exec "$0" "$@"'), command


@pytest.mark.last
def test_two_machines_train_one_run_with_one_process_statistics(two_machines):
    """The multi-node launch line, as two machines on this host, against a one-process run."""
    tmp_path, job = two_machines
    codes, logs = job.result()
    outputs = [read_log(log) for log in logs]
    assert codes == [0, 0, 0], "\n".join(f"--- {log.stem}:\n{o[-3000:]}" for log, o in zip(logs, outputs))
    machines = outputs[:2]
    assert sum(o.count("2 processes on cpu") for o in machines) == 1  # one global rank 0 across machines
    assert "(computed)" in "".join(machines)  # statistics reduced across the machines, not read from a cache

    checkpoints = sorted((tmp_path / "runs").rglob("*.safetensors"))
    assert checkpoints == [tmp_path / "runs" / "two" / "best.safetensors"]
    assert json.loads((tmp_path / "runs" / "two" / "results.json").read_text())["world_size"] == 2

    two = checkpoint_header(tmp_path / "runs" / "two" / "best.safetensors")
    reference = checkpoint_header(tmp_path / "runs-one" / "one" / "best.safetensors")
    assert json.loads(two["mean"]) == json.loads(reference["mean"])  # exactly, not approximately
    assert json.loads(two["std"]) == json.loads(reference["std"])


# --- signal forwarding, with a stub in place of train.py ------------------------

def signal_when_ready(job: int, stub_output: Path, ranks: int, log: Path) -> list[dict]:
    """Once every stub rank is up, send SIGUSR1 the way --signal=B:USR1 does; return their reports.
    The job may first wait its turn behind the session's other jobs, each of which takes the node."""
    deadline = time.monotonic() + 300
    while not all((stub_output / f"rank{r}.ready").exists() for r in range(ranks)):
        state = job_state(job)["JobState"]
        assert state not in FINISHED and time.monotonic() < deadline, f"ranks never started ({state}):\n{read_log(log)}"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], check=True)
    state = wait_for_job(job, timeout=120)
    assert state["JobState"] == "COMPLETED", read_log(log)[-4000:]
    return [json.loads((stub_output / f"rank{r}.json").read_text()) for r in range(ranks)]


def assert_forwarded_once(reports: list[dict], job: int) -> None:
    for report in reports:
        assert report["signals"] == ["USR1"]  # every rank, exactly once
        assert report["worker_alive"]  # a rank's own children are not signalled
        assert report["world_size"] == "2"
        argv = " ".join(report["argv"])
        assert f"--cpu --run-name slurm-{job} --resume auto --greeting hello" in argv
        assert report["env"] == {"HF_HUB_OFFLINE": "1", "WANDB_MODE": None, "ACCELERATE_MIXED_PRECISION": "no"}


@dataclass
class ForwardingJob:
    job: int
    log: Path
    reports: Future  # the stub ranks' reports, once the signal has been sent and the job has ended


def forwarding_job(watchers: ThreadPoolExecutor, workdir: Path, script: Path, env: dict[str, str],
                   sbatch_flags=()) -> ForwardingJob:
    """`script` submitted with the stub as its training script; a watcher thread signals it once its
    ranks are up (signal_when_ready)."""
    stub_output = workdir / "stub"
    stub_output.mkdir()
    job = submit(script, "--greeting", "hello", workdir=workdir, env={**env, "MONKEYTRAIN_TRAIN_SCRIPT": str(STUB),
                                                                      "STUB_OUTPUT": str(stub_output)},
                 sbatch_flags=sbatch_flags)
    log = log_file(workdir, job, "monkeytrain-multinode" if script.name == "train_multinode.sbatch" else "monkeytrain")
    return ForwardingJob(job, log, watchers.submit(signal_when_ready, job, stub_output, 2, log))


@pytest.fixture(scope="session")
def forwarding_jobs(slurm_cluster, tmp_path_factory) -> dict[str, ForwardingJob]:
    """Both sbatch scripts' signal forwarding, submitted by the first tests of the session and checked
    by the last: the jobs mostly wait (for Slurm, for their ranks), and the suite runs meanwhile."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="slurm-signal") as watchers:
        yield {
            "train.sbatch": forwarding_job(
                watchers, tmp_path_factory.mktemp("forward"), SLURM_DIR / "train.sbatch",
                job_environment(MONKEYTRAIN_ACCELERATE_CONFIG="accelerate_configs/cpu_ddp.yaml")),
            "train_multinode.sbatch": forwarding_job(
                watchers, tmp_path_factory.mktemp("forward-multinode"), SLURM_DIR / "train_multinode.sbatch",
                job_environment(MONKEYTRAIN_CPU="1"), sbatch_flags=["--nodes=1"]),
        }


@pytest.mark.first
def test_both_sbatch_scripts_submit_jobs_named_as_their_log_files_expect(forwarding_jobs):
    for script, forwarding in forwarding_jobs.items():
        assert job_state(forwarding.job)["StdOut"] == str(forwarding.log), script


@pytest.mark.last
def test_train_sbatch_forwards_the_warning_signal_to_each_rank(forwarding_jobs):
    forwarding = forwarding_jobs["train.sbatch"]
    assert_forwarded_once(forwarding.reports.result(timeout=300), forwarding.job)
    assert "forwarding SIGUSR1" in read_log(forwarding.log)


@pytest.mark.last
def test_multinode_sbatch_on_one_node_forwards_the_warning_signal(forwarding_jobs):
    forwarding = forwarding_jobs["train_multinode.sbatch"]
    assert_forwarded_once(forwarding.reports.result(timeout=300), forwarding.job)
    text = read_log(forwarding.log)
    assert f"1 machine, rendezvous {job_state(forwarding.job)['BatchHost']}:{20000 + forwarding.job % 20000}" in text
    assert "forwarding SIGUSR1 to the training processes on every node" in text


def test_the_launcher_leaves_out_only_its_report_of_a_forwarded_stop_signal():
    """slurm/launcher.py's filter on the elastic agent's loggers (the scancel test sees it work on a real job):
    a rank's failure, another signal and a rank killed unsaved still show."""
    spec = importlib.util.spec_from_file_location("launcher", SLURM_DIR / "launcher.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)

    def shown(message: str, *args) -> bool:
        return launcher.ForwardedStopSignal().filter(logging.LogRecord("agent", logging.WARNING, "", 0, message,
                                                                        args, None))

    closing = "Sending process %s closing signal %s"
    assert shown(closing, 12, "SIGTERM")  # a rank failed, and the agent stops the others
    assert shown("Received %s death signal, shutting down workers", signal.SIGHUP)  # not forwarded: ranks die
    assert not shown("Received %s death signal, shutting down workers", signal.SIGTERM)
    assert not shown(closing, 12, "SIGTERM")
    assert shown("Unable to shutdown process %s via %s, forcefully exiting via %s", 12, signal.SIGTERM, signal.SIGKILL)
    assert launcher.elastic_loggers()  # torch's loggers are where the filter looks for them


def test_the_launcher_launches_should_torch_move_its_loggers(monkeypatch):
    """The filter is cosmetic: a torch release without those modules must not stop every SLURM job."""
    spec = importlib.util.spec_from_file_location("launcher", SLURM_DIR / "launcher.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    monkeypatch.setitem(sys.modules, "torch.distributed.elastic.agent.server.api", None)  # import fails
    assert launcher.elastic_loggers() == []


# A training process that a launcher started (its marker set), with a clock of its own: one Ctrl-C as srun
# passes it to every process of the job step, then a second one.
SRUN_CTRL_C = """
import os, signal
from monkeytrain.preemption import Preemption

now = [0.0]
stop = Preemption(environ={"ACCELERATE_MIXED_PRECISION": "no"}, clock=lambda: now[0])
for sender in ("slurmstepd", "torch's elastic agent", "launch_node.sh"):
    os.kill(os.getpid(), signal.SIGINT)
print("saving", flush=True)
now[0] = 1.0
os.kill(os.getpid(), signal.SIGINT)
print("still saving")
"""


def test_a_ctrl_c_that_srun_passes_to_every_process_of_the_step_is_one_ctrl_c():
    """`srun launch/cpu_ddp.sh` and Ctrl-C: Slurm, the launcher and launch_node.sh each passed the SIGINT on,
    and the second copy stopped every rank at once, unsaved. A second Ctrl-C a second later still does."""
    done = subprocess.run([sys.executable, "-c", SRUN_CTRL_C], env=job_environment(PYTHONPATH=str(PROJECT)),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout == "saving\n" and "KeyboardInterrupt" in done.stderr, done.stdout + done.stderr
    assert done.stderr.count("SIGINT received") == 1, done.stderr


# --- bad input ------------------------------------------------------------------

@pytest.mark.parametrize("setting, named", [
    ({"NUM_MACHINES": "2", "MACHINE_RANK": "2"}, "MACHINE_RANK"),
    ({"MAIN_PORT": "http"}, "MAIN_PORT"),
    ({"MONKEYTRAIN_ACCELERATE_CONFIG": "accelerate_configs/nope.yaml"}, "nope.yaml"),
    ({"MONKEYTRAIN_CPU": "1", "MONKEYTRAIN_PROCS_PER_NODE": "two"}, "MONKEYTRAIN_PROCS_PER_NODE"),
    ({"MONKEYTRAIN_CPU": "1", "MONKEYTRAIN_PROCS_PER_NODE": "0"}, "MONKEYTRAIN_PROCS_PER_NODE"),
])
def test_launch_node_rejects_bad_settings_in_one_line(tmp_path, setting, named):
    done = subprocess.run([str(SLURM_DIR / "launch_node.sh"), "--debug"], cwd=tmp_path,
                          env=job_environment(**setting), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and named in done.stderr


# Stands in for a training process under launch_node.sh: on a stop signal it asks for a requeue, as
# tune's worker does whichever signal it got (train.py asks after SIGUSR1 alone), and exits.
RANK_ASKING_FOR_A_REQUEUE = """
import os, signal, sys, time
from pathlib import Path

def stop(signum, frame):
    Path(os.environ["MONKEYTRAIN_REQUEUE_FILE"]).write_text(os.environ["SLURM_JOB_ID"] + "\\n")
    sys.exit(0)

for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, stop)
Path(os.environ["STUB_OUTPUT"], "ready").touch()
time.sleep(60)
sys.exit(1)
"""


def launch_node_under_slurm(tmp_path: Path, sig: signal.Signals, scontrol: str = RECORDING_SCONTROL, **settings):
    """launch_node.sh as train.sbatch runs it (SLURM_JOB_ID set, nothing above it requeues), with a
    stand-in launcher whose one rank asks for a requeue on a signal, sent to launch_node.sh once the
    rank is up: (the finished process, its stderr, the scontrol calls and the launcher's end, in order)."""
    calls, out = tmp_path / "calls", tmp_path / "out"
    out.mkdir()
    (tmp_path / "rank.py").write_text(RANK_ASKING_FOR_A_REQUEUE)
    launcher = f'#!/bin/sh\n"{sys.executable}" "{tmp_path / "rank.py"}"\necho launcher ended >> "$SCONTROL_CALLS"\n'
    commands = stand_in_commands(tmp_path / "bin", scontrol=scontrol, accelerate=launcher)
    env = job_environment(SLURM_JOB_ID="4242", MONKEYTRAIN_CPU="1", MONKEYTRAIN_PROCS_PER_NODE="1",
                          TMPDIR=str(tmp_path), SCONTROL_CALLS=str(calls), STUB_OUTPUT=str(out), **settings)
    env["PATH"] = f"{commands}{os.pathsep}{env['PATH']}"
    node = subprocess.Popen([str(SLURM_DIR / "launch_node.sh")], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "ready").exists() and node.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        node.send_signal(sig)
        _, stderr = node.communicate(timeout=60)
    finally:
        node.kill()
    assert not list(tmp_path.glob("*.requeue"))  # the request is gone: a requeued job starts without one
    return node, stderr, calls.read_text() if calls.exists() else ""


def test_launch_node_sh_requeues_the_job_once_its_launch_has_ended(tmp_path):
    """Under SLURM, when nothing above it requeues (train.sbatch execs it): after SLURM's warning the
    main process asks for a requeue (preemption.ask_for_requeue; here a stand-in), and launch_node.sh
    requeues once, after the launcher has ended."""
    node, stderr, calls = launch_node_under_slurm(tmp_path, signal.SIGUSR1)
    assert node.returncode == 0, stderr
    assert calls == "launcher ended\nrequeue 4242\n"
    assert stderr.splitlines()[-1] == "launch_node.sh: machine 0: scontrol requeue 4242: ok", stderr


@pytest.mark.parametrize("array_task, resubmit", [
    ({}, "the job"), ({"SLURM_ARRAY_TASK_ID": "2"}, "this task alone (sbatch --array=2 ...)")])
def test_a_requeue_that_fails_fails_the_job_and_says_how_to_continue(tmp_path, array_task, resubmit):
    """A job submitted with --no-requeue: the state is saved, but the job must not end COMPLETED as if
    requeued; the log's last line says how to continue: a task of a job array resubmitted alone, whose
    task id gives its run the seed it began with."""
    refusing = ('#!/bin/sh\n[ "$1" != show ] || exit 1\necho "$@" >> "$SCONTROL_CALLS"\n'
                'echo "Requested operation is presently disabled" >&2\nexit 1\n')
    node, stderr, calls = launch_node_under_slurm(tmp_path, signal.SIGUSR1, scontrol=refusing, **array_task)
    assert node.returncode == 1, stderr
    assert calls == "launcher ended\nrequeue 4242\n"
    last = stderr.splitlines()[-1]
    assert last.startswith("launch_node.sh: machine 0: scontrol requeue 4242 failed (Requested operation is "
                           "presently disabled)"), stderr
    assert f"resubmit {resubmit} with --resume auto --run-name" in last, stderr


def test_launch_node_sh_does_not_requeue_a_job_told_to_end(tmp_path):
    """SIGTERM (scancel, or SLURM's own preemption or time limit) ends the job even if a process asks
    for a requeue: a cancelled job must not run again."""
    node, stderr, calls = launch_node_under_slurm(tmp_path, signal.SIGTERM)
    assert node.returncode == 128 + signal.SIGTERM, stderr
    assert calls == "launcher ended\n"
    assert "not requeued" in stderr.splitlines()[-1] and "SIGTERM" in stderr.splitlines()[-1], stderr


def time_limited(limit: str) -> str:
    """A stand-in scontrol that records what it is told to do and shows a job with this time limit."""
    return RECORDING_SCONTROL + f'if [ "$1" = show ]; then echo "   RunTime=00:00:03 TimeLimit={limit}"; fi\n'


@pytest.mark.parametrize("limit, restarts", [("00:02:00", "0"), ("00:10:00", "1")])
def test_a_job_warned_as_it_starts_is_not_requeued_over_and_over(tmp_path, limit, restarts):
    """`sbatch --time=2` with the warning 120 s before the limit: SLURM warns at once (or with a longer
    lead, at once again after a requeue). Requeued, the job would save and requeue every two minutes
    without end: it ends (status 1, FAILED), its state saved, and the log's last line says how to continue."""
    node, stderr, calls = launch_node_under_slurm(tmp_path, signal.SIGUSR1, scontrol=time_limited(limit),
                                                  SLURM_RESTART_COUNT=restarts)
    assert node.returncode == 1, stderr
    assert calls == "launcher ended\n"  # and no requeue
    last = stderr.splitlines()[-1]
    assert last.startswith("launch_node.sh: machine 0: not requeued: SLURM's warning came") and f"({limit})" in last
    assert "resubmit the job with --resume auto --run-name" in last and "--time" in last, stderr


def test_a_job_warned_early_with_time_left_is_requeued(tmp_path):
    """A warning in the first minute of an hour-long job (`scancel --signal=USR1 --batch` by hand, as the
    tests do): a requeued job has its hour again, so it is requeued."""
    node, stderr, calls = launch_node_under_slurm(tmp_path, signal.SIGUSR1, scontrol=time_limited("01:00:00"))
    assert node.returncode == 0, stderr
    assert calls == "launcher ended\nrequeue 4242\n"


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_sent_while_the_launch_is_starting_reaches_the_training_process(tmp_path, sig):
    """Sent before accelerate has started the training process, which then takes 2 s to install its
    handlers (train.py's imports): the signal waits for it, instead of being lost (or killing it)."""
    out = tmp_path / "stub"
    out.mkdir()
    env = job_environment(MONKEYTRAIN_CPU="1", MONKEYTRAIN_PROCS_PER_NODE="1", MAIN_PORT=str(free_port()),
                          MONKEYTRAIN_TRAIN_SCRIPT=str(STUB), STUB_OUTPUT=str(out), STUB_DELAY="2",
                          STUB_WAIT="20", MONKEYTRAIN_PID_FILE=str(tmp_path / "node.pid"))
    node = subprocess.Popen([str(SLURM_DIR / "launch_node.sh")], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "node.pid").exists():  # written once this script's traps are set
            assert node.poll() is None and time.monotonic() < deadline, node.stderr.read()
            time.sleep(0.05)
        node.send_signal(sig)
        _, stderr = node.communicate(timeout=120)
    finally:
        node.kill()
    assert node.returncode == (0 if sig == signal.SIGUSR1 else 128 + sig), stderr
    assert json.loads((out / "rank0.json").read_text())["signals"] == [sig.name.removeprefix("SIG")], stderr


def test_a_second_term_stops_a_launch_whose_training_process_never_takes_signals(tmp_path):
    """A training process stuck before its handlers (waiting for its peers, say) has trained nothing: a
    held SIGTERM must not make it unstoppable; the second one goes to it at once."""
    out = tmp_path / "stub"
    out.mkdir()
    env = job_environment(MONKEYTRAIN_CPU="1", MONKEYTRAIN_PROCS_PER_NODE="1", MAIN_PORT=str(free_port()),
                          MONKEYTRAIN_TRAIN_SCRIPT=str(STUB), STUB_OUTPUT=str(out), STUB_DELAY="300",
                          MONKEYTRAIN_PID_FILE=str(tmp_path / "node.pid"))
    node = subprocess.Popen([str(SLURM_DIR / "launch_node.sh")], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "node.pid").exists():
            assert node.poll() is None and time.monotonic() < deadline, node.stderr.read()
            time.sleep(0.05)
        node.send_signal(signal.SIGTERM)
        time.sleep(1)
        node.send_signal(signal.SIGTERM)
        _, stderr = node.communicate(timeout=60)  # not the stub's 300 s
    finally:
        node.kill()
    assert node.returncode == 1, stderr  # the launcher's: its training process was killed, unsaved
    assert not (out / "rank0.json").exists()  # it never got as far as its handlers


RECORDING_ACCELERATE = '#!/bin/sh\npwd > "$STUB_OUTPUT/cwd"\nprintf "%s\\n" "$@" > "$STUB_OUTPUT/args"\n'


def run_with_stand_ins(command: list[str], tmp_path: Path, cwd: Path, **settings: str):
    """`command` with these environment settings; bin_NAME=text (accelerate=text too) puts an executable
    NAME (an _ read as -) holding text first on PATH. No CUDA_VISIBLE_DEVICES unless set here."""
    is_tool = lambda key: key.startswith("bin_") or key == "accelerate"  # noqa: E731
    commands = stand_in_commands(tmp_path / "bin", **{k.removeprefix("bin_").replace("_", "-"): v
                                                      for k, v in settings.items() if is_tool(k)})
    env = job_environment(STUB_OUTPUT=str(tmp_path / "out"), TMPDIR=str(tmp_path))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.update({k: v for k, v in settings.items() if not is_tool(k)})
    env["PATH"] = f"{commands}{os.pathsep}{env['PATH']}"
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def launch_recorded(command: list[str], tmp_path: Path, **settings: str) -> tuple[Path, list[str]]:
    """`command` run from tmp_path/work with a stand-in `accelerate` (and whatever else `settings` puts on
    PATH, as bin_NAME=text): (the folder the launcher ran in, its arguments)."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    done = run_with_stand_ins(command, tmp_path, work, accelerate=RECORDING_ACCELERATE, **settings)
    assert done.returncode == 0, done.stderr
    return Path((out / "cwd").read_text().strip()), (out / "args").read_text().splitlines()


@pytest.mark.parametrize("how", ["launch/cpu_debug.sh", "sbatch --chdir"])
def test_training_runs_where_the_user_is_so_relative_paths_are_theirs(tmp_path, how):
    """--data mydata/monkeys, --output-dir and runs/ are relative to the user's working directory (or
    the job's --chdir), as with `python monkeytrain/train.py`, not to the checkout."""
    if how == "sbatch --chdir":  # the job's working folder is not where sbatch ran (the checkout)
        command = ["bash", str(SLURM_DIR / "train.sbatch"), "--data", "mydata/monkeys"]
        settings = dict(SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(PROJECT), bin_scontrol=RECORDING_SCONTROL,
                        MONKEYTRAIN_ACCELERATE_CONFIG="accelerate_configs/cpu_ddp.yaml")
    else:
        command = [str(PROJECT / "launch" / "cpu_debug.sh"), "--data", "mydata/monkeys"]
        settings = {}
    cwd, args = launch_recorded(command, tmp_path, **settings)
    assert cwd == tmp_path / "work"
    assert str(PROJECT / "monkeytrain" / "train.py") in args
    assert args[args.index("--config_file") + 1].startswith(str(PROJECT / "accelerate_configs"))
    assert args[-2:] == ["--data", "mydata/monkeys"]


@pytest.mark.parametrize("flags, named", [
    ([], ["--run-name", "slurm-7"]),
    (["--resume", "runs/X/state/step-00000010"], []),  # continues run X, which refuses another name
    (["--resume=runs/X/state/step-00000010"], []),
    (["--run-name", "mine"], ["--run-name", "mine"]),
    (["--resume", "auto"], ["--run-name", "slurm-7"]),
])
def test_train_sbatch_names_the_run_unless_the_flags_do(tmp_path, flags, named):
    _, args = launch_recorded(["bash", str(SLURM_DIR / "train.sbatch"), *flags], tmp_path, SLURM_JOB_ID="7",
                              MONKEYTRAIN_ROOT=str(PROJECT), MONKEYTRAIN_CPU="1")
    train_flags = args[args.index(str(PROJECT / "monkeytrain" / "train.py")) + 1:]
    given = [a for i, a in enumerate(train_flags) if a == "--run-name" or train_flags[i - 1:i] == ["--run-name"]]
    assert given == named, train_flags
    assert train_flags[len(train_flags) - len(flags):] == flags  # the user's flags come last


# Task 2 of job array 7, a task of three (`sbatch --array=0-2`), which Slurm runs as job 9.
ARRAY_TASK = dict(SLURM_JOB_ID="9", SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_ID="2", SLURM_ARRAY_TASK_COUNT="3")


def as_train_py_takes_it(flags: list[str], name: str) -> str | None:
    """The value train.py's argparse takes for the flag `name` (--seed): the last one given, either form."""
    value = None
    for previous, flag in zip([None, *flags], flags):
        if flag.startswith(f"{name}="):
            value = flag.split("=", 1)[1]
        elif previous == name:
            value = flag
    return value


def launched_train_flags(script: str, flags: list[str], tmp_path: Path, **settings: str) -> list[str]:
    """train.py's flags as `script` passes them on, with stand-ins for accelerate, srun and scontrol."""
    _, args = launch_recorded(["bash", str(SLURM_DIR / script), *flags], tmp_path, bin_srun=RECORDING_ACCELERATE,
                              bin_scontrol="#!/bin/sh\necho node1\n", SLURM_JOB_NUM_NODES="1",
                              SLURM_JOB_NODELIST="node1", MONKEYTRAIN_ROOT=str(PROJECT), MONKEYTRAIN_CPU="1",
                              **settings)
    started = next(i for i, a in enumerate(args) if a.endswith(("train.py", "launch_node.sh")))
    return args[started + 1:]


@pytest.mark.parametrize("script", ["train.sbatch", "train_multinode.sbatch"])
@pytest.mark.parametrize("flags, preset, seed", [
    ([], None, "2"),
    (["--seed", "10"], None, "12"),
    (["--config", "PRESET"], "seed: 5\nrun_name: best\n", "7"),  # a recorded config.yaml holds both
    (["--seed=10", "--config=PRESET"], "seed: 5\n", "12"),  # the flag wins over the preset, as in train.py
    (["--config", "PRESET"], "epochs: 3\n", "2"),
])
def test_each_task_of_a_job_array_trains_a_run_of_its_own_with_a_seed_of_its_own(tmp_path, script, flags, preset,
                                                                                   seed):
    """`sbatch --array=0-2 slurm/train.sbatch ...` trained three runs with the same seed, the usual "three seeds"
    by hand: task N now trains runs/slurm-<array job>_N with the seed the flags give plus N."""
    if preset:
        (tmp_path / "preset.yaml").write_text(preset)
    flags = [flag.replace("PRESET", str(tmp_path / "preset.yaml")) for flag in flags]
    train_flags = launched_train_flags(script, flags, tmp_path, **ARRAY_TASK)
    assert as_train_py_takes_it(train_flags, "--run-name") == "slurm-7_2", train_flags
    assert as_train_py_takes_it(train_flags, "--seed") == seed, train_flags


def test_an_array_task_resubmitted_alone_goes_on_with_its_run_and_seed(tmp_path):
    """What a stopped task's log says to do (resubmit it alone, `sbatch --array=2 ...`, with its run's name):
    the run it began, with the seed it began with (a resume with another seed is refused)."""
    flags = ["--resume", "auto", "--run-name", "slurm-7_2"]
    train_flags = launched_train_flags("train.sbatch", flags, tmp_path, **{**ARRAY_TASK, "SLURM_ARRAY_TASK_COUNT": "1",
                                                                          "SLURM_ARRAY_JOB_ID": "12"})
    assert as_train_py_takes_it(train_flags, "--run-name") == "slurm-7_2", train_flags
    assert as_train_py_takes_it(train_flags, "--seed") == "2", train_flags


@pytest.mark.parametrize("script", ["train.sbatch", "train_multinode.sbatch"])
@pytest.mark.parametrize("flags", [["--run-name", "mine"], ["--resume", "runs/X/state/step-00000010"]])
def test_an_array_whose_tasks_would_all_train_one_run_is_refused_in_one_line(tmp_path, script, flags):
    (tmp_path / "out").mkdir()
    done = run_with_stand_ins(["bash", str(SLURM_DIR / script), *flags], tmp_path, tmp_path,
                              accelerate=RECORDING_ACCELERATE, bin_srun=RECORDING_ACCELERATE,
                              bin_scontrol="#!/bin/sh\necho node1\n", SLURM_JOB_NUM_NODES="1",
                              SLURM_JOB_NODELIST="node1", MONKEYTRAIN_ROOT=str(PROJECT), MONKEYTRAIN_CPU="1",
                              **ARRAY_TASK)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "every task of job array 7" in done.stderr and "--array=N" in done.stderr, done.stderr
    assert not (tmp_path / "out" / "args").exists()  # nothing started


def test_a_stopped_array_task_says_to_resubmit_it_alone():
    """Resubmitted as a job of its own, a task's run would start with seed 0, not its task's, and be refused."""
    from monkeytrain.preemption import resubmit

    assert resubmit("--resume auto --run-name slurm-7_2", environ={"SLURM_ARRAY_TASK_ID": "2"}) == (
        "to continue, resubmit this task alone (sbatch --array=2 ...) with --resume auto --run-name slurm-7_2.")
    assert resubmit("--resume auto --run-name slurm-9", environ={}) == (
        "to continue, resubmit the job with --resume auto --run-name slurm-9.")


@pytest.mark.parametrize("flags", [["--resume", "my runs/X/state/step-00000010"],
                                   ["--resume=my runs/X/state/step-00000010", "--epochs", "5"]])
def test_a_requeued_job_that_began_from_a_given_state_goes_on_from_its_newest_one(tmp_path, flags):
    _, args = launch_recorded(["bash", str(SLURM_DIR / "train.sbatch"), *flags], tmp_path, SLURM_JOB_ID="7",
                              SLURM_RESTART_COUNT="1", MONKEYTRAIN_ROOT=str(PROJECT), MONKEYTRAIN_CPU="1")
    # the same flags again would go back to step 10; the last --resume is the one train.py takes
    assert args[-6:] == ["--resume", "auto", "--output-dir", "my runs", "--run-name", "X"], args


@pytest.mark.parametrize("given", ["my runs/X", "my runs/X/state/"])
def test_a_requeued_job_that_began_from_a_run_folder_gives_it_again(tmp_path, given):
    """train.py takes a run's folder as its newest state, at every start: read as RUN/state/step-N, the folder
    would have made the requeued job train in `--output-dir . --run-name .` from scratch."""
    _, args = launch_recorded(["bash", str(SLURM_DIR / "train.sbatch"), "--resume", given], tmp_path,
                              SLURM_JOB_ID="7", SLURM_RESTART_COUNT="1", MONKEYTRAIN_ROOT=str(PROJECT),
                              MONKEYTRAIN_CPU="1")
    assert args[-2:] == ["--resume", given] and "--run-name" not in args, args


FOUR_GPUS = '#!/bin/sh\nfor i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done\n'
NO_DRIVER = '#!/bin/sh\necho "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."\nexit 9\n'


@pytest.mark.parametrize("script, settings, processes", [
    ("launch/all_gpus.sh", dict(bin_nvidia_smi=FOUR_GPUS), "4"),
    ("launch/all_gpus.sh", dict(bin_nvidia_smi=FOUR_GPUS, CUDA_VISIBLE_DEVICES="2,3"), "2"),  # not all four
    ("slurm/launch_node.sh", dict(MONKEYTRAIN_CPU="1", MONKEYTRAIN_PROCS_PER_NODE="08"), "8"),  # not octal
    ("slurm/launch_node.sh", dict(MONKEYTRAIN_CPU="1", TMPDIR="/nonexistent/tmp"), "2"),  # pid file in /tmp
    # distributed_type NO: Accelerate starts one process whatever --num_processes says
    ("slurm/launch_node.sh", dict(MONKEYTRAIN_ACCELERATE_CONFIG="accelerate_configs/cpu.yaml"), "1"),
    ("slurm/launch_node.sh", dict(bin_nvidia_smi=FOUR_GPUS,
                                  MONKEYTRAIN_ACCELERATE_CONFIG="accelerate_configs/single_gpu.yaml"), "1"),
])
def test_launch_node_starts_as_many_processes_as_it_should(tmp_path, script, settings, processes):
    _, args = launch_recorded([str(PROJECT / script)], tmp_path, **settings)
    assert args[args.index("--num_processes") + 1] == processes, args
    # one process: --quiet, so that a bad flag ends in train.py's one line, without Accelerate's traceback
    assert ("--quiet" in args) == (processes == "1"), args


def test_a_gpu_launch_without_a_gpu_says_so_instead_of_training_on_the_cpu(tmp_path):
    done = run_with_stand_ins([str(PROJECT / "launch" / "single_gpu.sh")], tmp_path, tmp_path,
                              accelerate="#!/bin/sh\necho started >&2\n", bin_nvidia_smi=NO_DRIVER)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "no GPU found" in done.stderr and "MONKEYTRAIN_CPU=1" in done.stderr
    assert "or use launch/cpu_ddp.sh or launch/cpu_debug.sh here." in done.stderr  # what a launch/ user runs


def test_a_slurm_job_without_a_gpu_says_how_to_submit_it_again(tmp_path):
    """`sbatch --gres=none slurm/train.sbatch` (a CPU partition) without MONKEYTRAIN_CPU: the log said to set it
    or run launch/cpu_ddp.sh "here", in a job that had already ended."""
    done = run_with_stand_ins(["bash", str(SLURM_DIR / "train.sbatch")], tmp_path, tmp_path,
                              accelerate="#!/bin/sh\necho started >&2\n", bin_nvidia_smi=NO_DRIVER, SLURM_JOB_ID="7",
                              MONKEYTRAIN_ROOT=str(PROJECT))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "no GPU found" in done.stderr and "for job 7" in done.stderr, done.stderr
    assert "MONKEYTRAIN_CPU=1 sbatch --gres=none" in done.stderr and "launch/" not in done.stderr, done.stderr


@pytest.mark.parametrize("cores, asked", [("6", ["--cpus-per-task=6"]), (None, [])])
def test_multinode_launchers_get_the_cores_the_job_asked_for(tmp_path, cores, asked):
    """Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: the launchers' step must ask
    for it, or each node's ranks and DataLoader workers share one core where tasks are pinned."""
    (tmp_path / "out").mkdir()
    recording_srun = '#!/bin/sh\nprintf "%s\\n" "$@" > "$STUB_OUTPUT/srun"\n'
    settings = dict(SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[1-2]",
                    MONKEYTRAIN_ROOT=str(PROJECT), **({"SLURM_CPUS_PER_TASK": cores} if cores else {}))
    done = run_with_stand_ins(["bash", str(SLURM_DIR / "train_multinode.sbatch")], tmp_path, tmp_path,
                              bin_srun=recording_srun, bin_scontrol="#!/bin/sh\necho node1\n", **settings)
    assert done.returncode == 0, done.stderr
    srun_args = (tmp_path / "out" / "srun").read_text().splitlines()
    step_options = srun_args[:srun_args.index("bash")]
    assert [a for a in step_options if a.startswith("--cpus-per-task")] == asked, srun_args


@pytest.mark.parametrize("nodes, said", [("1", "1 machine,"), ("2", "2 machines,")])
def test_the_multinode_log_counts_its_machines_in_words(tmp_path, nodes, said):
    done = run_with_stand_ins(["bash", str(SLURM_DIR / "train_multinode.sbatch")], tmp_path, tmp_path,
                              bin_srun="#!/bin/sh\n", bin_scontrol="#!/bin/sh\necho node1\n", SLURM_JOB_ID="7",
                              SLURM_JOB_NUM_NODES=nodes, SLURM_JOB_NODELIST="node[1-2]", MONKEYTRAIN_ROOT=str(PROJECT))
    assert done.returncode == 0, done.stderr
    assert f"restart 0: {said} rendezvous node1:" in done.stdout.splitlines()[0], done.stdout

def test_tune_sbatch_without_an_environment_says_which_python_it_runs(tmp_path):
    """No virtual environment active and no .venv in the checkout: the log names the python tried,
    before that python's own complaint (a system python: "tune needs Optuna")."""
    checkout = tmp_path / "checkout"
    (checkout / "monkeytrain").mkdir(parents=True)
    (checkout / "monkeytrain" / "tune.py").touch()
    (checkout / "slurm").mkdir()
    (checkout / "slurm" / "requeue.sh").write_text((SLURM_DIR / "requeue.sh").read_text())
    python = '#!/bin/sh\necho "monkeytrain: error: tune needs Optuna" >&2\nexit 2\n'
    done = run_with_stand_ins(["bash", str(SLURM_DIR / "tune.sbatch")], tmp_path, tmp_path, bin_python=python,
                              SLURM_JOB_ID="7", MONKEYTRAIN_ROOT=str(checkout), VIRTUAL_ENV="", CONDA_PREFIX="")
    assert done.returncode == 2
    first, last = done.stderr.strip().splitlines()
    assert "no virtual environment was active" in first and f"trying {tmp_path / 'bin' / 'python'}" in first
    assert last == "monkeytrain: error: tune needs Optuna"


def test_sbatch_script_outside_a_checkout_says_so(tmp_path):
    unknown_job = '#!/bin/sh\necho "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1\n'
    done = run_with_stand_ins(["bash", str(SLURM_DIR / "train.sbatch")], tmp_path, tmp_path, bin_scontrol=unknown_job,
                              SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(tmp_path))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "not a monkeytrain checkout" in done.stderr


@pytest.mark.parametrize("script", ["train.sbatch", "train_multinode.sbatch", "tune.sbatch"])
def test_sbatch_from_another_folder_finds_the_checkout_of_the_script_it_was_given(tmp_path, script):
    """`sbatch ~/monkeytrain/slurm/train.sbatch ...` run from a project folder: SLURM runs a copy of the
    file, but `scontrol show job` keeps the path given (followed by the arguments), and the checkout is
    found from it; here through a path with a space, which every script must quote. Shown as for an
    array's last task, whose id is the array's: every task's record, one after the other."""
    checkout = tmp_path / "check out"
    checkout.symlink_to(PROJECT)
    work = tmp_path / "my work"
    work.mkdir()
    (tmp_path / "out").mkdir()
    shown = "\n".join(f"JobId={job} ArrayJobId=7\n   Command={checkout}/slurm/{script} --data my data\n"
                      f"   WorkDir={work}" for job in (7, 8))
    scontrol = f'#!/bin/sh\nif [ "$2" = hostnames ]; then echo node1; else printf "%s\\n" "{shown}"; fi\n'
    recording = '#!/bin/sh\necho "$PYTHONPATH" "$@" >> "$STUB_OUTPUT/started"\n'  # the launcher, srun or python
    done = run_with_stand_ins(["bash", str(SLURM_DIR / script), "--data", "my data"], tmp_path, work,
                              bin_scontrol=scontrol, accelerate=recording, bin_srun=recording, bin_python=recording,
                              SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(work), SLURM_JOB_NUM_NODES="1",
                              SLURM_JOB_NODELIST="node1", MONKEYTRAIN_CPU="1")
    assert done.returncode == 0, done.stderr
    assert str(checkout) in (tmp_path / "out" / "started").read_text()

def test_train_sbatch_on_several_nodes_says_to_use_the_multinode_script(tmp_path):
    """`sbatch --nodes=2 slurm/train.sbatch`: it would train on the first node and leave the other idle."""
    done = run_with_stand_ins(["bash", str(SLURM_DIR / "train.sbatch")], tmp_path, tmp_path,
                              accelerate="#!/bin/sh\necho started >&2\n", SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2",
                              MONKEYTRAIN_ROOT=str(PROJECT), MONKEYTRAIN_CPU="1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "2 nodes" in done.stderr and "slurm/train_multinode.sbatch" in done.stderr

@pytest.mark.parametrize("script", ["train.sbatch", "train_multinode.sbatch", "tune.sbatch"])
@pytest.mark.parametrize("wandb_user, mode", [
    ({"WANDB_API_KEY": "k"}, "offline"), ({"NETRC": "netrc"}, "offline"), ({}, "unset"),
    ({"WANDB_API_KEY": "k", "WANDB_MODE": "online"}, "online"),
])
def test_sbatch_keeps_wandb_offline_for_its_users_and_off_for_everyone_else(tmp_path, script, wandb_user, mode):
    """Compute nodes are often offline: a W&B user's runs stay local instead of waiting 90 s for the network.
    Without an account, --report-to auto means local files only; WANDB_MODE=offline would start W&B."""
    (tmp_path / "out").mkdir()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")  # `wandb login`'s
    wandb_user = {k: str(tmp_path / v) if k == "NETRC" else v for k, v in wandb_user.items()}
    recording = '#!/bin/sh\necho "${WANDB_MODE-unset}" > "$STUB_OUTPUT/wandb_mode"\n'  # the launcher, srun or python
    done = run_with_stand_ins(["bash", str(SLURM_DIR / script)], tmp_path, tmp_path, accelerate=recording,
                              bin_srun=recording, bin_python=recording, bin_scontrol="#!/bin/sh\necho node1\n",
                              SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node1",
                              MONKEYTRAIN_ROOT=str(PROJECT), MONKEYTRAIN_CPU="1", **wandb_user)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "wandb_mode").read_text().strip() == mode

def test_local_cluster_rejects_an_unknown_command():
    done = subprocess.run([str(CLUSTER), "restart"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "usage: slurm/local_cluster.sh start|stop|status" in done.stderr


# --- the requeued job's end (after every other test of the session) ----------------

@pytest.mark.last
def test_warning_signal_makes_the_job_save_requeue_itself_resume_and_finish_every_epoch_once(requeued_job):
    """SIGUSR1 after the first epoch: the ranks save and stop, and the job requeues itself; held by
    Slurm for about two minutes, it resumes and completes with one restart, every epoch logged exactly
    once across the restart."""
    requeued_job.requeued.result(timeout=480)
    text = read_log(requeued_job.log)
    assert f"train_multinode.sbatch: scontrol requeue {requeued_job.job}: ok" in text, text[-4000:]
    assert "launch_node.sh: machine 0: scontrol requeue" not in text, text[-4000:]  # the batch shell's alone
    state = wait_for_job(requeued_job.job, timeout=480)
    text = read_log(requeued_job.log)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-4000:]
    assert "resumed from" in text
    assert "Traceback" not in text, text[-4000:]  # the requeue came once the launcher had ended
    metrics = (requeued_job.run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == list(range(1, requeued_job.epochs + 1))
    assert json.loads((requeued_job.run_dir / "results.json").read_text())["world_size"] == 2
