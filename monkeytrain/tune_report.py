"""What the end of a study writes: trials.csv, search.png, best_config.yaml and summary.json.

Everything here reads the study (and the best trial's run directory) and writes files; nothing trains.
The picture is drawn on matplotlib's Agg canvas directly, as plots.py does. Every file goes through
storage.write_atomically: a full disk leaves the one before whole and ends the study in one line naming the file.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path

import optuna
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from optuna.trial import FrozenTrial, TrialState

from monkeytrain.storage import write_atomically

TRIALS_NAME = "trials.csv"
SEARCH_NAME = "search.png"
BEST_CONFIG_NAME = "best_config.yaml"
SUMMARY_NAME = "summary.json"
# The machine's own keys: a preset found with --cpu, or in fp32 on a CPU (the precision is recorded as
# resolved), would otherwise keep a GPU machine that reuses it on the CPU, or in fp32. The study's own best
# run is given them back, as the study was (tune_flags.machine_flags).
MACHINE_FIELDS = ("cpu", "mixed_precision", "cpu_threads")
# Keys of a trial's resolved config that belong to that one run, not to the recipe it found.
RUN_ONLY_KEYS = ("output_dir", "run_name", "resume", "score_test", *MACHINE_FIELDS)
FLAG = "--study-dir"  # where the files go: the way out of a full disk
OBJECTIVE = "validation balanced accuracy"  # what scores trials by default (tune_study.objective_words)


def trial_note(trial: FrozenTrial) -> str:
    """Why a trial ended as it did, in a few words (empty for a complete one)."""
    attrs = trial.user_attrs
    if trial.state == TrialState.PRUNED:
        return f"pruned at epoch {trial.last_step}"
    if "error" in attrs:
        return f"failed: {attrs['error']}"
    if trial.state == TrialState.FAIL:
        return f"interrupted ({attrs.get('interrupted', 'its worker was lost')}); not counted"
    return ""


def seconds(trial: FrozenTrial) -> float | None:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return round((trial.datetime_complete - trial.datetime_start).total_seconds(), 1)


def write_trials_csv(trials: list[FrozenTrial], path: Path) -> None:
    """One row per trial: number, state, value (best-epoch validation score, --select-on; a pruned trial's last
    one; none for a failed or interrupted one, whose last epoch was no score), each parameter,
    seconds, the worker that ran it and a note."""
    names = sorted({name for trial in trials for name in trial.params})
    text = io.StringIO()  # the whole table first: opened with "w", a full disk would leave half of it
    table = csv.writer(text)
    table.writerow(["number", "state", "value", *names, "seconds", "worker", "note"])
    for trial in trials:
        value = (trial.intermediate_values.get(trial.last_step) if trial.state == TrialState.PRUNED
                 else trial.value)
        table.writerow([trial.number, trial.state.name, value, *(trial.params.get(n) for n in names),
                        seconds(trial), trial.user_attrs.get("worker", ""), trial_note(trial)])
    write_atomically(path, text.getvalue().encode(), flag=FLAG)


def param_importances(study: optuna.Study) -> tuple[dict[str, float], str]:
    """Optuna's parameter importances over the complete trials, or ({}, why not): with few trials
    Optuna only warns and returns equal shares, which would be a picture of nothing."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = optuna.importance.get_param_importances(study)
        except (RuntimeError, ValueError) as error:
            return {}, str(error)
    doubts = [str(w.message) for w in caught if "importance" in str(w.message).lower()]
    return ({}, doubts[0]) if doubts else (importances, "")


def draw_search(trials: list[FrozenTrial], importances: dict[str, float], why_not: str, path: Path,
                objective: str = OBJECTIVE) -> Path:
    """search.png: each trial's `objective` (pruned ones at their last epoch) with the best so far, and beside
    it the parameter importances (or why Optuna could not give them)."""
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    history, importance = figure.subplots(1, 2, width_ratios=[3, 2])
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    history.scatter([t.number for t in complete], [t.value for t in complete], label="complete", zorder=3)
    history.scatter([t.number for t in pruned], [t.intermediate_values[t.last_step] for t in pruned],
                    marker="x", color="tab:red", label="pruned (last epoch)", zorder=3)
    best, running = [], float("-inf")
    for trial in complete:
        running = max(running, trial.value)
        best.append((trial.number, running))
    if best:
        history.step(*zip(*best), where="post", color="tab:green", label="best so far")
    history.set(xlabel="trial", ylabel=objective, title="objective per trial")
    history.set_ylim(top=min(history.get_ylim()[1], 1.02))  # no room above 100% accuracy
    history.yaxis.set_major_formatter(PercentFormatter(1.0))
    history.xaxis.set_major_locator(MaxNLocator(integer=True))
    history.legend(loc="best", fontsize=8)
    if importances:
        names = list(importances)[::-1]
        importance.barh(names, [importances[n] for n in names])
        importance.set(xlabel="share of the variation in the objective", title="parameter importance (Optuna)")
    else:
        importance.axis("off")
        importance.text(0.5, 0.5, f"no parameter importance yet:\n{why_not}", ha="center", va="center",
                        wrap=True, fontsize=9)
    write_atomically(path, FigureCanvasAgg(figure).print_png, durable=False, flag=FLAG)  # drawn again if lost
    return path


def write_best_config(best: FrozenTrial, trial_dir: Path, searched: list[str], path: Path,
                      objective: str = OBJECTIVE) -> Path:
    """The best trial's resolved config (its run's config.yaml) as a --config preset, without what only
    named that run, so `monkeytrain train --config best_config.yaml` trains the same recipe again."""
    config = yaml.safe_load((trial_dir / "config.yaml").read_text())
    preset = {key: value for key, value in config.items() if key not in RUN_ONLY_KEYS}
    header = (f"# The best trial of a monkeytrain tune study: trial {best.number}, {objective} "
              f"{best.value:.2%} (best epoch), from {trial_dir}.\n# Searched: {', '.join(searched)}. "
              f"Train it again with: monkeytrain train --config {path}\n# The device and precision are left to "
              "the machine that trains it (add --cpu or --mixed-precision to choose them).\n")
    write_atomically(path, (header + yaml.safe_dump(preset, sort_keys=False)).encode(), flag=FLAG)
    return path


def study_summary(trials: list[FrozenTrial], best: FrozenTrial, importances: dict, best_run: dict,
                  select_on: str = "balanced-accuracy") -> dict:
    """summary.json: the count per state, the best trial and the one test score of the study. The best trial's
    value is named after the figure that scores the trials (best_trial_val_balanced_accuracy by default)."""
    states = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    return {
        "trials": {name: count for name, count in states.items() if count},
        "best_trial": best.number,
        "best_params": best.params,
        "selected_on": select_on,
        f"best_trial_val_{select_on.replace('-', '_')}": best.value,
        "param_importances": importances,
        "best_run": {key: best_run.get(key) for key in ("selected_on", "best_val_accuracy",
                                                        "best_val_balanced_accuracy", "best_epoch", "test_accuracy",
                                                        "test_accuracy_ci95", "test_images", "checkpoint")},
        "note": "only best_run was scored on the test split, once; every trial was scored on validation",
    }


def write_json(data: dict, path: Path) -> Path:
    write_atomically(path, json.dumps(data, indent=2).encode(), flag=FLAG)
    return path
