"""Stopping cleanly, whoever sends the signal, and saving on a wall-clock schedule.

SIGUSR1 (SLURM's warning before a time limit or preemption), SIGTERM
(`timeout`, systemd, Docker, Kubernetes, SLURM at a time limit) and SIGINT
(Ctrl-C) only set a flag; the ranks agree on it at a step boundary (a
collective, so none is left waiting), all of them save, and the job requeues
itself under SLURM if SLURM's warning (SIGUSR1) alone stopped it, or exits:
SIGTERM is scancel, or SLURM's own preemption or time limit, after which SLURM
requeues by itself where so configured. A second Ctrl-C stops at once, unsaved.

Some launchers do not pass a signal on: accelerate's one-process launcher
(up to 1.15) dies of a SIGTERM and leaves its child running, and no launcher
can pass on its own SIGKILL. So a process started by a launcher asks Linux to
send it SIGTERM when its parent dies (PR_SET_PDEATHSIG): it then saves and
stops instead of training on as an orphan. A launcher that reads our console
through a pipe (accelerate's one-process launcher from 1.16 reads stderr)
leaves that pipe without a reader when it dies: the console then goes to
/dev/null (`ConsoleStream`) rather than fail the save with BrokenPipeError.
The same launcher sends SIGTERM itself and kills what has not ended 5 s later,
so on the CPU, where a step can take a second, the stop is checked every step.
DataLoader workers ignore these signals (`ignore_stop_signals`), so a signal
to a whole process group reaches the trainer, which shuts its workers down
itself, instead of killing them under it.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from monkeytrain.config import TrainConfig
from monkeytrain.distributed import a_run_of_tune, sum_across_ranks
from monkeytrain.statestore import run_of

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
# On a GPU, ranks compare their stop flags every this many optimizer steps (a collective: checking
# every step would cost a device sync each step, and 8 steps take milliseconds there).
GPU_STOP_CHECK_INTERVAL = 8
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Set by `accelerate launch` (every launcher form) and by torchrun in the processes they start.
LAUNCHER_MARKERS = ("ACCELERATE_MIXED_PRECISION", "TORCHELASTIC_RUN_ID")
# A process that a launcher started gets one Ctrl-C up to three times within milliseconds where the signal
# goes to every process of a job step (srun's Ctrl-C): from Slurm, from the launcher (torch's elastic agent
# passes on what it gets), from slurm/launch_node.sh. Only a SIGINT this long after the first is a second
# Ctrl-C, which stops at once, unsaved: sooner, the same one would lose the save it asked for.
SAME_CTRL_C_SECONDS = 1.0
REQUEUE_REQUEST = "MONKEYTRAIN_REQUEUE_FILE"  # set by the SLURM scripts (slurm/requeue.sh)


class Preemption:
    """Remembers a stop signal, and when a save is due, until the ranks next agree."""

    def __init__(self, save_every_minutes: float = 0.0, environ: Mapping[str, str] = os.environ,
                 clock: Callable[[], float] = time.monotonic, rerun_continues: Optional[bool] = None) -> None:
        self.received: Optional[str] = None
        # Whether a requeued job, which runs the same command again, goes on with this run (see
        # rerun_continues); not told, only the SLURM scripts' runs are known to.
        self.rerun_continues = bool(environ.get(REQUEUE_REQUEST)) if rerun_continues is None else rerun_continues
        self.heard: set[str] = set()  # every stop signal received, for wants_requeue
        self.schedule = SaveSchedule(save_every_minutes)
        self.clock, self.first_ctrl_c = clock, None
        launched = launched_by_a_launcher(environ)
        # Only a launcher's process gets a Ctrl-C more than once (SAME_CTRL_C_SECONDS says why).
        self.same_ctrl_c_seconds = SAME_CTRL_C_SECONDS if launched else 0.0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)
        if launched:
            sys.stdout, sys.stderr = ConsoleStream.around(sys.stdout), ConsoleStream.around(sys.stderr)
            if not stop_when_parent_dies():
                self.received = "launcher gone"  # it died before we could ask to be told

    def _note(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            if self.clock() - self.first_ctrl_c < self.same_ctrl_c_seconds:
                return  # the same Ctrl-C, passed on by another process of the launch
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        if signum == signal.SIGINT and self.first_ctrl_c is None:
            self.first_ctrl_c = self.clock()
        if self.received is None:
            acknowledge(signal.Signals(signum).name)
        self.received = signal.Signals(signum).name
        self.heard.add(self.received)

    def wants_requeue(self) -> bool:
        """True when SLURM's warning before a time limit (SIGUSR1) is the only stop signal received: a
        SIGTERM or Ctrl-C, before or after it, means the job is to end (scancel, a preemption)."""
        return self.heard == {"SIGUSR1"}

    def check(self, accelerator) -> tuple[bool, bool]:
        """(stop, save), the same on every rank: stop when any rank received a signal, save when
        any rank's clock says a scheduled save is due. Every rank calls this at the same step."""
        votes = sum_across_ranks(torch.tensor([self.received is not None, self.schedule.due()],
                                              dtype=torch.int64, device=accelerator.device))
        stop, save = (int(v) > 0 for v in votes.tolist())
        return stop, save


def acknowledge(name: str) -> None:
    """Say at once that a stop signal was heard, as the stop itself may wait for the data to be read or an
    evaluation to end. One line, from each node's first process; written with os.write, which a signal
    handler may call while Python's own stream is in the middle of a write."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    again = " (Ctrl-C again stops at once, unsaved)" if name == "SIGINT" else ""
    try:
        os.write(2, f"monkeytrain: {name} received: the run saves its state and stops as soon as it can{again}.\n"
                 .encode())
    except OSError:  # no reader left: the stop goes on all the same
        pass


def stop_check_interval(device: torch.device) -> int:
    """Optimizer steps between the ranks' stop checks: every step on the CPU, where a check costs no
    device sync and a step can take a second (a launcher may kill what has not stopped 5 s after its
    SIGTERM), every GPU_STOP_CHECK_INTERVAL steps elsewhere."""
    return 1 if device.type == "cpu" else GPU_STOP_CHECK_INTERVAL


class ConsoleStream:
    """stdout or stderr, going on when its reader has gone: the first write or flush that finds the
    pipe without a reader (BrokenPipeError) points the stream's file at /dev/null, for Python's writes
    and the C libraries' alike, instead of ending the run before it saves. Everything but writing and
    flushing is the stream's own."""

    def __init__(self, stream):
        self.stream = stream

    @classmethod
    def around(cls, stream):
        return stream if stream is None or isinstance(stream, cls) else cls(stream)

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.reader_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.reader_gone()

    def reader_gone(self) -> None:
        nowhere = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(nowhere, self.stream.fileno())
        finally:
            os.close(nowhere)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def launched_by_a_launcher(environ: Mapping[str, str]) -> bool:
    """True in a process that `accelerate launch` or torchrun started (not one a shell started:
    a run under nohup must go on when its shell exits)."""
    return any(marker in environ for marker in LAUNCHER_MARKERS)


def stop_when_parent_dies() -> bool:
    """Ask Linux for SIGTERM when the parent process dies; False if the parent is already gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() != 1  # re-parented to init: the launcher died before the call above


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: leave stop signals to the trainer, which ends its workers itself."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class SaveSchedule:
    """Says when `minutes` of wall time have passed since the last save (never with 0).

    Time-based, not step-based, so the work a crash or a SIGKILL can cost is
    bounded whatever the model, batch or machine."""

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock = minutes * 60, clock
        self.last = clock()

    def due(self) -> bool:
        return self.seconds > 0 and self.clock() - self.last >= self.seconds

    def saved(self) -> None:
        self.last = self.clock()


def requeue_or_exit(log, accelerator, stop: Preemption, unsaved: Optional[str] = None) -> None:
    """Under SLURM, after its warning signal, have this job put back in the queue where the job's command,
    run again, continues this run (Preemption.rerun_continues); else just stop, saying how to continue the
    run (`log.run_dir`, the main process's run directory). The main process alone asks: one requeue per
    job. `unsaved`: how a stop that saved no state came (nothing_trained_since); None after a save."""
    if not accelerator.is_main_process:
        return
    if a_run_of_tune():  # its worker stops next, and asks for any requeue itself (tune_stops.stopped): once a job
        log.info(f"stopped on {stop.received or 'a signal'} {unsaved or 'after saving the training state'}; "
                 "monkeytrain tune stops too, and says how its study goes on.")
        return
    flags = resume_flags(log.run_dir)
    job = os.environ.get("SLURM_JOB_ID")
    if job and stop.wants_requeue():
        done = ask_for_requeue(job, flags) if stop.rerun_continues else not_requeued(flags)
        log.info(f"stopped on SIGUSR1 {unsaved or 'after saving'}; {done}")
        return
    if job and os.environ.get(REQUEUE_REQUEST):  # a job of our scripts, ended or requeued by Slurm (SIGTERM)
        log.info(f"stopped on a signal {unsaved or 'after saving the training state'}; a job that Slurm puts back "
                 f"in the queue (by hand or on preemption) goes on by itself; else, {resubmit(flags)}")
        return
    log.info(f"stopped on a signal {unsaved or 'after saving the training state'}; to continue, run the same "
             f"command with {flags}.")


def rerun_continues(config: TrainConfig, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the same command, run again (as a requeued SLURM job runs it), goes on with this run; asked of
    the flags as given, before the run is named. The SLURM scripts' runs do: they name the run, give --resume
    auto, and continue a given state from its newest (slurm/requeue.sh). Elsewhere --resume auto with
    --run-name does, and --resume with the run's folder (its newest state, each time): without --resume the run
    would start over, without a name a new run (named after the time) would start, and --resume with a state's
    path would go back to that state, every time limit. So --resume is read as given (TrainConfig.given), not as
    the state parse_config made of a run's folder. A run of monkeytrain tune does: its worker's command, run
    again, continues the study."""
    if a_run_of_tune(environ):
        return True
    resume = config.given.get("resume", config.resume)
    if not resume:
        return False
    if environ.get(REQUEUE_REQUEST):
        return True
    return bool(config.run_name) if resume == "auto" else run_of(Path(resume)) is not None


def not_requeued(flags: str) -> str:
    """Why a job warned of its time limit is not requeued, and how to continue, in words (rerun_continues)."""
    return (f"not requeued: a requeued job runs the same command, which continues this run only with --resume "
            f"auto and --run-name (as the slurm/ scripts give them) or --resume with the run's folder; "
            f"{resubmit(flags)}")


def nothing_trained_since(state: Optional[Path]) -> str:
    """How a run stopped before its first training step came, in words: nothing trained, so nothing saved;
    `state`, the state it resumed from (None: a new run), goes on as it was."""
    if state is None:
        return "before its first training step, so there was nothing to save"
    return f"before its first training step, nothing trained since {state}"


def stopped_exit_status(received: Optional[str], environ: Mapping[str, str] = os.environ) -> int:
    """The exit status of a run that the stop signal `received` ended: 128 + its number, as a shell
    reports a process that signal ended (143 for SIGTERM, 130 for Ctrl-C, 138 for SIGUSR1), so that `&&`,
    a retry loop, systemd or a Kubernetes Job does not take the unfinished run for finished. 0 in a
    process that a launcher started (accelerate launch, torchrun): it would take any other status for a
    crash (torchrun's ChildFailedError report), and exits as the signal says itself, as do launch/*.sh
    and the SLURM scripts (which requeue on the main process's request, whatever the status)."""
    if received not in {sig.name for sig in STOP_SIGNALS} or launched_by_a_launcher(environ):
        return 0
    return signal_exit_status(received)


def signal_exit_status(name: str) -> int:
    """128 + the number of the signal `name` (SIGTERM: 143), as a shell reports a process it ended."""
    return 128 + signal.Signals[name].value


def resume_flags(run_dir: Path) -> str:
    """The flags that continue the run in `run_dir`: without its name, --resume auto would start a new run
    named after the time."""
    flags = f"--resume auto --run-name {shlex.quote(run_dir.name)}"
    if run_dir.parent != Path(TrainConfig.output_dir):
        flags += f" --output-dir {shlex.quote(str(run_dir.parent))}"
    return flags


def ask_for_requeue(job: str, flags: str = "") -> str:
    """Have SLURM job `job` requeued; says how, in words. Started by the SLURM scripts, leave the request
    in the file they name: they requeue once every process they started has ended, because a requeue
    ends the job at once, and a launcher still running then dies with a traceback in the job's log.
    `flags` (resume_flags) go in the request's second line, for the script to say should the requeue fail."""
    request = os.environ.get(REQUEUE_REQUEST)
    if not request:
        return requeue(job, flags)
    try:
        Path(request).write_text(f"{job}\n{flags}\n")
    except OSError as error:  # a TMPDIR gone, a full disk: the state is saved all the same
        return f"could not ask for a requeue in {request} ({error.strerror}); {resubmit(flags)}"
    return "asked the job script to requeue the job once its processes have ended."


def requeue(job: str, flags: str = "") -> str:
    """Put SLURM job `job` back in the queue; says how that went, in words, and how to continue if it failed."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except OSError as error:  # no scontrol here (a container inside the job)
        return f"could not run scontrol requeue {job} ({error.strerror}); {resubmit(flags)}"
    if done.returncode == 0:
        return f"scontrol requeue {job}: ok"
    answer = " ".join(done.stderr.split())  # one line
    return f"scontrol requeue {job} failed ({answer}); {resubmit(flags)}"


def resubmit(flags: str, environ: Mapping[str, str] = os.environ) -> str:
    """How to continue a stopped SLURM job by hand: a task of a job array alone, whose task id gives the run
    its seed again (slurm/requeue.sh, name_the_run), as the job script says should its requeue fail."""
    task = environ.get("SLURM_ARRAY_TASK_ID")
    job = f"this task alone (sbatch --array={task} ...)" if task else "the job"
    return f"to continue, resubmit {job}{' with ' + flags if flags else ''}."
