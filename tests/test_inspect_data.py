"""`monkeytrain inspect-data` on data sets unlike the monkey set: many classes, a class too small to
give each split an image, folders named by numbers or not in UTF-8, images too large for Pillow's limit."""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

from conftest import a_finished_run, write_labels_file
from monkeytrain import cli


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MONKEYTRAIN_CACHE", str(tmp_path / "cache"))


def test_the_classes_a_held_out_split_lacks_are_named_past_the_listed_counts(capsys, tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=25, per_class={"n7": 1}, size=8)
    cli.main(["inspect-data", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert "  test     24 images  per class 0 to 1, median 1" in lines  # which class has 0 is not said here
    assert "  val   has no image of 1 class(es): n7 (one distinct training image stays in training)" in lines
    assert "  test  has no image of 1 class(es): n7 (one distinct training image stays in training)" in lines
    assert not [line for line in lines if line.startswith("  train has no image")]


def test_a_class_of_copies_a_held_out_split_lacks_is_named_with_the_reason_training_warns(capsys, tmp_path,
                                                                                       make_image_folder):
    """Ten copies of one image stay in training together: inspect-data said only that val had no image of it."""
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=2, per_class={"n0": 1}, size=8)
    for i in range(9):
        shutil.copyfile(root / "n0" / "n0_000.png", root / "n0" / f"copy_{i}.png")
    cli.main(["inspect-data", str(root)])
    lines = capsys.readouterr().out.splitlines()
    why = ("one distinct training image stays in training: its 10 training files are copies of one image, and copies "
           "stay together on one side")
    assert f"  val   has no image of 1 class(es): n0 ({why})" in lines
    assert f"  test  has no image of 1 class(es): n0 ({why})" in lines


def test_classes_are_listed_by_label_with_a_name_only_where_it_differs(capsys, tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="flattened", classes=3, per_class=3, size=8)
    for split in ("training", "validation"):
        for old, new in (("n0", "0"), ("n1", "10"), ("n2", "2")):
            (root / split / old).rename(root / split / new)
    write_labels_file(root / "monkey_labels.txt", ["10", "2"], [3, 3])  # "0" has no common name
    cli.main(["inspect-data", str(root)])
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("  classes by label (folder: name where it differs):")
    assert lines[start + 1:start + 4] == ["  0. 0", "  1. 10: common name 0", "  2. 2: common name 1"]


def test_the_synthetic_set_named_as_a_runs_config_yaml_names_it_is_inspected(capsys, tmp_path, monkeypatch):
    """--data builtin:synthetic-v2 trains on the built-in set: inspect-data said "no dataset given" of it."""
    from monkeytrain.data.synthetic import DATA_NAME, VERSION

    monkeypatch.chdir(tmp_path)
    cli.main(["inspect-data", "--data", DATA_NAME])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tmp_path / 'cache' / VERSION}: layout train-val-test, 10 classes"
    assert lines[1].startswith("  train   160 images")


def test_a_class_folder_whose_name_is_not_utf8_shows_its_bytes_beside_its_display_name(capsys, tmp_path,
                                                                                     make_image_folder):
    """Printed as they were, the odd bytes showed as � on a UTF-8 terminal: `b�bird: b�bird`, one name twice."""
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=2, per_class={"n0": 1}, size=8)
    os.rename(root / "n0", os.fsencode(root) + b"/b\xe9bird")  # as a zip made on Windows names it
    cli.main(["inspect-data", str(root)])
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("  classes by label (folder: name where it differs):")
    assert lines[start + 1:start + 3] == ["  0. b\\xe9bird: b\ufffdbird", "  1. n1"]
    assert "  test  has no image of 1 class(es): b\\xe9bird (one distinct training image stays in training)" in lines


def test_an_image_over_pillows_decompression_bomb_limit_is_noted_as_training_warns(capsys, tmp_path, monkeypatch,
                                                                                   make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=2, per_class=5, size=8)
    Image.new("RGB", (12, 12), (200, 30, 30)).save(root / "n0" / "huge.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12 x 12 is over it (a 90-megapixel photo), 8 x 8 is not
    cli.main(["inspect-data", str(root)])
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  note:")]
    assert len(notes) == 1 and notes[0].startswith(f"  note: {root / 'n0' / 'huge.jpg'} is a very large image")


def test_a_folder_of_classes_with_runs_and_a_job_log_beside_them_is_inspected_naming_the_runs(capsys, tmp_path,
                                                                                              make_image_folder):
    """`monkeytrain inspect-data .` where a SLURM job wrote runs/monkeytrain-1234.out beside its run: runs/ was a
    class again (one with no images); a link to a notes file on a drive not mounted stopped it too."""
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=2, per_class=5, size=8)
    a_finished_run(root / "runs" / "20261203-174800")
    (root / "runs" / "monkeytrain-1234.out").write_text("epoch 1/3\n")
    (root / "notes.txt").symlink_to(tmp_path / "unmounted" / "notes.txt")
    cli.main(["inspect-data", str(root)])
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"{root}: layout image-folder, 2 classes"
    assert f"monkeytrain: warning: {root / 'runs'} is passed over: it holds monkeytrain's runs" in captured.err
