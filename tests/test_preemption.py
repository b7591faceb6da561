"""monkeytrain.preemption: stop signals, the launcher's death, DataLoader workers, scheduled saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import RecordedLog, train_here
from monkeytrain.config import parse_config
from monkeytrain.distributed import TUNE_STUDY_VARIABLE
from monkeytrain.preemption import (GPU_STOP_CHECK_INTERVAL, REQUEUE_REQUEST, STOP_SIGNALS, ConsoleStream, Preemption,
                                    SaveSchedule, launched_by_a_launcher, nothing_trained_since, requeue_or_exit,
                                    rerun_continues, stop_check_interval, stopped_exit_status)
from monkeytrain.statestore import state_dirs

PROJECT = Path(__file__).resolve().parent.parent


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def preemption():
    """A Preemption with its handlers installed, and the default handlers put back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield Preemption(save_every_minutes=0.0, environ={})
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_save_schedule_is_due_after_its_minutes_and_restarts_on_a_save():
    clock = FakeClock()
    schedule = SaveSchedule(10, clock)
    clock.now = 599.0
    assert not schedule.due()
    clock.now = 600.0
    assert schedule.due()
    schedule.saved()
    clock.now = 1199.0
    assert not schedule.due()
    assert not SaveSchedule(0, clock).due()  # 0 turns the schedule off


@pytest.mark.parametrize("sig", STOP_SIGNALS)
def test_each_stop_signal_is_noted_agreed_and_told_at_once(preemption, cpu_accelerator, sig, capfd):
    assert preemption.check(cpu_accelerator) == (False, False)
    os.kill(os.getpid(), sig)
    assert preemption.received == signal.Signals(sig).name
    assert preemption.check(cpu_accelerator) == (True, False)
    if sig != signal.SIGINT:  # (a second Ctrl-C has a test of its own)
        os.kill(os.getpid(), sig)
    told = capfd.readouterr().err.splitlines()
    assert told == [f"monkeytrain: {signal.Signals(sig).name} received: the run saves its state and stops as soon "
                    "as it can" + (" (Ctrl-C again stops at once, unsaved)." if sig == signal.SIGINT else ".")]


def test_a_due_save_is_agreed_without_stopping(preemption, cpu_accelerator):
    clock = FakeClock()
    preemption.schedule = SaveSchedule(1, clock)
    clock.now = 61.0
    assert preemption.check(cpu_accelerator) == (False, True)


def test_a_second_ctrl_c_stops_at_once(preemption):
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_only_processes_a_launcher_started_watch_their_parent():
    assert launched_by_a_launcher({"ACCELERATE_MIXED_PRECISION": "no"})  # accelerate launch, any form
    assert launched_by_a_launcher({"TORCHELASTIC_RUN_ID": "none"})       # torchrun
    assert not launched_by_a_launcher({"PATH": "/usr/bin"})              # a shell, nohup: none


def test_the_stop_is_checked_every_step_on_the_cpu_and_every_few_on_a_gpu():
    import torch

    assert stop_check_interval(torch.device("cpu")) == 1  # a launcher may kill us 5 s after its SIGTERM
    assert stop_check_interval(torch.device("cuda")) == GPU_STOP_CHECK_INTERVAL > 1  # a check syncs the GPU


def test_a_console_whose_reader_has_gone_goes_to_dev_null_instead_of_failing():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the launcher that read it has died
    console = ConsoleStream(open(write_end, "w", buffering=1))
    try:
        with pytest.raises(BrokenPipeError):  # what an unwrapped stream raises: the test can fail
            console.stream.write("epoch 2: 40%\n")
        console.write("epoch 2: 60%\n")
        console.flush()
        print("stopped on a signal after saving", file=console, flush=True)
        assert os.readlink(f"/proc/self/fd/{write_end}") == os.devnull
        assert console.fileno() == write_end and console.isatty() is False  # the rest is the stream's own
    finally:
        console.stream.close()


def test_a_process_a_launcher_started_wraps_its_console_once(monkeypatch):
    monkeypatch.setattr("monkeytrain.preemption.stop_when_parent_dies", lambda: True)
    monkeypatch.setattr(sys, "stdout", sys.stdout)  # put back, unwrapped, after the test
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        Preemption(environ={"TORCHELASTIC_RUN_ID": "none"})
        Preemption(environ={"TORCHELASTIC_RUN_ID": "none"})
        assert isinstance(sys.stderr, ConsoleStream) and not isinstance(sys.stderr.stream, ConsoleStream)
        assert isinstance(sys.stdout, ConsoleStream)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_dataloader_workers_ignore_stop_signals():
    code = ("import os, signal, time; from monkeytrain.preemption import ignore_stop_signals; "
            "ignore_stop_signals(0); [os.kill(os.getpid(), s) for s in "
            "(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)]; time.sleep(0.2); print('alive')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert done.returncode == 0 and done.stdout.strip() == "alive", done.stderr


def test_a_run_saves_on_the_wall_clock_schedule_without_any_signal(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "data", classes=3, per_class=12)
    train_here(["--data", str(data), "--cpu", "--model", "resnet10t", "--image-size", "32", "--batch-size", "3",
                "--epochs", "2", "--report-to", "none", "--save-every-minutes", "0.0001", "--keep-states", "50",
                "--cache-dir", str(tmp_path / "cache"), "--cpu-threads", "1", "--run-name", "timed"], tmp_path)
    run_dir = tmp_path / "runs" / "timed"
    saved = [int(p.name.removeprefix("step-")) for p in state_dirs(run_dir)]
    # checked after every optimizer step on the CPU (and at each epoch end): always due here
    assert saved == list(range(1, 23)), saved
    assert json.loads((run_dir / "results.json").read_text())["test_images"] == 36


def run_log(run_dir: Path) -> RecordedLog:
    log = RecordedLog()
    log.run_dir = run_dir  # the main process's log knows its run directory
    return log


def stop_after(*names: str, rerun_continues: bool = True) -> SimpleNamespace:
    """What requeue_or_exit reads of a Preemption that received the signals `names`, in a job whose command,
    run again, continues the run or not (`rerun_continues`)."""
    return SimpleNamespace(received=names[-1] if names else None, rerun_continues=rerun_continues,
                           wants_requeue=lambda: Preemption.wants_requeue(SimpleNamespace(heard=set(names))))


@pytest.mark.parametrize("main", [True, False])
def test_under_launch_node_sh_a_stopped_job_asks_its_script_to_requeue_it(tmp_path, monkeypatch, main):
    """The main process leaves the request in the named file (launch_node.sh requeues once the launch
    has ended) and runs no scontrol itself; another rank asks nothing."""
    request = tmp_path / "job-machine0.requeue"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv(REQUEUE_REQUEST, str(request))
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("scontrol ran in the process"))
    log = run_log(Path("runs") / "slurm-4242")
    requeue_or_exit(log, SimpleNamespace(is_main_process=main), stop_after("SIGUSR1"))
    # the second line: what the script says should the requeue fail
    assert (request.read_text() == "4242\n--resume auto --run-name slurm-4242\n") if main else not request.exists()
    asked = "stopped on SIGUSR1 after saving; asked the job script to requeue the job once its processes have ended."
    assert log.infos == ([asked] if main else [])


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGUSR1", "SIGTERM"), ("SIGINT",), ()])
@pytest.mark.parametrize("requested", [True, False])
def test_a_job_told_to_end_is_not_requeued(tmp_path, monkeypatch, signals, requested):
    """scancel (SIGTERM), SLURM's own preemption or time limit (SIGTERM, even after the warning), Ctrl-C,
    a launcher gone: the state is saved and the job ends; only the warning SIGUSR1 alone requeues it."""
    request = tmp_path / "job.requeue"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if requested:
        monkeypatch.setenv(REQUEUE_REQUEST, str(request))
    else:
        monkeypatch.delenv(REQUEUE_REQUEST, raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("scontrol ran"))
    log = run_log(Path("runs") / "slurm-4242")
    requeue_or_exit(log, SimpleNamespace(is_main_process=True), stop_after(*signals))
    assert not request.exists()
    assert len(log.infos) == 1 and "requeue" not in log.infos[0] and "--resume auto" in log.infos[0]


@pytest.mark.parametrize("scripts", [True, False])
def test_a_job_ended_by_slurm_says_a_requeue_goes_on_by_itself_else_to_resubmit(tmp_path, monkeypatch, scripts):
    """SIGTERM comes from scancel and from `scontrol requeue` or a preemption alike: the job script's run
    cannot tell them apart, and "run the same command" would tell a requeued job's user to start it twice.
    Outside the scripts (an salloc shell), the command typed is the one to run again."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if scripts:
        monkeypatch.setenv(REQUEUE_REQUEST, str(tmp_path / "job.requeue"))
    else:
        monkeypatch.delenv(REQUEUE_REQUEST, raising=False)
    log = run_log(Path("runs") / "slurm-4242")
    requeue_or_exit(log, SimpleNamespace(is_main_process=True), stop_after("SIGTERM"))
    ending = ("a job that Slurm puts back in the queue (by hand or on preemption) goes on by itself; else, to "
              "continue, resubmit the job with" if scripts else "to continue, run the same command with")
    assert log.infos == [f"stopped on a signal after saving the training state; {ending} --resume auto --run-name "
                         "slurm-4242."]


@pytest.mark.parametrize("flags, scripts, continues", [
    ([], False, False),                                          # the same command starts the run over
    (["--resume", "auto"], False, False),                        # a new run, named after the time
    (["--run-name", "cut"], False, False),                       # refused: it holds a checkpoint, no --resume
    (["--resume", "runs/cut/state/step-9"], False, False),       # back to step 9, every time limit
    (["--resume", "auto", "--run-name", "cut"], False, True),
    ([], True, False),                                           # the scripts with MONKEYTRAIN_RESUME_FLAG=""
    (["--resume", "auto", "--run-name", "slurm-4242"], True, True),
    (["--resume", "runs/cut/state/step-9"], True, True),         # the scripts continue it from its newest state
])
def test_a_requeue_is_only_for_a_command_that_continues_its_run(flags, scripts, continues):
    environ = {REQUEUE_REQUEST: "/tmp/job.requeue"} if scripts else {}
    assert rerun_continues(parse_config(["--debug", *flags]), environ) is continues


def test_a_run_resumed_from_its_folder_is_one_that_its_command_continues(tmp_path):
    """`--resume runs/cut` resumes the run's newest state, every time the command runs, as --resume auto
    --run-name does; SIGUSR1 in a job of its own said "not requeued", deciding on the state parse_config had made
    of the folder, which is what an explicit step-N path gives: back to that state, every time limit."""
    state = tmp_path / "runs" / "cut" / "state" / "step-00000009"
    state.mkdir(parents=True)
    (state / "COMPLETE").write_text("")
    continues = {given: rerun_continues(parse_config(["--debug", "--resume", str(given)]), {})
                 for given in (state.parent.parent, state.parent, state)}
    assert continues == {state.parent.parent: True, state.parent: True, state: False}


def test_a_run_of_tune_is_one_that_its_command_continues():
    """A trial gets no --resume: tune's command, run again, continues the study (it asks for the requeue)."""
    assert rerun_continues(parse_config(["--debug"]), {TUNE_STUDY_VARIABLE: "runs/tune"}) is True


def test_a_job_of_its_own_is_not_requeued_to_start_its_run_over(monkeypatch, preemption):
    """A job script of the user's own (`#SBATCH --signal=B:USR1@120`, `python monkeytrain/train.py ...`),
    not told that its command continues the run: requeued, it would start training from scratch at every
    time limit. The line names the flags that continue it."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv(REQUEUE_REQUEST, raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: pytest.fail("scontrol ran"))
    os.kill(os.getpid(), signal.SIGUSR1)
    log = run_log(Path("/scratch") / "20261203-150000")
    requeue_or_exit(log, SimpleNamespace(is_main_process=True), preemption)
    assert log.infos == ["stopped on SIGUSR1 after saving; not requeued: a requeued job runs the same command, which "
                         "continues this run only with --resume auto and --run-name (as the slurm/ scripts give them) "
                         "or --resume with the run's folder; "
                         "to continue, resubmit the job with --resume auto --run-name 20261203-150000 --output-dir "
                         "/scratch."]


def test_the_signals_a_preemption_heard_decide_the_requeue(preemption):
    assert not preemption.wants_requeue()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert preemption.wants_requeue()
    os.kill(os.getpid(), signal.SIGTERM)  # SLURM's time limit or scancel after the warning: the job ends
    assert not preemption.wants_requeue() and preemption.received == "SIGTERM"


@pytest.mark.parametrize("run_dir, flags", [
    (Path("runs") / "20261127-093000", "--resume auto --run-name 20261127-093000"),
    (Path("/scratch/my runs") / "cut", "--resume auto --run-name cut --output-dir '/scratch/my runs'"),
])
def test_the_stop_line_names_the_run_to_continue(monkeypatch, run_dir, flags):
    """`--resume auto` alone would start a new run, named after the time: the line names this one."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    log = run_log(run_dir)
    requeue_or_exit(log, SimpleNamespace(is_main_process=True), stop_after("SIGTERM"))
    assert log.infos == ["stopped on a signal after saving the training state; to continue, run the same "
                         f"command with {flags}."]


@pytest.mark.parametrize("slurm", [False, True])
def test_the_stop_line_of_a_run_stopped_before_its_first_step_says_nothing_was_saved(tmp_path, monkeypatch, slurm):
    if slurm:
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv(REQUEUE_REQUEST, str(tmp_path / "job.requeue"))
    else:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    log = run_log(Path("runs") / "cut")
    requeue_or_exit(log, SimpleNamespace(is_main_process=True), stop_after("SIGUSR1"),
                    nothing_trained_since(None))
    [line] = log.infos
    assert line.startswith("stopped on SIGUSR1 before its first training step, so there was nothing to save; asked "
                           "the job script to requeue" if slurm else "stopped on a signal before its first training "
                           "step, so there was nothing to save; to continue, run the same command with --resume auto "
                           "--run-name cut")
    assert "after saving" not in line


@pytest.mark.parametrize("problem", ["no scontrol", "no request folder"])
def test_a_requeue_that_cannot_be_asked_for_is_one_line_and_the_run_ends(tmp_path, monkeypatch, problem):
    """SLURM_JOB_ID set inside a container without scontrol, or a request file in a folder that is gone:
    one line saying how to continue, no traceback (the state is saved before)."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol anywhere
    if problem == "no request folder":
        monkeypatch.setenv(REQUEUE_REQUEST, str(tmp_path / "gone" / "job.requeue"))
    else:
        monkeypatch.delenv(REQUEUE_REQUEST, raising=False)
    log = run_log(Path("runs") / "slurm-4242")
    requeue_or_exit(log, SimpleNamespace(is_main_process=True), stop_after("SIGUSR1"))
    assert len(log.infos) == 1 and log.infos[0].startswith("stopped on SIGUSR1 after saving; could not ")
    assert log.infos[0].endswith("No such file or directory); to continue, resubmit the job with --resume auto "
                                 "--run-name slurm-4242."), log.infos


@pytest.mark.parametrize("received, status", [("SIGTERM", 143), ("SIGINT", 130), ("SIGUSR1", 138)])
def test_a_stopped_run_exits_as_its_signal_says_so_that_nothing_takes_it_for_finished(received, status):
    """`python monkeytrain/train.py ... && next step`, a retry loop, systemd, a Kubernetes Job: exit 0 means done."""
    assert stopped_exit_status(received, environ={}) == status


@pytest.mark.parametrize("marker", ["ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID"])
def test_under_a_launcher_a_stopped_rank_exits_0_and_the_launcher_says_how_it_ended(marker):
    """torchrun would take any other status for a crash and print its ChildFailedError report."""
    assert stopped_exit_status("SIGTERM", environ={marker: "x"}) == 0
    assert stopped_exit_status("launcher gone", environ={marker: "x"}) == 0
