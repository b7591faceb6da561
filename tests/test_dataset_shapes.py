"""Image-folder datasets of other shapes than the monkey set's: what a user meets with them.

The monkey set is balanced, ten classes of about 100 images each. These tests build other shapes
(a training folder alone, a class renamed in one split, strong imbalance) and check what the data
layer and the `monkeytrain` commands make of them, without training where the layer alone decides.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import RecordedLog, command_error, noisy_image
from monkeytrain import cli
from monkeytrain.config import parse_config
from monkeytrain.data import imagefiles, layout
from monkeytrain.data.dataset import discover_splits, resolve_dataset
from monkeytrain.data.imagefiles import scan_labelled_files
from monkeytrain.errors import UserError


def test_a_root_with_a_training_folder_alone_names_that_folder_as_the_data_to_give(tmp_path, make_image_folder):
    """train/<class>/ and nothing beside it: the user is told to give train/ itself, from which the
    validation and test splits are then held out."""
    root = make_image_folder(tmp_path / "data", layout="train-test", classes=2, per_class=1)
    (root / "test").rename(tmp_path / "elsewhere")
    with pytest.raises(UserError, match=f"training folder \\(train/\\) but no validation or test folder; "
                                        f"give --data {root / 'train'} to hold"):
        layout.folders_from_root(root)


def test_inspect_data_of_a_root_with_a_training_folder_alone_is_one_line(tmp_path, make_image_folder, capsys):
    root = make_image_folder(tmp_path / "data", layout="kaggle", classes=2, per_class=1)
    (root / "validation").rename(tmp_path / "elsewhere")
    error = command_error(["inspect-data", str(root)], capsys)
    assert f"give --data {root / 'training' / 'training'} to hold the validation and test splits" in error


def test_a_class_renamed_in_the_test_split_is_named_on_both_sides(tmp_path, make_image_folder):
    """train/ has n0 n1 n2, test/ has n0 n1 cats: one message says that n2 is missing and cats is extra."""
    root = make_image_folder(tmp_path / "data", layout="train-test", classes=3, per_class=1)
    (root / "test" / "n2").rename(root / "test" / "cats")
    with pytest.raises(UserError, match=f"'n2' is in {root / 'train'} but not in {root / 'test'}, which has "
                                        f"'cats' that {root / 'train'} lacks; every split needs the same classes"):
        layout.check_same_classes(layout.folders_from_root(root))


def test_a_split_with_one_class_fewer_names_no_extra_class(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-test", classes=3, per_class=1)
    (root / "test" / "n2").rename(tmp_path / "n2")
    with pytest.raises(UserError, match=f"'n2' is in {root / 'train'} but not in {root / 'test'}; every split"):
        layout.check_same_classes(layout.folders_from_root(root))


def test_many_renamed_classes_are_named_up_to_three(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-test", classes=5, per_class=1)
    for name in ("n1", "n2", "n3", "n4"):
        (root / "test" / name).rename(root / "test" / f"class {name}")
    with pytest.raises(UserError, match="which has 'class n1', 'class n2', 'class n3' and 1 more that"):
        layout.check_same_classes(layout.folders_from_root(root))


def test_strong_imbalance_holds_out_an_image_of_every_class_for_validation_and_test(tmp_path, make_image_folder):
    """One class of 100 images beside four of 5 (as 500 beside 5): every class is validated and tested on,
    and keeps three images for training; the large class gives its fractions."""
    counts = {"n0": 100, "n1": 5, "n2": 5, "n3": 5, "n4": 5}
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=5, per_class=counts, size=8)
    splits = discover_splits(layout.folders_from_root(root), val_fraction=0.1, seed=0, strict=False)
    assert splits.per_class_counts(splits.test) == {"n0": 20, "n1": 1, "n2": 1, "n3": 1, "n4": 1}
    assert splits.per_class_counts(splits.val) == {"n0": 8, "n1": 1, "n2": 1, "n3": 1, "n4": 1}
    assert splits.per_class_counts(splits.train) == {"n0": 72, "n1": 3, "n2": 3, "n3": 3, "n4": 3}


def elongated_warnings(root: Path, cache: Path, accelerator) -> list[str]:
    log = RecordedLog()
    resolve_dataset(parse_config(["--data", str(root), "--cache-dir", str(cache)]), accelerator, log)
    return [warning for warning in log.warnings if "far from square" in warning]


def test_images_far_from_square_are_one_warning_saying_the_centre_crop_leaves_most_out(
        tmp_path, make_image_folder, cpu_accelerator, capsys):
    """1000 x 50 strips (spectrograms, lines of text) train on the 50 x 50 square at their centre."""
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=2, per_class=5, size=8)
    for strip in ("n0/strip_a.png", "n1/strip_b.png"):
        noisy_image((90, 90, 90), 40, [1]).resize((400, 20)).save(root / strip)
    [warning] = elongated_warnings(root, tmp_path / "c", cpu_accelerator)
    assert warning.startswith("2 of 12 images are far from square (one side over 3 times the other), such as ")
    assert "strip_a.png (20.0 to 1)" in warning and "leaves out 67% or more of it" in warning
    cli.main(["inspect-data", "--data", str(root)])
    assert f"  note: {warning}" in capsys.readouterr().out.splitlines()


def test_images_nearly_square_are_no_warning(tmp_path, make_image_folder, cpu_accelerator):
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=2, per_class=5, size=8)
    noisy_image((90, 90, 90), 40, [1]).resize((300, 100)).save(root / "n0" / "wide.png")  # 3 to 1: kept
    assert elongated_warnings(root, tmp_path / "c", cpu_accelerator) == []


def test_a_scan_kept_before_elongations_were_gets_them_from_the_headers(tmp_path, monkeypatch):
    """A scans file of an earlier version has no elongation: the header is read again (no decode), and
    the scans file is written anew with it."""
    noisy_image((90, 90, 90), 40, [1]).resize((400, 20)).save(tmp_path / "strip.png")
    cache = tmp_path / "scans.json"
    scan_labelled_files([(tmp_path / "strip.png", 0)], cache)
    saved = json.loads(cache.read_text())
    for record in saved["files"].values():
        del record["elongation"]
    saved["started"] += 10 ** 10  # long after the file's times: its records are trusted, not racy
    cache.write_text(json.dumps(saved))

    def no_decode(path, label):
        raise AssertionError(f"{path} decoded again")
    monkeypatch.setattr(imagefiles, "inspect", no_decode)
    [image], _ = scan_labelled_files([(tmp_path / "strip.png", 0)], cache)
    assert image.elongation == 20.0
    assert [record["elongation"] for record in json.loads(cache.read_text())["files"].values()] == [20.0]
