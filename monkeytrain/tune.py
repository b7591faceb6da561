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

This module is the command's wiring: its flags, the checks before the study opens, and one worker (trials,
then perhaps the end of the study) or K of them on this machine. The parts: tune_study (the shared study),
tune_flags (the train.py flags given), tune_trial (a trial), tune_workers (the workers of one study),
tune_stops (stop signals), tune_finish (the end of a study), tune_space, tune_report and tune_journal.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from monkeytrain.errors import FlagParser, UserError, exits_cleanly_on_user_error
from monkeytrain.tune_finish import BEST_RUN_NAME, finish_or_let_go, study_finished
from monkeytrain.tune_flags import check_data, fixed_flags
from monkeytrain.tune_stops import STOP_SIGNALS, StopSignals, stopped
from monkeytrain.tune_study import (MEDIAN_AFTER_TRIALS, MEDIAN_FROM_EPOCH, Setup, check_same_search, make_pruner,
                                    open_study, pruner_rule, say, say_scored_as_before_select_on, study_select_on)
from monkeytrain.tune_study import STUDY_NAME, study_storage  # noqa: F401  (the README's enqueueing imports them here)
from monkeytrain.tune_trial import TRIAL_LOG, run_trials
from monkeytrain.tune_workers import (WORKER_INDEX_ENV, fail_abandoned, finish_is_mine, progress, runs_of_this_worker,
                                      worker_name)


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
    with runs_of_this_worker(args.study_dir):
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
    select_on = study_select_on(study, config.select_on)  # before check_same_search keeps the space
    check_same_search(study, space, fixed, args.study_dir)
    if select_on != config.select_on:  # a study begun before --select-on: its trials go on as they began
        say_scored_as_before_select_on(args.study_dir)
        train_flags = [*train_flags, "--select-on", select_on]
    deadline = None if args.timeout_minutes is None else time.monotonic() + args.timeout_minutes * 60
    return study, Setup(args.study_dir, space, train_flags, args.trials, deadline, worker_name(), select_on), config


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
            return stopped(stops.received)
        if not finish_is_mine(study, setup, reason):
            return 0
        return finish_or_let_go(study, setup, stops)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once
        say("stopped at once; the trial in flight is marked failed, and a re-run continues the study.")
        return 130


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
