"""`monkeytrain tune`: a hyper-parameter search on Optuna, with any number of workers.

    monkeytrain tune --space slurm/tune_space.yaml --study-dir runs/tune --trials 20 [--workers 2]
                     [--timeout-minutes 60] [--pruner median|none|below:ACC] [train.py flags ...]

Every trial is a real training run (train.main: the same Trainer, signals and tracking) in its own run
directory DIR/trials/trial-NNNN, with the space's values as flags on top of the fixed train.py flags.
It is scored on its best epoch's held-out validation figure that chose that epoch (--select-on: balanced
accuracy by default, or accuracy) and never sees the test split (--no-score-test); the pruner may end it after
any epoch, from that epoch's same figure. A study begun before --select-on existed goes on scoring on accuracy.

Workers share one study, DIR/study.journal: the processes of --workers K, the tasks of a SLURM array
(slurm/tune.sbatch), and any later `monkeytrain tune` on the same DIR, which continues the study up to
--trials. A trial counts once it completes, is pruned or fails on its own; one that was interrupted (a
stop signal, a requeue, a lost worker) is marked failed and does not count, so a re-run replaces it.

The worker that ends the last counted trial (or whose time budget is spent) with no trial running
anywhere claims the end of the study (DIR/finish.claim, created atomically, so exactly one does): it
writes trials.csv, search.png, best_config.yaml and summary.json, then trains the best config once more
in DIR/best_run and scores that run, once, on the test split.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from monkeytrain.errors import FlagParser, UserError, exits_cleanly_on_user_error
from monkeytrain.selection import BALANCED, PLAIN

STUDY_NAME = "monkeytrain"
STORAGE_NAME = "study.journal"
TRIALS_DIR = "trials"
CLAIM_NAME = "finish.claim"
BEST_RUN_NAME = "best_run"
TRIAL_LOG = "train.log"
RESULTS_NAME = "results.json"  # rundir.RESULTS_NAME; importing it would load torch for a one-line answer
WORKER_INDEX_ENV = "MONKEYTRAIN_TUNE_WORKER"  # set in the processes of --workers K
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)  # preemption.STOP_SIGNALS, without its torch import
# The median rule leaves a trial alone for its first epochs (too noisy to judge) and until a few
# trials have completed (nothing to compare with).
MEDIAN_FROM_EPOCH = 3
MEDIAN_AFTER_TRIALS = 3
# Flags that say where and how fast trials run, not what they train: a study may continue with others.
RUNTIME_FIELDS = {"cpu_threads", "num_workers", "cache_dir", "report_to", "log_checkpoint", "data_pipeline",
                  "compile", "save_every", "save_every_minutes", "keep_states"}
# tune names every trial's run directory itself and never lets a trial see the test split.
RESERVED_FIELDS = ("output_dir", "run_name", "resume", "score_test")


def build_parser() -> argparse.ArgumentParser:
    parser = FlagParser(
        prog="monkeytrain tune", allow_abbrev=False,  # no prefix may swallow a train.py flag
        description="Search hyper-parameters with Optuna. Flags not listed here are train.py flags "
                    "that every trial shares (--data, --epochs, --cpu, ...).")
    parser.add_argument("--space", type=Path, required=True, metavar="FILE.yaml",
                        help="search space YAML (see slurm/tune_space.yaml)")
    parser.add_argument("--study-dir", type=Path, required=True, metavar="DIR",
                        help="the study's folder; several workers, or a later run, share it")
    parser.add_argument("--trials", type=int, default=20, metavar="N",
                        help="trials the study holds in all (default: 20)")
    parser.add_argument("--timeout-minutes", type=float, metavar="M",
                        help="this worker starts no trial after this long")
    parser.add_argument("--workers", type=int, default=1, metavar="K",
                        help="worker processes on this machine: one GPU each, or the CPU cores shared")
    parser.add_argument("--pruner", type=pruner_rule, default="median", metavar="RULE",
                        help="median (default): stop a trial whose best validation score (--select-on) so far is "
                             f"below the median of completed trials at that epoch, from epoch {MEDIAN_FROM_EPOCH}, "
                             f"once {MEDIAN_AFTER_TRIALS} trials completed; below:ACC: as soon as it is below ACC "
                             "(e.g. below:0.2); none")
    parser.add_argument("--finish", action="store_true",
                        help="end the study now: write its files and train the best config")
    return parser


def pruner_rule(text: str) -> str:
    if text in ("median", "none"):
        return text
    try:
        floor = float(text.removeprefix("below:")) if text.startswith("below:") else None
    except ValueError:
        floor = None
    if floor is None or not 0 <= floor <= 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not median, none or below:ACC with ACC in [0, 1]")
    return text


@dataclass
class Setup:
    """What every trial of this worker shares."""

    study_dir: Path
    space: dict
    train_flags: list[str]
    trials: int
    deadline: float | None  # time.monotonic() after which no trial starts
    worker: str
    select_on: str = BALANCED  # what scores its trials: --select-on, as the study began with it

    @property
    def objective(self) -> str:
        return objective_words(self.select_on)


def objective_words(select_on: str) -> str:
    """What scores the trials of a study, in words: validation balanced accuracy, or validation accuracy."""
    return f"validation {select_on.replace('-', ' ')}"


@dataclass
class TrialEnd:
    state: object  # optuna.trial.TrialState
    value: float | None
    note: str
    interrupted: bool = False  # by a stop signal: the worker stops too


@exits_cleanly_on_user_error
def main(argv: list[str]) -> int:
    """The command; its exit status (2 for a UserError comes from the decorator)."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tune prints one line per trial itself
    args, train_flags = build_parser().parse_known_args(argv)
    if args.trials < 1 or args.workers < 1:
        raise UserError("--trials and --workers must be at least 1.")
    if args.timeout_minutes is not None and not args.timeout_minutes > 0:
        raise UserError(f"--timeout-minutes must be above 0, got {args.timeout_minutes:g}; leave it out for no "
                        "time limit.")
    if study_finished(args.study_dir):  # said before any checks or imports: there is nothing left to do
        say(f"{args.study_dir} is a finished study; its results: {args.study_dir / BEST_RUN_NAME}/results.json")
        return 0
    study, setup, config = open_search(args, train_flags)
    if args.workers > 1 and not args.finish:
        return run_workers(args.workers, argv, config)
    return work(study, setup, args.finish)


def require_optuna():
    try:
        import optuna
    except ImportError:
        raise UserError('monkeytrain tune needs Optuna, which is not installed; install it with '
                        'pip install -e ".[tune]".') from None
    return optuna


def open_search(args: argparse.Namespace, train_flags: list[str]):
    """Check everything a trial would trip over (space, flags, data, folder), then open the study."""
    from monkeytrain.config import parse_config
    from monkeytrain.storage import check_writable_dir
    from monkeytrain.tune_space import check_space_fits, load_space

    space = load_space(args.space)
    fixed = fixed_flags(train_flags, space)
    config = parse_config(train_flags)
    check_space_fits(space, config, args.space)
    check_data(config)
    check_writable_dir(args.study_dir, "--study-dir")
    study = open_study(args.study_dir, make_pruner(args.pruner))
    select_on = study_select_on(study, config.select_on, args.study_dir)  # before check_same_search keeps the space
    check_same_search(study, space, fixed, args.study_dir)
    if select_on != config.select_on:  # a study begun before --select-on: its trials go on as they began
        train_flags = [*train_flags, "--select-on", select_on]
    deadline = None if args.timeout_minutes is None else time.monotonic() + args.timeout_minutes * 60
    return study, Setup(args.study_dir, space, train_flags, args.trials, deadline, worker_name(), select_on), config


def study_select_on(study, select_on: str, study_dir: Path) -> str:
    """What scores the study's trials, kept in the study: one figure for all of them. A study that kept its
    space but no such figure began before --select-on existed and scored its trials on accuracy; so do its
    next ones, rather than rank balanced accuracies against plain ones. Kept before the space, so that a worker
    that sees a space kept by another sees this too (the journal is read in order)."""
    kept = study.user_attrs.get("select_on")
    if kept is None:
        kept = PLAIN if study.user_attrs.get("space") is not None else select_on
        study.set_user_attr("select_on", kept)
    if kept != select_on:
        say(f"{study_dir} began before --select-on existed and scores its trials on validation accuracy; "
            "its next trials are scored so too.")
    return kept


def fixed_flags(train_flags: list[str], space: dict) -> dict:
    """The train.py flags given (a --config preset's path among them), checked against the space."""
    given = given_flags(train_flags)
    for name in RESERVED_FIELDS:
        if name in given:
            raise UserError(f"--{name.replace('_', '-')} is set by monkeytrain tune itself (each trial's run "
                            "directory is under --study-dir, and no trial sees the test split); drop it.")
    clash = sorted(given.keys() & space.keys())
    if clash:
        raise UserError(f"--{clash[0].replace('_', '-')} is given as a flag and searched in the space; "
                        "drop one of them.")
    return {name: value for name, value in given.items() if name not in RUNTIME_FIELDS}


def given_flags(train_flags: list[str]) -> dict:
    """The train.py flags given, by field name (an old name must not dodge the checks; open_search's
    parse_config has warned about it)."""
    from monkeytrain.config import build_parser as train_parser, rename_old_names

    return rename_old_names(vars(train_parser().parse_args(train_flags)), say_so=False)


def machine_flags(train_flags: list[str]) -> list[str]:
    """The machine's flags the study was given, as flags or in its --config preset, which best_config.yaml
    leaves to whoever reuses it: the study's final run trains where and as its trials did (a --cpu study on
    a GPU machine)."""
    from monkeytrain.config import load_yaml_preset, rename_old_names
    from monkeytrain.tune_report import MACHINE_FIELDS
    from monkeytrain.tune_space import as_flags

    given = given_flags(train_flags)
    preset = rename_old_names(load_yaml_preset(Path(given["config"])), say_so=False) if given.get("config") else {}
    machine = {**preset, **given}
    return as_flags({name: machine[name] for name in MACHINE_FIELDS if name in machine})


def with_preset_values(fixed: dict) -> dict:
    """The fixed flags with a --config preset's values in place of its path (the flags given override
    them, as in train.py): a preset edited between two workers of a study changes its trials as much as
    another flag would."""
    from monkeytrain.config import load_yaml_preset

    if not fixed.get("config"):
        return fixed
    preset = {name: value for name, value in load_yaml_preset(Path(fixed["config"])).items()
              if name not in RUNTIME_FIELDS}
    return {**preset, **{name: value for name, value in fixed.items() if name != "config"}}


def check_data(config) -> None:
    """A wrong data path ends the command now, not every trial one after the other; so does a search
    whose trials would pick their best epochs on the test split."""
    from monkeytrain.data.dataset import find_split_folders, user_data_root

    root = user_data_root(config)
    if root is None and not (config.train_dir or config.val_dir or config.test_dir):
        return  # the built-in synthetic data set, which has a validation split
    if find_split_folders(config, root).selection is None and config.val_fraction == 0:
        raise UserError("--val-fraction 0 would score every trial on the test split, which a search must never "
                        "see; give it a fraction of the training images to hold out (default 0.1).")


def make_pruner(rule: str):
    import optuna

    if rule == "none":
        return optuna.pruners.NopPruner()
    if rule == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_AFTER_TRIALS, n_warmup_steps=MEDIAN_FROM_EPOCH)
    return optuna.pruners.ThresholdPruner(lower=float(rule.removeprefix("below:")))


def study_storage(study_dir: Path):
    """The study's Optuna storage: a journal file, not SQLite. SQLite relies on fcntl locks, which many
    NFS setups break, and a shared file system is where a SLURM array's tasks meet; the journal only
    appends to one file, under a lock taken by creating a symlink, which NFS does atomically."""
    from optuna.storages import JournalStorage

    from monkeytrain.tune_journal import WholeLineJournal

    study_dir.mkdir(parents=True, exist_ok=True)  # for the README's enqueueing before any worker starts
    return JournalStorage(WholeLineJournal(study_dir / STORAGE_NAME))


def open_study(study_dir: Path, pruner):
    import optuna

    # constant_liar: a trial still running counts as a poor result, so parallel workers spread out
    # instead of all sampling next to the same best point.
    try:
        return optuna.create_study(study_name=STUDY_NAME, storage=study_storage(study_dir), direction="maximize",
                                   sampler=optuna.samplers.TPESampler(constant_liar=True), pruner=pruner,
                                   load_if_exists=True)
    except (ValueError, OSError) as error:  # json's errors are ValueErrors; a folder in its place, OSError
        raise UserError(f"{study_dir / STORAGE_NAME} cannot be read as a study ({error.__class__.__name__}: "
                        f"{error}); move it away to start the study anew, or give another --study-dir.") from None


def check_same_search(study, space: dict, fixed: dict, study_dir: Path) -> None:
    """A study continues only with the space and fixed flags it began with: other trials would not compare."""
    from monkeytrain.tune_space import space_json

    values = with_preset_values(fixed)
    for key, value in (("space", space_json(space)), ("fixed_flags", json.dumps(values, sort_keys=True))):
        kept = study.user_attrs.get(key)
        if kept is None:
            study.set_user_attr(key, value)
        elif kept != value and (key == "space" or not same_fixed_flags(kept, values, fixed)):
            what = "another search space" if key == "space" else "other fixed train.py flags"
            raise UserError(f"{study_dir} holds a study begun with {what} ({kept}); continue it with the same, "
                            "or give a new --study-dir.")


def same_fixed_flags(kept: str, values: dict, fixed: dict) -> bool:
    """Whether a study's kept fixed flags are these, paths made absolute. A study begun before presets
    were read kept a preset's path among its flags, not its values: as `fixed` has it."""
    from monkeytrain.config import with_absolute_paths

    return with_absolute_paths(json.loads(kept)) in (with_absolute_paths(values), with_absolute_paths(fixed))


# --- one worker ---------------------------------------------------------------

def work(study, setup: Setup, finish_now: bool) -> int:
    """Run trials until the study has enough, then finish it if this worker is the last one."""
    if os.environ.get(WORKER_INDEX_ENV):
        from monkeytrain.preemption import stop_when_parent_dies

        stop_when_parent_dies()  # a process of --workers K stops when the command that started it is gone
    stops = StopSignals()
    fail_abandoned(study, setup.worker)
    say(f"worker {setup.worker} joins {setup.study_dir}: {progress(study, setup.trials)}")
    try:
        reason = "finish" if finish_now else run_trials(study, setup, stops)
        if reason in ("signal", "interrupted"):
            return stopped(reason, stops.received)
        if not finish_is_mine(study, setup, reason):
            return 0
        return finish_or_let_go(study, setup, stops)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        say("stopped at once; the trial in flight is marked failed, and a re-run continues the study.")
        return 130


def run_trials(study, setup: Setup, stops: StopSignals) -> str:
    """Trials until the study holds enough (running ones elsewhere included), the time is up or a signal
    came; returns which: trials, time, signal (between trials) or interrupted (a trial stopped)."""
    from optuna.trial import TrialState

    while True:
        if stops.received:
            return "signal"
        if len(counted(study.get_trials(deepcopy=False))) >= setup.trials:
            return "trials"
        if setup.deadline is not None and time.monotonic() >= setup.deadline:
            return "time"
        if (setup.study_dir / CLAIM_NAME).exists():  # another worker's time ran out: the study is ending
            return "trials"
        trial = study.ask(setup.space)
        trial.set_user_attr("worker", setup.worker)
        if is_surplus(study, trial, setup.trials):
            trial.set_user_attr("interrupted", "another worker had started the study's last trial")
            study.tell(trial, state=TrialState.FAIL)
            return "trials"
        try:
            ended = run_trial(trial, setup)
        except BaseException:  # a UserError or a second Ctrl-C ends the worker; the trial must not hang on
            # A disk full for the trial's files is full for the journal too: the first error is the one to say
            # (it names the file); a trial left running is failed by the next worker here (fail_abandoned).
            with suppress(OSError, UserError):
                study.tell(trial, state=TrialState.FAIL)
            raise
        finally:
            stops.listen()
        # skip_if_finished: a worker that took this one for lost (another host's, in the same SLURM job)
        # may have failed it meanwhile; that stands, rather than a traceback here
        study.tell(trial, ended.value, ended.state, skip_if_finished=True)
        say(f"trial {trial.number} ({describe(trial.params)}): {ended.note}")
        if ended.interrupted:
            return "interrupted"


def run_trial(trial, setup: Setup) -> TrialEnd:
    """One training run in DIR/trials/trial-NNNN, its console output in its train.log."""
    from monkeytrain.storage import write_atomically
    from monkeytrain.tune_space import as_flags

    run_dir = setup.study_dir / TRIALS_DIR / f"trial-{trial.number:04d}"
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [*setup.train_flags, *as_flags(trial.params), "--output-dir", str(run_dir.parent),
            "--run-name", run_dir.name, "--no-score-test"]
    started = time.monotonic()
    with open(run_dir / TRIAL_LOG, "a") as log, redirect_stdout(log), redirect_stderr(log):
        ended = train_trial(trial, argv, setup.objective)
    release_memory()
    ended.note += f" [{time.monotonic() - started:.1f} s]"
    write_atomically(run_dir / "trial.json", json.dumps(
        {"number": trial.number, "state": ended.state.name, "value": ended.value, "params": trial.params,
         "note": ended.note, "worker": setup.worker}, indent=2).encode(), flag="--study-dir")
    return ended


def train_trial(trial, argv: list[str], objective: str = objective_words(BALANCED)) -> TrialEnd:
    import optuna
    from optuna.trial import TrialState

    from monkeytrain.train import main as train_main
    from monkeytrain.trainer import Diverged

    try:
        # The undecorated entry point: a UserError must reach tune (it stops the study, in one line)
        # instead of exiting this process from inside a trial.
        results = train_main.__wrapped__(argv, on_epoch=pruning_hook(trial, objective))
    except optuna.TrialPruned as pruned:
        return TrialEnd(TrialState.PRUNED, None, f"pruned: {pruned}")
    except Diverged as diverged:  # these values break training: a failed trial, like any search's
        trial.set_user_attr("error", diverged.what[:300])
        return TrialEnd(TrialState.FAIL, None, f"failed: {trial.user_attrs['error']}")
    except UserError as error:  # what to do, in tune's flags: it sets the trials' --output-dir itself
        error.args = (str(error).replace("--output-dir", "--study-dir"),)
        raise
    except Exception as error:  # this trial's own failure (out of memory, say): the study goes on
        traceback.print_exc()  # into the trial's train.log
        trial.set_user_attr("error", f"{error.__class__.__name__}: {error}"[:300])
        return TrialEnd(TrialState.FAIL, None, f"failed ({trial.user_attrs['error']}); see its {TRIAL_LOG}")
    if results.get("stopped"):
        trial.set_user_attr("interrupted", "a stop signal")
        return TrialEnd(TrialState.FAIL, None, "interrupted by a stop signal; it does not count", interrupted=True)
    value = best_val_score(results)
    return TrialEnd(TrialState.COMPLETE, value, f"{objective} {value:.2%} (best epoch {results['best_epoch']})")


def best_val_score(results: dict) -> float:
    """The figure of a run's best epoch that chose it (results.json's selected_on)."""
    chosen_on_balanced = results["selected_on"] == BALANCED
    return results["best_val_balanced_accuracy" if chosen_on_balanced else "best_val_accuracy"]


def pruning_hook(trial, objective: str) -> Callable[[int, float], None]:
    """The Trainer's on_epoch: report each epoch's validation figure that chooses the best epoch (its
    `objective`, in words), and end the run when the pruner says so (optuna.TrialPruned, which train.main
    lets through)."""
    import optuna

    def on_epoch(epoch: int, val_score: float) -> None:
        trial.report(val_score, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{objective} {val_score:.2%} at epoch {epoch}")

    return on_epoch


def release_memory() -> None:
    """What one trial held, given back before the next starts in this process."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class StopSignals:
    """Stop signals that arrive between trials. While a trial runs, its Preemption holds the handlers;
    taking them back afterwards keeps what it noted, so a signal in a trial's last moments is not lost."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.listen()

    def listen(self) -> None:
        for sig in STOP_SIGNALS:
            holder = getattr(signal.getsignal(sig), "__self__", None)  # a bound handler: who noted it
            self.received = self.received or getattr(holder, "received", None)
            signal.signal(sig, self.note)

    def note(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name


def stopped_finishing(reason: str, received: str | None, setup: Setup) -> int:
    """Stop, and let go of the study's end: whichever worker runs next takes it up (the best run resumes
    from its saved state), on any host, where a claim left behind could only be taken over here."""
    (setup.study_dir / CLAIM_NAME).unlink(missing_ok=True)
    return stopped(reason, received)


def stopped(reason: str, received: str | None) -> int:
    from monkeytrain.preemption import ask_for_requeue, signal_exit_status

    if reason == "signal" and received == "SIGUSR1" and os.environ.get("SLURM_JOB_ID"):
        # SLURM's warning before a time limit, as for a training run (preemption.requeue_or_exit); a stop
        # inside a trial asks for a requeue from train.py, between trials tune does, so that the task
        # comes back and goes on with the study. A SIGTERM (scancel) ends it.
        say(ask_for_requeue(os.environ["SLURM_JOB_ID"]))
    say(f"stopped on {received or 'a signal'}; the same command continues the study.")
    # as train.py outside a launcher: a stopped study is not a finished one to `&&`
    return signal_exit_status(received) if received else 1


# --- counting trials, and which worker ends the study -------------------------

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


def study_finished(study_dir: Path) -> bool:
    return (study_dir / BEST_RUN_NAME / RESULTS_NAME).is_file()


# --- the end of a study -------------------------------------------------------

def finish_or_let_go(study, setup: Setup, stops: StopSignals) -> int:
    """`finish`; should it fail (no trial completed, a full disk), the claim goes, so that the next worker to
    come, on any host, ends the study: a claim left behind is taken over only from a worker known to be gone."""
    try:
        return finish(study, setup, stops)
    except UserError:
        (setup.study_dir / CLAIM_NAME).unlink(missing_ok=True)
        raise


def finish(study, setup: Setup, stops: StopSignals) -> int:
    """The study's files from its trials, then the best config trained again and scored on test, once."""
    from optuna.trial import TrialState

    from monkeytrain import tune_report

    trials = study.get_trials(deepcopy=False)
    if not any(t.state == TrialState.COMPLETE for t in trials):  # more trials may come; they finish it
        raise UserError(f"no trial of {setup.study_dir} completed ({progress(study, setup.trials)}); widen the "
                        "space or relax --pruner, then run again with more --trials or --timeout-minutes.")
    best = study.best_trial
    files, importances = write_study_files(study, trials, best, setup)
    say(f"{len(trials)} trial{'s' * (len(trials) != 1)} ({state_counts(trials)}); best: trial {best.number}, "
        f"{setup.objective} {best.value:.2%} ({describe(best.params)})")
    say("wrote " + ", ".join(str(path) for path in files))
    if stops.received:
        return stopped_finishing("signal", stops.received, setup)
    results = train_best(setup, files[-1])
    stops.listen()
    if results.get("stopped"):
        return stopped_finishing("interrupted", stops.received, setup)
    tune_report.write_json(tune_report.study_summary(trials, best, importances, results, setup.select_on),
                           setup.study_dir / tune_report.SUMMARY_NAME)
    say(f"best config trained again in {setup.study_dir / BEST_RUN_NAME}: {setup.objective} "
        f"{best_val_score(results):.2%} (epoch {results['best_epoch']}); test accuracy "
        f"{results['test_accuracy']:.2%} on {results['test_images']} images, the study's one look at the "
        f"test split; {setup.study_dir / BEST_RUN_NAME}/results.json")
    return 0


def write_study_files(study, trials: list, best, setup: Setup) -> tuple[list[Path], dict]:
    """trials.csv, search.png and best_config.yaml (last), and the importances the picture shows."""
    from monkeytrain import tune_report

    directory = setup.study_dir
    tune_report.write_trials_csv(trials, directory / tune_report.TRIALS_NAME)
    importances, why_not = tune_report.param_importances(study)
    picture = tune_report.draw_search(trials, importances, why_not, directory / tune_report.SEARCH_NAME,
                                      setup.objective)
    best_config = tune_report.write_best_config(best, directory / TRIALS_DIR / f"trial-{best.number:04d}",
                                                sorted(setup.space), directory / tune_report.BEST_CONFIG_NAME,
                                                setup.objective)
    return [directory / tune_report.TRIALS_NAME, picture, best_config], importances


def train_best(setup: Setup, best_config: Path) -> dict:
    """The best config, trained once more with --config (proof that the file works) and scored on test."""
    from monkeytrain.train import main as train_main

    run_dir = setup.study_dir / BEST_RUN_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    say(f"training the best config once more, then scoring it on the test split; log: {run_dir / TRIAL_LOG}")
    argv = ["--config", str(best_config), *machine_flags(setup.train_flags), "--output-dir", str(setup.study_dir),
            "--run-name", BEST_RUN_NAME, "--resume", "auto"]
    with open(run_dir / TRIAL_LOG, "a") as log, redirect_stdout(log), redirect_stderr(log):
        return train_main.__wrapped__(argv)


def state_counts(trials: list) -> str:
    from optuna.trial import TrialState

    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    return ", ".join(f"{count} {name}" for name, count in counts.items() if count)


def describe(params: dict) -> str:
    return " ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
                    for name, value in params.items())


def say(message: str) -> None:
    print(f"tune: {message}", flush=True)


# --- several workers on this machine --------------------------------------------

def run_workers(count: int, argv: list[str], config) -> int:
    """--workers K: K copies of this command with --workers 1, one GPU each (in turn) or the CPU cores
    shared, in their own sessions so that a Ctrl-C reaches them once, through this process."""
    gpus = [] if config.cpu else visible_gpus()
    from monkeytrain.distributed import usable_cores

    threads = [] if gpus or config.cpu_threads else ["--cpu-threads", str(max(1, usable_cores() // count))]
    say(f"{count} workers on {'GPUs ' + ','.join(gpus) if gpus else 'the CPU'}; each trial's log is "
        f"its run directory's {TRIAL_LOG}")
    children = []
    for index in range(count):
        env = {**os.environ, WORKER_INDEX_ENV: str(index)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        children.append(subprocess.Popen([sys.executable, "-m", "monkeytrain.cli", "tune", *argv,
                                          "--workers", "1", *threads], env=env, start_new_session=True))

    def forward(signum, frame) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return next((code for code in codes if code), 0)


def visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return listed.split(",") if listed else [str(i) for i in range(torch.cuda.device_count())]
