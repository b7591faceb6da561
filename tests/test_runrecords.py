"""monkeytrain.runrecords: a resume refuses other data, whatever the spelling of the same data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.layout import folders_from_root
from monkeytrain.errors import UserError
from monkeytrain.runrecords import DATA_RECORD, check_same_data, data_change


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
