"""monkeytrain.runrecords: a resume refuses other data, whatever the spelling of the same data folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from monkeytrain.data.dataset import discover_splits
from monkeytrain.data.layout import folders_from_root
from monkeytrain.runrecords import data_change


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
