"""monkeytrain.runrecords: a resume refuses other data, whatever the spelling of the same data folder; what the
records of a run left unfinished say of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.layout import folders_from_root
from monkeytrain.errors import UserError
from monkeytrain.runrecords import DATA_RECORD, check_same_data, data_change, own_test_folder, trained_every_epoch
from monkeytrain.tracking import METRICS_NAME


def manifest(data: str) -> dict:
    return discover_splits(folders_from_root(Path(data)), 0.1, 0, strict=False).manifest()


@pytest.fixture
def data(tmp_path, monkeypatch, make_image_folder) -> Path:
    folder = make_image_folder(tmp_path / "project" / "data", classes=3, per_class=6)
    monkeypatch.chdir(tmp_path / "project")
    return folder


def test_the_same_data_given_by_a_relative_or_an_absolute_path_has_not_changed(data):
    """data/x in the checkout, then $PWD/data/x in a job script (as the README's examples have it)."""
    saved = manifest("data")
    assert saved["files"]["train"][0].startswith("data/")  # written as the run was given it
    assert data_change(saved, manifest(str(data))) is None


def test_an_image_gone_since_is_a_change_whatever_the_spelling(data):
    saved = manifest("data")
    next((data / "training" / "training" / "n0").iterdir()).unlink()
    assert data_change(saved, manifest(str(data))) == "its train split has 14 images, 15 when the state was saved"


def test_a_state_whose_copy_of_the_data_record_is_damaged_cannot_be_loaded_in_one_line(tmp_path):
    state, run_dir = tmp_path / "run" / "state" / "step-00000004", tmp_path / "run"
    state.mkdir(parents=True)
    (run_dir / DATA_RECORD).write_text("{}")
    (state / DATA_RECORD).write_text('{"files": {"train": ["a.p')  # cut short on disk
    with pytest.raises(UserError, match=f"the saved state {state} cannot be loaded .*; move it away"):
        check_same_data(state, run_dir, is_main_process=True)


def epoch_line(epoch: int, epochs: int = 3, **figures) -> str:
    return json.dumps({"epoch": epoch, "epochs": epochs, "val_loss": 0.5, **figures}) + "\n"


@pytest.mark.parametrize("lines, ended", [
    ([epoch_line(1), epoch_line(2), epoch_line(3)], True),
    ([epoch_line(1), epoch_line(2), epoch_line(3), '{"epoch": 3, "ep'], True),  # a line a kill cut short after it
    ([epoch_line(1), epoch_line(2)], False),  # stopped, or killed, before its last epoch
    ([epoch_line(1), epoch_line(2), epoch_line(3, val_loss=None, not_finite={"val_loss": "nan"})], False),  # diverged
    ([], False),
], ids=["every epoch", "a cut line after", "stopped before the last", "diverged in the last", "no epoch"])
def test_a_run_trained_every_epoch_when_its_metrics_end_with_its_last_validated(tmp_path, lines, ended):
    (tmp_path / METRICS_NAME).write_text("".join(lines))
    assert trained_every_epoch(tmp_path) is ended


def test_a_run_without_metrics_did_not_train_every_epoch(tmp_path):
    assert not trained_every_epoch(tmp_path)


@pytest.mark.parametrize("layout, folder", [("kaggle", "data/validation/validation"), ("image-folder", None)],
                         ids=["a test folder of its own", "held out of the training folder"])
def test_a_run_names_its_test_folder_only_where_the_model_trained_on_none_of_its_images(data, tmp_path, layout, folder,
                                                                                       make_image_folder):
    make_image_folder(tmp_path / "project" / "other", layout=layout, classes=3, per_class=6)
    run = tmp_path / "run"
    run.mkdir()
    record = manifest("data" if layout == "kaggle" else "other")
    (run / DATA_RECORD).write_text(json.dumps(record))
    assert own_test_folder(run) == (Path(folder) if folder else None)
    (run / DATA_RECORD).write_text('{"files": {"test": ["data/a.p')  # cut short: nothing to name
    assert own_test_folder(run) is None
