"""A worker's trials: the score of a trial, and full disks met by a trial's record, the journal and a trial."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from optuna.trial import TrialState

from monkeytrain import tune_trial
from monkeytrain.storage import DiskFull
from monkeytrain.tune_study import STORAGE_NAME, Setup, open_study
from test_storage import fill_to_the_brim, full_disk  # noqa: F401  (a real 2 MiB tmpfs)


def test_a_trial_is_scored_on_the_figure_that_chose_its_best_epoch():
    results = {"selected_on": "balanced-accuracy", "best_val_accuracy": 0.9, "best_val_balanced_accuracy": 0.6}
    assert tune_trial.best_val_score(results) == 0.6
    assert tune_trial.best_val_score({**results, "selected_on": "accuracy"}) == 0.9


def test_a_trial_record_the_disk_has_no_room_for_is_one_line_naming_it_and_no_empty_file(full_disk, monkeypatch):
    monkeypatch.setattr(tune_trial, "train_trial",
                        lambda trial, argv, objective: tune_trial.TrialEnd(TrialState.COMPLETE, 0.9, "fine"))
    setup = Setup(full_disk, {}, [], 1, None, "host:1")
    (full_disk / "trials" / "trial-0007").mkdir(parents=True)
    fill_to_the_brim(full_disk)
    with pytest.raises(DiskFull, match=f"of {full_disk / 'trials' / 'trial-0007'} to write trial.json "):
        tune_trial.run_trial(SimpleNamespace(number=7, params={"lr": 0.1}), setup)
    assert not (full_disk / "trials" / "trial-0007" / "trial.json").exists()


@pytest.mark.parametrize("journal_error", [OSError(errno.ENOSPC, "No space left on device"),
                                           DiskFull(Path("study") / STORAGE_NAME, 120, False, "--study-dir")])
def test_a_full_disk_that_refuses_the_journal_too_is_told_as_the_file_it_refused_first(tmp_path, monkeypatch,
                                                                                        journal_error):
    """Failing the trial in the study's journal fails as well on that disk: its error (an OSError from the
    journal's lock, our DiskFull from its append) took the place of the DiskFull line naming the trial's file."""

    def trial_fills_the_disk(trial, setup):
        raise DiskFull(tmp_path / "trial.json", 300, False, "--study-dir")

    def journal_on_a_full_disk(*args, **kwargs):
        raise journal_error

    study = open_study(tmp_path, optuna.pruners.NopPruner())
    monkeypatch.setattr(tune_trial, "run_trial", trial_fills_the_disk)
    monkeypatch.setattr(study, "tell", journal_on_a_full_disk)
    setup = Setup(tmp_path, {}, [], 1, None, "host:1")
    with pytest.raises(DiskFull, match="to write trial.json"):
        tune_trial.run_trials(study, setup, SimpleNamespace(received=None, listen=lambda: None))


def test_a_trial_on_a_full_disk_says_what_to_do_in_tunes_own_flags(monkeypatch, tmp_path):
    """The trial's best.safetensors found no room: "pick another --output-dir", which tune then refuses (it sets
    the trials' folders itself, under --study-dir)."""
    from monkeytrain import train

    def full(argv, on_epoch):
        raise DiskFull(tmp_path / "trial-0001" / "best.safetensors", 1234, False, "--output-dir")

    monkeypatch.setattr(train, "main", SimpleNamespace(__wrapped__=full))
    with pytest.raises(DiskFull) as refused:
        tune_trial.train_trial(SimpleNamespace(number=1, report=None, should_prune=None), [])
    assert str(refused.value).endswith("free some space or pick another --study-dir; rerunning tune continues the "
                                       "study.")
