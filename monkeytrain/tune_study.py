"""The study the workers share: its journal storage and its pruner, what it keeps so that every worker runs
the same search (the space, the fixed train.py flags, the figure that scores the trials), and the Setup that
a worker's trials share.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from monkeytrain.data.splits import CONTENT_HASH, HELD_OUT_BY, SEEDED_SHUFFLE
from monkeytrain.errors import UserError
from monkeytrain.selection import BALANCED, PLAIN
from monkeytrain.tune_flags import with_preset_values

STUDY_NAME = "monkeytrain"
STORAGE_NAME = "study.journal"
# The median rule leaves a trial alone for its first epochs (too noisy to judge) and until a few
# trials have completed (nothing to compare with).
MEDIAN_FROM_EPOCH = 3
MEDIAN_AFTER_TRIALS = 3


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


def say(message: str) -> None:
    print(f"tune: {message}", flush=True)


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


def study_select_on(study, select_on: str) -> str:
    """What scores the study's trials, kept in the study: one figure for all of them. A study that kept its
    space but no such figure began before --select-on existed and scored its trials on accuracy; so do its
    next ones, rather than rank balanced accuracies against plain ones. Kept before the space, so that a worker
    that sees a space kept by another sees this too (the journal is read in order)."""
    kept = study.user_attrs.get("select_on")
    if kept is None:
        kept = PLAIN if study.user_attrs.get("space") is not None else select_on
        study.set_user_attr("select_on", kept)
    return kept


def say_scored_as_before_select_on(study_dir: Path) -> None:
    """Said of a study begun before --select-on existed (study_select_on), once check_same_search has let the
    worker in: with the same fixed flags, only such a study scores on another figure than the worker's."""
    say(f"{study_dir} began before --select-on existed and scores its trials on validation accuracy; "
        "its next trials are scored so too.")


def check_same_search(study, space: dict, fixed: dict, study_dir: Path) -> None:
    """A study continues only with the space and fixed flags it began with: other trials would not compare."""
    from monkeytrain.tune_space import space_json

    check_same_held_out_order(study, study_dir)
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


def check_same_held_out_order(study, study_dir: Path) -> None:
    """A study continues only on the validation images its trials chose their best epochs on: the order they
    were held out by is kept (before the space, so a worker that sees the space sees it too). A study that kept
    its space but no order began before content hashes (splits.SEEDED_SHUFFLE); once it scored a trial, new
    trials, held out by content hash, would be ranked against it on other images. Enqueued trials (the README's
    recipe, before any worker) and a space kept by a worker that scored nothing leave nothing to compare with."""
    import optuna

    kept = study.user_attrs.get(HELD_OUT_BY)
    if kept is None and study.user_attrs.get("space") is not None:
        scored = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                          optuna.trial.TrialState.PRUNED))
        kept = SEEDED_SHUFFLE if scored else None
    if kept is None:
        study.set_user_attr(HELD_OUT_BY, CONTENT_HASH)
    elif kept != CONTENT_HASH:
        raise UserError(f"{study_dir} holds a study whose trials chose their best epochs on validation images held "
                        "out the old way (by a seeded shuffle), and new trials would select on other images, so they "
                        "would not compare; begin a new --study-dir (this one's trials stay where they are).")
