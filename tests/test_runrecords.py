"""monkeytrain.runrecords: a resume refuses other data, whatever the spelling of the same data folder; what the
records of a run left unfinished say of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from monkeytrain.checkpoint import BEST_NAME
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


def test_files_skipped_then_and_passed_over_now_are_no_change_to_refuse_a_resume_for(data):
    """Zone.Identifier marks were skipped files (one warning each) in runs begun before they were passed over
    silently: the images trained on are the same, and the user has nothing to put back."""
    mark = data / "training" / "training" / "n0" / "n0_000.png:Zone.Identifier"
    mark.write_text("[ZoneTransfer]\nZoneId=3\n")
    saved = manifest("data")
    saved["skipped"] = [{"path": str(mark), "reason": "not an image"}]
    saved["skipped_count"] = 1
    assert data_change(saved, manifest("data")) is None


def test_a_state_whose_copy_of_the_data_record_is_damaged_cannot_be_loaded_in_one_line(tmp_path):
    state, run_dir = tmp_path / "run" / "state" / "step-00000004", tmp_path / "run"
    state.mkdir(parents=True)
    (run_dir / DATA_RECORD).write_text("{}")
    (state / DATA_RECORD).write_text('{"files": {"train": ["a.p')  # cut short on disk
    with pytest.raises(UserError, match=f"the saved state {state} cannot be loaded .*; move it away"):
        check_same_data(state, run_dir, is_main_process=True)


def epoch_line(epoch: int, epochs: int = 3, best: bool = True, **figures) -> str:
    return json.dumps({"epoch": epoch, "epochs": epochs, "val_loss": 0.5, "is_best": best, **figures}) + "\n"


def saved_best(run_dir: Path, epoch: int) -> None:
    """A best.safetensors whose header holds `epoch`, as the checkpoint of that epoch has."""
    save_file({"weight": torch.zeros(1)}, str(run_dir / BEST_NAME), metadata={"epoch": str(epoch)})


@pytest.mark.parametrize("lines, saved, ended", [
    ([epoch_line(1), epoch_line(2), epoch_line(3)], 3, True),
    ([epoch_line(1), epoch_line(2), epoch_line(3), '{"epoch": 3, "ep'], 3, True),  # a line a kill cut short after it
    ([epoch_line(1), epoch_line(2), epoch_line(3, best=False)], 2, True),  # its best epoch before the last
    ([epoch_line(1), epoch_line(2)], 2, False),  # stopped, or killed, before its last epoch
    ([epoch_line(1), epoch_line(2), epoch_line(3, val_loss=None, not_finite={"val_loss": "nan"})], 2,
     False),  # diverged
    ([epoch_line(1), epoch_line(2), epoch_line(3)], 2, False),  # the last best epoch's checkpoint never written
    ([epoch_line(1), epoch_line(2), epoch_line(3)], None, False),  # no checkpoint, or none readable
    ([], 1, False),
], ids=["every epoch", "a cut line after", "best before the last", "stopped before the last", "diverged in the last",
        "its last best unsaved", "no checkpoint", "no epoch"])
def test_a_run_trained_every_epoch_when_its_metrics_end_with_its_last_validated_and_its_best_saved(tmp_path, lines,
                                                                                                 saved, ended):
    (tmp_path / METRICS_NAME).write_text("".join(lines))
    if saved is not None:
        saved_best(tmp_path, saved)
    else:
        (tmp_path / BEST_NAME).write_bytes(b"cut sh")
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
    given = "data" if layout == "kaggle" else "other"
    (run / DATA_RECORD).write_text(json.dumps(manifest(given)))
    began = {"data": str(tmp_path / "project" / given)}  # as config.yaml records it
    assert own_test_folder(run, began) == (tmp_path / "project" / folder if folder else None)
    (run / DATA_RECORD).write_text('{"files": {"test": ["data/a.p')  # cut short: nothing to name
    assert own_test_folder(run, began) is None


@pytest.mark.parametrize("given", ["data", "./data/", "../project/data", "."],
                         ids=["data", "./data/", "../project/data", "the data folder itself"])
def test_a_test_folder_given_relative_is_named_from_any_working_directory(tmp_path, monkeypatch, make_image_folder,
                                                                         given):
    """data_manifest.json has the paths as given, from where the run began; its config.yaml, the absolute ones."""
    data = make_image_folder(tmp_path / "project" / "data", classes=3, per_class=6)
    run = tmp_path / "project" / "runs" / "r"
    run.mkdir(parents=True)
    monkeypatch.chdir(data if given == "." else tmp_path / "project")
    (run / DATA_RECORD).write_text(json.dumps(manifest(given)))
    began = {"data": os.path.abspath(given), "test_dir": None}
    monkeypatch.chdir(tmp_path)  # the run's name reused from another folder
    assert own_test_folder(run, began) == data / "validation" / "validation"


def test_a_test_folder_given_by_test_dir_is_named_by_its_absolute_path(tmp_path, monkeypatch, make_image_folder):
    test = make_image_folder(tmp_path / "project" / "test", layout="image-folder", classes=3, per_class=6)
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(tmp_path / "project")
    record = {"root": "data/train", "files": {"test": [f"test/n{label}/a.png" for label in range(3)]}}
    (run / DATA_RECORD).write_text(json.dumps(record))
    assert own_test_folder(run, {"data": None, "test_dir": str(test)}) == test
    monkeypatch.chdir(tmp_path)
    assert own_test_folder(run, {"data": None, "test_dir": str(test)}) == test


def test_a_relative_test_folder_is_not_named_where_config_yaml_cannot_tell_where_it_is(data, tmp_path):
    """No config.yaml (deleted by hand), the built-in synthetic set's name, or the data moved since."""
    run = tmp_path / "run"
    run.mkdir()
    (run / DATA_RECORD).write_text(json.dumps(manifest("data")))
    for began in (None, {"data": "builtin:synthetic-v2"}, {"data": str(tmp_path / "moved")}):
        assert own_test_folder(run, began) is None


@pytest.mark.parametrize("root, files, apart", [
    (".", ["../test/cat/1.png", "../test/dog/2.png"], "../test"),  # --train-dir . --test-dir ../test
    ("data/train", ["data/test/cat/1.png", "data/test/dog/2.png"], "data/test"),
    ("data", ["data/test/cat/1.png", "data/test/dog/2.png"], None),  # held out of the root, or a split folder in it
    (".", ["cat/1.png", "dog/2.png"], None),
])
def test_a_test_split_apart_from_the_training_folder_is_told_by_its_path_from_it(root, files, apart):
    from monkeytrain.runrecords import folder_apart_from

    assert folder_apart_from(files, root) == (Path(apart) if apart else None)
