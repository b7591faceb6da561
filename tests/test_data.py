"""monkeytrain.data.dataset: from dataset folders to checked splits and the manifest."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import RecordedLog
from monkeytrain.cachefolder import cache_folder
from monkeytrain.config import parse_config
from monkeytrain.data import layout
from monkeytrain.data.dataset import discover_splits, find_split_folders, resolve_dataset, user_data_root
from monkeytrain.errors import UserError


def discover(root: Path, val_fraction: float = 0.2, seed: int = 0, strict: bool = False):
    return discover_splits(layout.folders_from_root(root), val_fraction, seed, strict)


def digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


# --- the shared fixture itself --------------------------------------------------------

def test_make_image_folder_writes_unique_learnable_images(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val-test", classes=4, per_class=3)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 3 * 4 * 3
    assert len({digest(f) for f in files}) == len(files)  # no accidental duplicates
    means = [np.asarray(Image.open(root / "train" / f"n{c}" / f"n{c}_000.png")).mean(axis=(0, 1))
             for c in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(means[a] - means[b]).max() > 60  # classes differ clearly in colour


def test_make_image_folder_per_class_dict_and_size(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="flattened", classes=2, per_class={"n0": 1, "n1": 4}, size=10)
    assert len(list((root / "training" / "n0").iterdir())) == 1
    assert len(list((root / "validation" / "n1").iterdir())) == 4
    assert Image.open(root / "training" / "n1" / "n1_000.png").size == (10, 10)


# --- discovering splits in every layout -----------------------------------------------

@pytest.mark.parametrize("name", ["kaggle", "flattened", "train-val"])
def test_layouts_without_a_selection_folder_hold_out_validation(tmp_path, make_image_folder, name):
    root = make_image_folder(tmp_path / "d", layout=name, classes=3, per_class=10)
    splits = discover(root, val_fraction=0.2)
    assert Counter(f.label for f in splits.val) == {0: 2, 1: 2, 2: 2}
    assert Counter(f.label for f in splits.train) == {0: 8, 1: 8, 2: 8}
    assert len(splits.test) == 30
    assert splits.selection_on_test is False
    train_root = layout.folders_from_root(root).train
    assert all(train_root in f.path.parents for f in splits.train + splits.val)
    assert not {f.path for f in splits.train} & {f.path for f in splits.val}
    assert splits.leaks == [] and splits.skipped == []


def test_train_val_test_layout_uses_its_val_folder(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val-test", classes=2, per_class=4)
    splits = discover(root, val_fraction=0.5)
    for name in ("train", "val", "test"):
        files = splits.named_splits()[name]
        assert len(files) == 8
        assert all(f.path.parent.parent == root / name for f in files)
    assert splits.layout == "train-val-test"


def test_one_folder_of_classes_holds_out_a_test_split_the_same_for_every_seed(tmp_path, make_image_folder):
    """No split on disk: --test-fraction of each class is the test split whatever --seed (runs of
    several seeds are scored on the same images), then --val-fraction of the rest is held out."""
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=3, per_class=10)
    runs = [discover_splits(layout.folders_from_root(root), 0.25, seed, False, test_fraction=0.2) for seed in (0, 1)]
    everything = {p for p in root.rglob("*.png")}
    for splits in runs:
        counts = {name: Counter(f.label for f in files) for name, files in splits.named_splits().items()}
        assert counts == {"train": {0: 6, 1: 6, 2: 6}, "val": {0: 2, 1: 2, 2: 2}, "test": {0: 2, 1: 2, 2: 2}}
        paths = [{f.path for f in files} for files in splits.named_splits().values()]
        assert set.union(*paths) == everything and sum(map(len, paths)) == 30
        assert splits.layout == "image-folder" and splits.leaks == [] and not splits.selection_on_test
    assert [f.path for f in runs[0].test] == [f.path for f in runs[1].test]
    assert [f.path for f in runs[0].val] != [f.path for f in runs[1].val]


def test_explicit_folders(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val-test", classes=2, per_class=3)
    folders = layout.folders_from_explicit(str(root / "train"), None, str(root / "test"))
    splits = discover_splits(folders, 0.0, 0, False)
    assert splits.layout == "explicit"
    assert {f.path.parent.parent for f in splits.train} == {root / "train"}


def test_val_fraction_zero_selects_on_the_test_split(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=2, per_class=5)
    splits = discover(root, val_fraction=0.0)
    assert splits.selection_on_test is True
    assert [f.path for f in splits.val] == [f.path for f in splits.test]
    assert len(splits.train) == 10  # nothing held out of training
    assert "val" not in splits.distinct_splits()
    assert splits.leaks == []  # validation being the test split is not leakage


def test_class_indices_follow_sorted_folder_names(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val", classes=11, per_class=1)
    splits = discover(root, val_fraction=0.0)
    assert splits.class_folders == sorted(f"n{i}" for i in range(11))  # n0, n1, n10, n2, ...
    for f in splits.train + splits.test:
        assert splits.class_folders[f.label] == f.path.parent.name


def test_class_names_come_from_monkey_labels(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=3, per_class=2)
    splits = discover(root, val_fraction=0.0)
    assert splits.class_names == ["common name 0", "common name 1", "common name 2"]


def test_class_names_are_folder_names_without_monkey_labels(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=3, per_class=2)
    (root / "monkey_labels.txt").unlink()
    assert discover(root, val_fraction=0.0).class_names == ["n0", "n1", "n2"]


def test_files_are_judged_by_content_and_hidden_files_skipped(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val", classes=2, per_class=2)
    jpeg = root / "train" / "n0" / "IMG_0001"  # a JPEG without extension
    Image.new("RGB", (16, 16), (200, 10, 10)).save(jpeg, "JPEG")
    (root / "train" / "n0" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    hidden_dir = root / "train" / "n1" / ".thumbnails"
    hidden_dir.mkdir()
    Image.new("RGB", (4, 4)).save(hidden_dir / "t.png")
    splits = discover(root, val_fraction=0.0)
    used = {f.path for f in splits.train}
    assert jpeg in used
    assert root / "train" / "n0" / "n0_000.png" in used
    assert len(splits.train) == 5
    assert splits.skipped == []  # hidden files are not even looked at


def add_bad_files(class_dir: Path) -> dict[str, Path]:
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(good, "JPEG")
    bad = {
        "corrupt": class_dir / "corrupt.png",
        "truncated": class_dir / "truncated.jpg",
        "empty": class_dir / "empty.jpg",
        "text": class_dir / "notes.txt",
    }
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(png, "PNG")
    corrupt = bytearray(png.getvalue())
    corrupt[len(corrupt) // 2:len(corrupt) // 2 + 64] = bytes(64)
    bad["corrupt"].write_bytes(bytes(corrupt))
    bad["truncated"].write_bytes(good.getvalue()[:-40])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is not an image\n")
    return bad


def test_bad_files_are_skipped_with_a_reason_and_counted(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=2, per_class=5)
    bad = add_bad_files(root / "training" / "training" / "n1")
    bad_test = root / "validation" / "validation" / "n0" / "broken.png"
    bad_test.write_bytes(b"\x89PNG\r\n\x1a\n" + b"nonsense")
    splits = discover(root, val_fraction=0.2)
    assert {s.path for s in splits.skipped} == set(bad.values()) | {bad_test}
    assert all(s.reason for s in splits.skipped)
    used = {f.path for f in splits.train + splits.val + splits.test}
    assert not used & {s.path for s in splits.skipped}
    assert len(splits.train) + len(splits.val) == 10 and len(splits.test) == 10
    manifest = json.loads(json.dumps(splits.manifest()))
    for split, files in splits.named_splits().items():
        assert manifest["per_class_counts"][split] == {
            folder: sum(f.label == label for f in files) for label, folder in enumerate(splits.class_folders)}
    assert manifest["skipped_count"] == 5
    assert {Path(s["path"]) for s in manifest["skipped"]} == {s.path for s in splits.skipped}
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["notes.txt"]
    assert "truncated" in reasons["truncated.jpg"]


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty", "text"])
def test_strict_mode_fails_naming_the_bad_file(tmp_path, make_image_folder, kind):
    root = make_image_folder(tmp_path / "d", layout="train-val", classes=2, per_class=3)
    bad = add_bad_files(root / "val" / "n0")
    for other, path in bad.items():
        if other != kind:
            path.unlink()
    with pytest.raises(UserError) as error:
        discover(root, strict=True)
    assert str(bad[kind]) in str(error.value)
    assert "--strict-data" in str(error.value)


def test_strict_mode_passes_clean_data(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val", classes=2, per_class=3)
    assert len(discover(root, strict=True).test) == 6


def test_class_missing_from_one_split_is_a_user_error_naming_it(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=3, per_class=2)
    shutil.rmtree(root / "validation" / "validation" / "n2")
    with pytest.raises(UserError, match="'n2'"):
        discover(root)


@pytest.mark.parametrize("split_folder", ["training/training", "validation/validation"])
def test_empty_class_is_a_user_error_naming_the_folder(tmp_path, make_image_folder, split_folder):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=3, per_class=4)
    empty = root / split_folder / "n1"
    for f in empty.iterdir():
        f.unlink()
    with pytest.raises(UserError) as error:
        discover(root)
    assert str(empty) in str(error.value)


def test_class_with_only_unreadable_files_is_empty(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val", classes=2, per_class={"n0": 3, "n1": 0})
    (root / "train" / "n1" / "a.jpg").write_text("not an image")
    Image.new("RGB", (8, 8)).save(root / "val" / "n1" / "ok.png")
    with pytest.raises(UserError, match="n1"):
        discover(root)


def test_empty_class_in_the_validation_folder_is_a_user_error(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val-test", classes=2, per_class=3)
    empty = root / "val" / "n0"
    for f in empty.iterdir():
        f.unlink()
    with pytest.raises(UserError) as error:
        discover(root)
    assert str(empty) in str(error.value)


def test_a_class_of_copies_held_out_with_their_originals_is_a_user_error_saying_so(tmp_path, make_image_folder):
    """Not "no readable images": the class has images, but all are copies of another class's held out to test."""
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=2, per_class=10)
    held = [f.path for f in discover(root).test if f.label == 0]
    (root / "n0b").mkdir()
    for path in held:
        shutil.copyfile(path, root / "n0b" / path.name)
    with pytest.raises(UserError) as error:
        discover(root)
    assert str(error.value) == (
        f"class folder {root / 'n0b'} has no image left for training: its 2 image(s) are all copies of images of "
        f"other classes, held out to the test split with them ({root / 'n0b' / held[0].name} = {held[0]}); "
        "remove the copies with the wrong label, or add images of its own to it.")


def test_no_images_at_all_is_a_user_error(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=2, per_class=0)
    with pytest.raises(UserError, match="no readable images"):
        discover(root)


def test_no_class_folders_at_all_is_a_user_error(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    with pytest.raises(UserError):
        discover(tmp_path)


def test_holdout_too_small_to_round_to_an_image_still_holds_out_one_per_class(tmp_path, make_image_folder):
    """10% of 3 images rounds to none; the best-epoch choice must not then fall to an empty
    split: each class gives exactly one image to validation and keeps the rest for training."""
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=2, per_class=3)
    splits = discover(root, val_fraction=0.1)
    assert Counter(f.label for f in splits.val) == {0: 1, 1: 1}
    assert Counter(f.label for f in splits.train) == {0: 2, 1: 2}
    assert splits.selection_on_test is False


def test_identical_files_in_two_splits_are_reported_as_leaks(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="train-val-test", classes=2, per_class=3)
    source = root / "train" / "n1" / "n1_002.png"
    copy = root / "test" / "n1" / "copy_of_train.png"
    shutil.copyfile(source, copy)
    splits = discover(root)
    assert splits.leaks == [(source, copy)]
    assert splits.manifest()["leaks"] == [[str(source), str(copy)]]


def test_duplicates_within_training_stay_on_one_side_of_the_holdout(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=2, per_class=10)
    class_dir = root / "training" / "training" / "n0"
    for i in range(5):  # five duplicated pairs
        shutil.copyfile(class_dir / f"n0_{i:03d}.png", class_dir / f"dup_{i}.png")
    for seed in range(6):
        splits = discover(root, val_fraction=0.3, seed=seed)
        assert not {f.digest for f in splits.train} & {f.digest for f in splits.val}
        assert splits.leaks == []


def test_same_seed_same_holdout_different_seed_different(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=2, per_class=12)
    held = [tuple(f.path for f in discover(root, 0.25, seed).val) for seed in (0, 0, 1, 2, 3)]
    assert held[0] == held[1]
    assert len(set(held[1:])) > 1


def test_manifest_is_json_and_accounts_for_every_file(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=2, per_class=5)
    splits = discover(root, val_fraction=0.2)
    manifest = json.loads(json.dumps(splits.manifest()))
    assert manifest["layout"] == "kaggle"
    assert manifest["class_folders"] == ["n0", "n1"]
    assert manifest["class_names"] == ["common name 0", "common name 1"]
    assert manifest["counts"] == {"train": 8, "val": 2, "test": 10}
    assert manifest["skipped_count"] == 0
    on_disk = {str(p) for p in root.rglob("*.png")}
    listed = [p for files in manifest["files"].values() for p in files]
    assert sorted(listed) == sorted(on_disk)


# --- config-level helpers -------------------------------------------------------------

def test_data_root_and_cache_come_from_flags_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MONKEYTRAIN_DATA", str(tmp_path / "env-data"))
    monkeypatch.setenv("MONKEYTRAIN_CACHE", str(tmp_path / "env-cache"))
    assert user_data_root(parse_config([])) == tmp_path / "env-data"
    assert user_data_root(parse_config(["--data", "flag-data"])) == Path("flag-data")
    assert cache_folder(parse_config([]).cache_dir) == tmp_path / "env-cache"
    assert cache_folder(parse_config(["--cache-dir", "c"]).cache_dir) == Path("c")
    assert cache_folder(parse_config(["--cache-dir=~/c"]).cache_dir) == Path.home() / "c"


def test_an_empty_monkeytrain_data_is_refused_where_it_would_be_read(tmp_path, monkeypatch):
    monkeypatch.setenv("MONKEYTRAIN_DATA", "")  # export MONKEYTRAIN_DATA=$DATA, with DATA unset
    with pytest.raises(UserError, match="^MONKEYTRAIN_DATA is set but empty"):
        user_data_root(parse_config([]))
    assert user_data_root(parse_config(["--data", "flag-data"])) == Path("flag-data")  # not read: no error
    assert user_data_root(parse_config(["--train-dir", "t", "--val-dir", "v"])) is None



def test_an_empty_cache_folder_is_refused_not_taken_for_the_default(monkeypatch):
    """An unset shell variable behind --cache-dir or MONKEYTRAIN_CACHE: "" would have meant the default."""
    monkeypatch.setenv("MONKEYTRAIN_CACHE", "")
    with pytest.raises(UserError, match="^MONKEYTRAIN_CACHE is set but empty"):
        cache_folder(None)
    assert cache_folder("c") == Path("c")  # the flag wins: the variable is not read
    with pytest.raises(UserError, match="^--cache-dir is empty"):
        cache_folder("")

def test_resolve_dataset_warns_about_skipped_files_leaks_and_test_selection(
        tmp_path, make_image_folder, cpu_accelerator):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=2, per_class=3)
    (root / "training" / "training" / "n0" / "bad.jpg").write_text("text")
    shutil.copyfile(root / "training" / "training" / "n1" / "n1_000.png",
                    root / "validation" / "validation" / "n1" / "dup.png")
    log = RecordedLog()
    config = parse_config(["--data", str(root), "--val-fraction", "0", "--cache-dir", str(tmp_path / "c")])
    splits = resolve_dataset(config, cpu_accelerator, log)
    assert splits.synthetic is False
    text = "\n".join(log.warnings)
    assert "bad.jpg" in text
    assert "leakage" in text and "dup.png" in text
    assert "--val-fraction 0" in text


def test_many_skipped_files_are_five_lines_and_one_for_the_rest(tmp_path, make_image_folder, cpu_accelerator):
    """A scraped set may hold hundreds of saved HTML pages: the log names a few and counts the rest."""
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=2, per_class=3)
    for number in range(8):
        (root / "training" / "training" / "n0" / f"page{number}.jpg").write_text("<html>")
    log = RecordedLog()
    resolve_dataset(parse_config(["--data", str(root), "--cache-dir", str(tmp_path / "c")]), cpu_accelerator, log)
    skipping = [line for line in log.warnings if line.startswith("skipping")]
    assert len(skipping) == 6 and all("page" in line for line in skipping[:5])
    assert skipping[5].startswith("skipping 3 more file(s) that are not readable images (8 in all); "
                                  "data_manifest.json lists each")


def test_a_class_folder_of_unreadable_files_says_why_they_were_skipped(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=2, per_class=3)
    folder = root / "validation" / "validation" / "n1"
    for image in folder.iterdir():
        image.unlink()
    (folder / "IMG_0001.jpg").write_text("<!DOCTYPE html><html>")
    with pytest.raises(UserError) as refused:
        discover(root)
    assert str(refused.value).startswith(f"class folder {folder} has no readable images (1 file(s) skipped, such as "
                                         f"{folder / 'IMG_0001.jpg'}: ")


def test_an_image_under_two_classes_of_one_split_is_one_warning_naming_both(
        tmp_path, make_image_folder, cpu_accelerator):
    root = make_image_folder(tmp_path / "d", layout="train-val-test", classes=3, per_class=4)
    first, copy = root / "train" / "n0" / "n0_001.png", root / "train" / "n2" / "stray.png"
    shutil.copyfile(first, copy)
    log = RecordedLog()
    splits = resolve_dataset(parse_config(["--data", str(root), "--cache-dir", str(tmp_path / "c")]),
                             cpu_accelerator, log)
    assert [w for w in log.warnings if "two classes" in w] == [
        f"{first} and {copy} are the same image under two classes (n0 and n2); remove the copy with the wrong label."]
    assert splits.manifest()["conflicts"] == [[str(first), str(copy)]] and splits.leaks == []


def test_many_images_under_two_classes_are_one_line(tmp_path, make_image_folder, cpu_accelerator):
    root = make_image_folder(tmp_path / "d", layout="train-val", classes=2, per_class=8)
    for i in range(7):
        shutil.copyfile(root / "val" / "n0" / f"n0_{i:03d}.png", root / "val" / "n1" / f"copy{i}.png")
    log = RecordedLog()
    resolve_dataset(parse_config(["--data", str(root), "--cache-dir", str(tmp_path / "c")]), cpu_accelerator, log)
    [warning] = [w for w in log.warnings if "two classes" in w]
    val = root / "val"
    assert warning.startswith(f"7 images sit under two classes each (conflicting labels), such as "
                              f"{val / 'n0' / 'n0_000.png'} and {val / 'n1' / 'copy0.png'} (n0 and n1)")


def test_resolve_dataset_warns_once_about_each_oversized_image(tmp_path, make_image_folder, cpu_accelerator,
                                                              monkeypatch):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=2, per_class=3, size=24)
    pixels = np.random.default_rng(9).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "training" / "training" / "n0" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 40 is over it, 24 x 24 is not
    log = RecordedLog()
    resolve_dataset(parse_config(["--data", str(root), "--cache-dir", str(tmp_path / "c")]), cpu_accelerator, log)
    large = [w for w in log.warnings if "very large image" in w]
    assert len(large) == 1 and "huge.png" in large[0]


def test_a_class_of_copies_with_no_held_out_image_is_warned_as_one_image(tmp_path, make_image_folder,
                                                                        cpu_accelerator):
    """Ten identical files are one image, kept in training with its copies: "add images" alone would mislead."""
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=2, per_class={"n0": 1})
    for i in range(9):
        shutil.copyfile(root / "n0" / "n0_000.png", root / "n0" / f"copy_{i}.png")
    log = RecordedLog()
    resolve_dataset(parse_config(["--data", str(root), "--cache-dir", str(tmp_path / "c")]), cpu_accelerator, log)
    warnings = [w for w in log.warnings if "held-out" in w]
    assert warnings[0] == (
        "class folder(s) n0 have no held-out validation image (one distinct training image stays in training: its "
        "10 training files are copies of one image, and copies stay together on one side), so the best epoch is "
        "chosen without them; add different images to them.")
    assert len(warnings) == 2 and "held-out test image" in warnings[1] and "10 training files" in warnings[1]


def test_a_class_with_no_held_out_image_is_named_in_a_warning(tmp_path, make_image_folder, cpu_accelerator):
    """One training image of class n0 must stay in training, so the best epoch is chosen without n0."""
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=3, per_class={"n0": 1})
    log = RecordedLog()
    splits = resolve_dataset(parse_config(["--data", str(root), "--cache-dir", str(tmp_path / "c")]),
                             cpu_accelerator, log)
    assert {f.label for f in splits.val} == {1, 2}
    [warning] = [w for w in log.warnings if "held-out" in w]
    assert "n0" in warning and "n1" not in warning and "n2" not in warning


def test_a_class_of_one_image_in_one_folder_of_classes_is_named_for_both_held_out_splits(
        tmp_path, make_image_folder, cpu_accelerator):
    root = make_image_folder(tmp_path / "d", layout="image-folder", classes=3, per_class={"n0": 1})
    log = RecordedLog()
    splits = resolve_dataset(parse_config(["--data", str(root), "--cache-dir", str(tmp_path / "c")]),
                             cpu_accelerator, log)
    assert {f.label for f in splits.test} == {1, 2} and {f.label for f in splits.train} == {0, 1, 2}
    warnings = [w for w in log.warnings if "held-out" in w]
    assert [("n0" in w, "held-out validation image" in w, "held-out test image" in w) for w in warnings] == [
        (True, True, False), (True, False, True)]


def test_no_class_warning_when_every_class_has_a_held_out_image(tmp_path, make_image_folder, cpu_accelerator):
    root = make_image_folder(tmp_path / "d", layout="kaggle", classes=3)
    log = RecordedLog()
    resolve_dataset(parse_config(["--data", str(root), "--cache-dir", str(tmp_path / "c")]), cpu_accelerator, log)
    assert not [w for w in log.warnings if "held-out" in w]


def test_classes_too_small_to_hold_out_a_split_are_one_user_error(tmp_path, make_image_folder):
    """Two classes of one image each: nothing can be held out, and a test figure would be 0% of nothing."""
    root = make_image_folder(tmp_path / "tiny", layout="image-folder", classes=2, per_class=1)
    config = parse_config(["--data", str(root)])
    with pytest.raises(UserError, match="no image is left for the test split"):
        discover_splits(find_split_folders(config, root), config.val_fraction, config.seed, strict=False)
    root = make_image_folder(tmp_path / "two", layout="train-test", classes=2, per_class=1)
    with pytest.raises(UserError, match="no image is left for the validation split"):
        discover_splits(find_split_folders(config, root), config.val_fraction, config.seed, strict=False)


@pytest.mark.parametrize("layout_name, split", [("image-folder", "test"), ("train-test", "validation")])
def test_classes_of_copies_too_few_to_hold_out_say_how_many_distinct_images_they_hold(
        tmp_path, make_image_folder, layout_name, split):
    """Twelve identical files a class: each class is one image, copies stay together, so nothing is held out;
    "too small ... add images" with 24 files read as wrong."""
    root = make_image_folder(tmp_path / "d", layout=layout_name, classes=2, per_class=1)
    for image in (root / "train").glob("*/*.png") if layout_name == "train-test" else root.glob("*/*.png"):
        for i in range(11):
            shutil.copyfile(image, image.with_name(f"copy_{i}.png"))
    config = parse_config(["--data", str(root)])
    with pytest.raises(UserError) as error:
        discover_splits(find_split_folders(config, root), config.val_fraction, config.seed, strict=False)
    assert str(error.value) == (
        f"no image is left for the {split} split: each class holds only 1 distinct image (24 files, 22 of them "
        "copies): copies stay together on one side, so none can be held out; add different images to the classes.")
