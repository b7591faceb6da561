"""monkeytrain download (monkeytrain.data.download): what is at --dest before, and what a download leaves there.
kagglehub is replaced by a local copy of a small data set in Kaggle's layout: no network."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import command_error, write_image_folder
from monkeytrain import cli


@pytest.fixture
def kaggle(tmp_path, monkeypatch) -> Path:
    """What kagglehub would fetch (1 image of each of 10 classes a split); kagglehub returns it."""
    import kagglehub

    fetched = write_image_folder(tmp_path / "kagglehub" / "10-monkey-species", classes=10, per_class=1)
    monkeypatch.setattr(kagglehub, "dataset_download", lambda name: str(fetched))
    return fetched


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def test_a_destination_that_holds_the_data_set_already_is_nothing_to_do(kaggle, tmp_path, capsys, monkeypatch):
    """It said `already exists and is not empty; remove it or pass another --dest`: remove a complete data set."""
    import kagglehub

    there = tmp_path / "data" / "10-monkey-species"
    shutil.copytree(kaggle, there)
    monkeypatch.setattr(kagglehub, "dataset_download", lambda name: pytest.fail("downloaded again"))
    capsys.readouterr()
    cli.main(["download", "--dest", str(there)])
    assert capsys.readouterr().out == (f"{there} already holds 10 Monkey Species in Kaggle's layout (classes n0 to "
                                       "n9); nothing to do.\n")
    assert files_under(there) == files_under(kaggle)


def test_a_destination_that_is_a_file_or_holds_something_else_is_one_line(kaggle, tmp_path, capsys):
    """A file as --dest was `Not a directory (...)`, the system's words; a folder of other things is kept."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    assert command_error(["download", "--dest", str(a_file)], capsys) == (
        f"monkeytrain: error: {a_file} is a file, not a folder; pass --dest a new or empty folder.")
    occupied = tmp_path / "occupied"
    shutil.copytree(kaggle / "training", occupied / "training")  # half a data set, or anything else
    assert command_error(["download", "--dest", str(occupied)], capsys) == (
        f"monkeytrain: error: {occupied} is not empty, and does not hold the data set in Kaggle's layout; pass "
        "--dest a new or empty folder.")
    assert files_under(occupied / "training") == files_under(kaggle / "training") and a_file.read_text() == "mine"


def test_a_download_is_copied_whole_or_not_at_all(kaggle, tmp_path, capsys):
    """A copy cut short left half a data set at --dest, which training would take without a word."""
    fresh, empty, linked = tmp_path / "data" / "fresh", tmp_path / "data" / "empty", tmp_path / "data" / "linked"
    empty.mkdir(parents=True)
    (tmp_path / "scratch").mkdir()
    linked.symlink_to(tmp_path / "scratch")  # big data kept elsewhere; a folder renamed onto the link fails
    for destination in (fresh, empty, linked):
        cli.main(["download", "--dest", str(destination)])
        assert capsys.readouterr().out == f"downloaded to {destination}\n"
        assert files_under(destination) == files_under(kaggle)
    (kaggle / "training" / "training" / "n0" / "moved.jpg").symlink_to(tmp_path / "gone.jpg")  # a file that fails
    assert "could not copy the data set to" in command_error(["download", "--dest", str(tmp_path / "data" / "cut")],
                                                              capsys)
    assert sorted(path.name for path in (tmp_path / "data").iterdir()) == ["empty", "fresh", "linked"]  # no half copy
