"""The end of a study, by the worker that claims it (tune_workers.finish_is_mine): trials.csv, search.png,
best_config.yaml and summary.json (tune_report), then the best config trained once more in DIR/best_run and
scored, once, on the test split. Should it stop or fail, the claim goes, so that the next worker ends it.
"""

from __future__ import annotations

from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from monkeytrain.errors import UserError
from monkeytrain.tune_flags import machine_flags
from monkeytrain.tune_stops import StopSignals, stopped
from monkeytrain.tune_study import Setup, say
from monkeytrain.tune_trial import TRIAL_LOG, TRIALS_DIR, best_val_score, describe, in_tunes_words
from monkeytrain.tune_workers import CLAIM_NAME, progress

BEST_RUN_NAME = "best_run"
RESULTS_NAME = "results.json"  # rundir.RESULTS_NAME; importing it would load torch for a one-line answer


def study_finished(study_dir: Path) -> bool:
    return (study_dir / BEST_RUN_NAME / RESULTS_NAME).is_file()


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
        return stopped_finishing(stops.received, setup)
    results = train_best(setup, files[-1])
    stops.listen()
    if results.get("stopped"):
        return stopped_finishing(stops.received, setup)
    tune_report.write_json(tune_report.study_summary(trials, best, importances, results, setup.select_on),
                           setup.study_dir / tune_report.SUMMARY_NAME)
    from monkeytrain.results import interval_words  # here: the best run, trained in this process, loaded torch

    say(f"best config trained again in {setup.study_dir / BEST_RUN_NAME}: {setup.objective} "
        f"{best_val_score(results):.2%} (epoch {results['best_epoch']}); test accuracy "
        f"{results['test_accuracy']:.2%} ({interval_words(results.get('test_accuracy_ci95'))}) on "
        f"{results['test_images']} images, the study's one look at the "
        f"test split; {setup.study_dir / BEST_RUN_NAME}/results.json")
    return 0


def stopped_finishing(received: str | None, setup: Setup) -> int:
    """Stop, and let go of the study's end: whichever worker runs next takes it up (the best run resumes
    from its saved state), on any host, where a claim left behind could only be taken over here."""
    (setup.study_dir / CLAIM_NAME).unlink(missing_ok=True)
    return stopped(received)


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
        try:
            return train_main.__wrapped__(argv)
        except UserError as error:  # what to do, in tune's flags (its same command resumes this run)
            raise in_tunes_words(error)


def state_counts(trials: list) -> str:
    from optuna.trial import TrialState

    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState}
    return ", ".join(f"{count} {name}" for name, count in counts.items() if count)
