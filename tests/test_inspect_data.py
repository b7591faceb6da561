"""`monkeytrain inspect-data` on data sets unlike the monkey set: many classes, a class too small to
give each split an image."""

from __future__ import annotations

import pytest

from monkeytrain import cli


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MONKEYTRAIN_CACHE", str(tmp_path / "cache"))


def test_the_classes_a_held_out_split_lacks_are_named_past_the_listed_counts(capsys, tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=25, per_class={"n7": 1}, size=8)
    cli.main(["inspect-data", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert "  test     24 images  per class 0 to 1, median 1" in lines  # which class has 0 is not said here
    assert "  val   has no image of 1 class(es): n7" in lines
    assert "  test  has no image of 1 class(es): n7" in lines
    assert not [line for line in lines if line.startswith("  train has no image")]

