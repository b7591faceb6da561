"""A worker's trials: asked of the study until it holds enough, each one a real training run (train.main:
the same Trainer, signals and tracking) in DIR/trials/trial-NNNN with its console output in its train.log,
scored on its best epoch's validation figure (--select-on) and pruned from its epochs' same figure.
"""

from __future__ import annotations

import gc
import json
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout, suppress
from dataclasses import dataclass
from typing import Callable

from monkeytrain.errors import UserError
from monkeytrain.selection import BALANCED
from monkeytrain.tune_stops import StopSignals
from monkeytrain.tune_study import Setup, objective_words, say
from monkeytrain.tune_workers import CLAIM_NAME, counted, is_surplus

TRIALS_DIR = "trials"
TRIAL_LOG = "train.log"


@dataclass
class TrialEnd:
    state: object  # optuna.trial.TrialState
    value: float | None
    note: str
    interrupted: bool = False  # by a stop signal: the worker stops too


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
    except UserError as error:  # what to do, in tune's flags (in_tunes_words)
        raise in_tunes_words(error)
    except Exception as error:  # this trial's own failure (out of memory, say): the study goes on
        traceback.print_exc()  # into the trial's train.log
        trial.set_user_attr("error", f"{error.__class__.__name__}: {error}"[:300])
        return TrialEnd(TrialState.FAIL, None, f"failed ({trial.user_attrs['error']}); see its {TRIAL_LOG}")
    if results.get("stopped"):
        trial.set_user_attr("interrupted", "a stop signal")
        return TrialEnd(TrialState.FAIL, None, "interrupted by a stop signal; it does not count", interrupted=True)
    value = best_val_score(results)
    return TrialEnd(TrialState.COMPLETE, value, f"{objective} {value:.2%} (best epoch {results['best_epoch']})")


def in_tunes_words(error: UserError) -> UserError:
    """The error of a run of tune's (a trial, the best run), with what to do in tune's flags: it sets the runs'
    --output-dir itself, and after a full disk (or a folder made read-only) tune's command continues the study,
    whatever the run had saved (a trial's state is of no use: an interrupted trial is run anew)."""
    from monkeytrain.storage import with_way_out

    message = with_way_out(str(error), "--output-dir", lambda fix: f"{fix} or pick another --study-dir; rerunning "
                                                                   "tune continues the study.")
    error.args = (message or str(error).replace("--output-dir", "--study-dir"),)
    return error


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


def describe(params: dict) -> str:
    return " ".join(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
                    for name, value in params.items())
