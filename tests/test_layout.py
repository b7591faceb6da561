"""monkeytrain.data.layout: recognising dataset layouts, explicit folders, class names."""

from __future__ import annotations

import shutil
import unicodedata

import pytest

from monkeytrain.data import layout
from monkeytrain.errors import UserError


@pytest.mark.parametrize("name, train, selection, test, layout_name, has_labels", [
    ("kaggle", "training/training", None, "validation/validation", "kaggle", True),
    ("flattened", "training", None, "validation", "kaggle-flattened", True),
    ("train-val", "train", None, "val", "train-val", False),
    ("train-val-test", "train", "val", "test", "train-val-test", False),
    ("train-valid-test", "train", "valid", "test", "train-val-test", False),
    ("train-test", "train", None, "test", "train-test", False),
    ("image-folder", ".", None, None, "image-folder", False),
])
def test_every_layout_is_recognised(tmp_path, make_image_folder, name, train, selection, test,
                                    layout_name, has_labels):
    root = make_image_folder(tmp_path / "data", layout=name, classes=2, per_class=1)
    folders = layout.folders_from_root(root)
    assert folders.train == root / train
    assert folders.selection == (root / selection if selection else None)
    assert folders.test == (root / test if test else None)
    assert folders.layout == layout_name
    assert folders.labels_file == (root / "monkey_labels.txt" if has_labels else None)


@pytest.mark.parametrize("made, renamed, roles, layout_name", [
    # every name a split folder commonly has: each folder in the role its name says, none left unused
    ("train-val-test", {"val": "validation"}, ("train", "validation", "test"), "train-val-test"),
    ("train-val-test", {"train": "training", "val": "validation"}, ("training", "validation", "test"),
     "train-val-test"),
    ("train-val-test", {"test": "testing"}, ("train", "val", "testing"), "train-val-test"),
    ("train-val-test", {"train": "Training", "val": "Valid", "test": "TESTING"}, ("Training", "Valid", "TESTING"),
     "train-val-test"),
    ("train-test", {"test": "testing"}, ("train", None, "testing"), "train-test"),
    ("train-test", {"train": "training"}, ("training", None, "test"), "train-test"),
    # a validation folder without a test folder is the test split, as val/ and Kaggle's validation/ are
    ("train-val", {"val": "validation"}, ("train", None, "validation"), "train-val"),
    ("train-val", {"train": "training", "val": "valid"}, ("training", None, "valid"), "train-val"),
])
def test_every_usual_name_of_a_split_folder_is_used(tmp_path, make_image_folder, made, renamed, roles, layout_name):
    root = make_image_folder(tmp_path / "data", layout=made, classes=2, per_class=1)
    for name, new_name in renamed.items():
        (root / name).rename(root / new_name)
    folders = layout.folders_from_root(root)
    assert (folders.train, folders.selection, folders.test) == tuple(root / r if r else None for r in roles)
    assert folders.layout == layout_name


@pytest.mark.parametrize("made, copied, message", [
    ("train-val-test", ("val", "validation"), r"2 folders for the val split \(val/, validation/\)"),
    ("train-val", ("train", "training"), r"2 folders for the train split \(train/, training/\)"),
    ("train-test", ("test", "Testing"), r"2 folders for the test split \(Testing/, test/\)"),
    ("flattened", ("training", "train"), r"2 folders for the train split \(train/, training/\)"),
])
def test_two_folders_for_one_split_are_refused_naming_both(tmp_path, make_image_folder, made, copied, message):
    root = make_image_folder(tmp_path / "data", layout=made, classes=2, per_class=1)
    shutil.copytree(root / copied[0], root / copied[1])
    with pytest.raises(UserError, match=message + ".* --train-dir, --val-dir and --test-dir"):
        layout.folders_from_root(root)


@pytest.mark.parametrize("layout_name, loose, message", [
    # val/ of loose images beside train/ and test/ of class folders: neither a class nor a split for sure
    ("train-test", "val", r"data/val is named like a split but holds images of its own, beside the split folders "
                          r"test/, train/; move its images into class subfolders"),
    # a Kaggle competition's data: train/ and val/ of class folders, test/ of images without labels
    ("train-val", "test", r"data/test is named like a split .* move it out of .*data if it is an unlabelled test "
                          r"set, as Kaggle competitions give \(`monkeytrain predict`"),
], ids=["a split name holding images", "an unlabelled test set"])
def test_a_folder_named_like_a_split_holding_images_beside_split_folders_is_refused_with_what_to_do(
        tmp_path, make_image_folder, layout_name, loose, message):
    root = make_image_folder(tmp_path / "data", layout=layout_name, classes=2, per_class=1)
    make_image_folder(tmp_path / "loose", layout="image-folder", classes=1, per_class=2)
    (tmp_path / "loose" / "n0").rename(root / loose)
    with pytest.raises(UserError, match=message):
        layout.folders_from_root(root)


def test_a_split_folder_with_a_stray_file_that_is_no_image_is_still_a_split(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-val-test", classes=2, per_class=1)
    (root / "train" / "README.txt").write_text("class folders below")
    (root / "val" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    assert layout.folders_from_root(root).layout == "train-val-test"


def test_kaggle_nested_layout_wins_over_its_outer_folders(tmp_path, make_image_folder):
    # training/ and validation/ exist in the nested layout too; the nested one must be used
    root = make_image_folder(tmp_path / "data", layout="kaggle", classes=2, per_class=1)
    folders = layout.folders_from_root(root)
    assert layout.class_folders(folders.train) == ["n0", "n1"]


@pytest.mark.parametrize("made, nested, roles, layout_name", [
    # Kaggle zips nest every split they hold, a test split too; a nested one is used wherever it appears
    ("train-val-test", {"train": "training", "val": "validation", "test": "test"},
     ("training/training", "validation/validation", "test/test"), "train-val-test"),
    ("train-test", {"test": "Testing"}, ("train", None, "Testing/Testing"), "train-test"),
    ("flattened", {"training": "training"}, ("training/training", None, "validation"), "kaggle"),
])
def test_a_split_folder_holding_only_a_folder_of_its_own_name_is_that_folder(tmp_path, make_image_folder, made,
                                                                          nested, roles, layout_name):
    root = make_image_folder(tmp_path / "data", layout=made, classes=2, per_class=1)
    for name, new_name in nested.items():
        (root / name).rename(tmp_path / "moved")
        (root / new_name).mkdir()
        (tmp_path / "moved").rename(root / new_name / new_name)
    folders = layout.folders_from_root(root)
    assert (folders.train, folders.selection, folders.test) == tuple(root / r if r else None for r in roles)
    assert folders.layout == layout_name
    assert layout.check_same_classes(folders) == ["n0", "n1"]


def test_a_split_folder_holding_its_own_name_beside_other_classes_is_a_split_of_classes(tmp_path,
                                                                                       make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-val", classes=2, per_class=1)
    for split in ("train", "val"):
        (root / split / "n1").rename(root / split / "train")  # a class that happens to be called train
    folders = layout.folders_from_root(root)
    assert folders.train == root / "train" and layout.check_same_classes(folders) == ["n0", "train"]


def test_folders_a_labels_file_gives_one_common_name_are_told_apart_by_their_folders(tmp_path):
    labels = tmp_path / "monkey_labels.txt"
    labels.write_text("Label,Latin Name,Common Name\nn0,a,macaque\nn1,b,macaque\nn2,c,howler\n")
    assert layout.display_names(["n0", "n1", "n2"], labels) == ["macaque (n0)", "macaque (n1)", "howler"]


def test_missing_root_is_a_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="nowhere"):
        layout.folders_from_root(tmp_path / "nowhere")


def test_a_file_given_as_the_root_is_named_as_a_file(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    with pytest.raises(UserError, match="data.zip is a file, not a folder"):
        layout.folders_from_root(tmp_path / "data.zip")


def test_root_without_a_known_layout_is_a_user_error(tmp_path):
    (tmp_path / "train").mkdir()  # train/ alone, no val/
    with pytest.raises(UserError, match="no dataset layout"):
        layout.folders_from_root(tmp_path)


def test_a_root_of_images_without_class_folders_is_told_to_sort_them_into_classes(tmp_path, make_image_folder):
    one_class = make_image_folder(tmp_path / "data", layout="image-folder", classes=2) / "n0"
    with pytest.raises(UserError, match="n0 holds images but no class subfolders; put each class's images in a"):
        layout.folders_from_root(one_class)


def test_a_root_of_split_folders_is_never_taken_for_one_of_classes(tmp_path, make_image_folder):
    """valid/ and test/ without train/: split names, not class names (a class "test" would be silent)."""
    root = make_image_folder(tmp_path / "data", layout="train-valid-test", classes=2, per_class=1)
    (root / "train").rename(root / "training-images")
    with pytest.raises(UserError, match="no dataset layout found in .* \\(split folders test/, valid/, not a layout"):
        layout.folders_from_root(root)


@pytest.mark.parametrize("split", ["test", "Val"])
def test_class_folders_beside_a_split_folder_are_told_to_move_into_a_training_folder(tmp_path, make_image_folder,
                                                                                    split):
    """cat/, dog/ and test/ (a test set of one's own, put beside the classes): one sentence that says what to do."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    make_image_folder(root / split, layout="image-folder", classes=2, per_class=1)
    with pytest.raises(UserError, match=f"has class folders of images \\('n0', 'n1'\\) beside the split folder\\(s\\) "
                                        f"{split}/ but no training folder; move the class folders into a train/"):
        layout.folders_from_root(root)


def test_split_folders_inside_every_class_folder_are_refused_rather_than_pooled(tmp_path, make_image_folder):
    """cat/train/, cat/test/, dog/train/, dog/test/: read as two classes, the test images went into the pool that
    training and a random test split are drawn from."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=4)
    for name in ("n0", "n1"):
        images = sorted((root / name).iterdir())
        for split, part in (("train", images[:3]), ("Test", images[3:])):
            (root / name / split).mkdir()
            for image in part:
                image.rename(root / name / split / image.name)
    with pytest.raises(UserError, match="the class folders of .* hold split folders \\(Test/, train/ in n0/\\); "
                                        "make the splits the outer folders \\(Test/n0/ and train/n0/, each split"):
        layout.folders_from_root(root)


def test_a_split_folder_inside_some_class_folders_only_is_a_subfolder_of_images(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=2)
    make_image_folder(root / "n0" / "test", layout="image-folder", classes=1, per_class=1)
    assert layout.folders_from_root(root).layout == "image-folder"


@pytest.mark.parametrize("renamed", [{"train": "Train", "val": "VAL"}, {"train": "TRAIN", "test": "Test"}])
def test_split_folders_are_found_in_any_letter_case(tmp_path, make_image_folder, renamed):
    """Train/ and Test/ were trained as two classes, Train and Test."""
    root = make_image_folder(tmp_path / "data", layout="train-val" if "val" in renamed else "train-test",
                             classes=2, per_class=1)
    for name, new_name in renamed.items():
        (root / name).rename(root / new_name)
    folders = layout.folders_from_root(root)
    assert folders.train == root / renamed["train"] and folders.layout in ("train-val", "train-test")
    assert layout.class_folders(folders.train) == ["n0", "n1"]


def test_a_class_named_like_a_split_is_a_class(tmp_path, make_image_folder):
    """A folder of images named train/ beside bus/ and car/ holds the class 'train'."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=3, per_class=1)
    for old, new in (("n0", "bus"), ("n1", "car"), ("n2", "train")):
        (root / old).rename(root / new)
    folders = layout.folders_from_root(root)
    assert folders.layout == "image-folder" and layout.class_folders(folders.train) == ["bus", "car", "train"]


def test_classes_named_like_several_splits_are_classes(tmp_path, make_image_folder):
    """bus/, train/ and test/ holding images are three classes, not a train/ + test/ layout."""
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=3, per_class=1)
    for old, new in (("n0", "bus"), ("n1", "train"), ("n2", "test")):
        (root / old).rename(root / new)
    folders = layout.folders_from_root(root)
    assert folders.layout == "image-folder" and layout.check_same_classes(folders) == ["bus", "test", "train"]


def test_a_macos_zip_folder_and_hidden_folders_are_not_classes(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    for extra in ("__MACOSX/n0", ".ipynb_checkpoints"):
        (root / extra).mkdir(parents=True)
    (root / "__MACOSX" / "n0" / "._n0_000.png").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble metadata
    assert layout.class_folders(layout.folders_from_root(root).train) == ["n0", "n1"]


@pytest.mark.parametrize("extra", ["@eaDir", "System Volume Information", "$RECYCLE.BIN", "__macosx", "lost+found",
                                   "#recycle", "@Recycle"])
def test_folders_a_nas_or_windows_makes_beside_the_classes_are_not_classes(tmp_path, make_image_folder, extra):
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    (root / extra / "n0_000.png").mkdir(parents=True)  # a Synology NAS: a folder of thumbnails per image
    shutil.copy(root / "n0" / "n0_000.png", root / extra / "n0_000.png" / "SYNOPHOTO_THUMB_M.png")
    assert layout.class_folders(layout.folders_from_root(root).train) == ["n0", "n1"]


def test_a_class_folder_linked_from_a_drive_not_mounted_is_named_not_left_out(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    (root / "n2").symlink_to(tmp_path / "unmounted" / "n2")
    (root / ".stale").symlink_to(tmp_path / "gone")  # hidden: passed over
    with pytest.raises(UserError, match=r"data/n2 is a link to .*unmounted/n2, which does not exist \(a class folder "
                                        r"on a drive not mounted here\?\); mount it, fix the link, or remove it"):
        layout.check_same_classes(layout.folders_from_root(root))


@pytest.mark.parametrize("name", ["notes.txt", "x.jpg", "run.ipynb"])
def test_a_link_to_a_file_gone_beside_the_classes_is_no_class_and_does_not_stop_the_run(tmp_path,
                                                                                     make_image_folder, name):
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    (root / name).symlink_to(tmp_path / "unmounted" / name)
    assert layout.check_same_classes(layout.folders_from_root(root)) == ["n0", "n1"]


@pytest.mark.parametrize("name", ["001.Black_footed_Albatross", "n0.10", "Dr. Who"])
def test_a_link_to_nothing_named_like_a_class_with_a_dot_still_stops_the_run(tmp_path, make_image_folder, name):
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=2, per_class=1)
    (root / name).symlink_to(tmp_path / "unmounted" / name)
    with pytest.raises(UserError, match="which does not exist"):
        layout.check_same_classes(layout.folders_from_root(root))


def test_one_class_is_a_user_error_asking_for_two(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="image-folder", classes=1, per_class=2)
    with pytest.raises(UserError, match=r"one class subfolder \(n0\); a classifier needs at least two"):
        layout.check_same_classes(layout.folders_from_root(root))


def test_one_folder_that_holds_the_classes_is_named_as_the_one_to_give(tmp_path, make_image_folder):
    make_image_folder(tmp_path / "download" / "images", layout="image-folder", classes=2, per_class=1)
    with pytest.raises(UserError, match="if .*download/images holds the class folders, give that folder"):
        layout.check_same_classes(layout.folders_from_root(tmp_path / "download"))


def test_explicit_train_and_val(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-val", classes=2, per_class=1)
    folders = layout.folders_from_explicit(str(root / "train"), str(root / "val"), None)
    assert (folders.train, folders.selection, folders.test) == (root / "train", None, root / "val")
    assert folders.layout == "explicit"


def test_explicit_train_val_and_test(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-val-test", classes=2, per_class=1)
    folders = layout.folders_from_explicit(str(root / "train"), str(root / "val"), str(root / "test"))
    assert (folders.train, folders.selection, folders.test) == (root / "train", root / "val", root / "test")


def test_explicit_train_and_test_only(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-val-test", classes=2, per_class=1)
    folders = layout.folders_from_explicit(str(root / "train"), None, str(root / "test"))
    assert (folders.selection, folders.test) == (None, root / "test")


def test_explicit_dirs_find_the_labels_file_above_the_training_folder(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="kaggle", classes=2, per_class=1)
    folders = layout.folders_from_explicit(
        str(root / "training" / "training"), str(root / "validation" / "validation"), None)
    assert folders.labels_file is not None
    assert folders.labels_file.resolve() == (root / "monkey_labels.txt").resolve()


@pytest.mark.parametrize("train, val, test, named", [
    (None, "v", None, "--train-dir"),
    ("t", None, None, "--val-dir or --test-dir"),
])
def test_incomplete_explicit_dirs_are_user_errors(train, val, test, named):
    with pytest.raises(UserError, match=named):
        layout.folders_from_explicit(train, val, test)


def test_missing_explicit_folder_is_a_user_error_naming_flag_and_path(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-val", classes=2, per_class=1)
    missing = tmp_path / "no-such-val"
    with pytest.raises(UserError, match="--val-dir") as error:
        layout.folders_from_explicit(str(root / "train"), str(missing), None)
    assert str(missing) in str(error.value)
    with pytest.raises(UserError, match="--test-dir"):
        layout.folders_from_explicit(str(root / "train"), str(root / "val"), str(missing))


def test_class_folders_are_sorted_and_skip_hidden_folders_and_files(tmp_path):
    for name in ("n2", "n10", "n0", ".cache"):
        (tmp_path / name).mkdir()
    (tmp_path / "readme.txt").write_text("not a class")
    assert layout.class_folders(tmp_path) == ["n0", "n10", "n2"]


def test_class_missing_from_one_split_names_the_class(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-val", classes=3, per_class=1)
    (root / "val" / "n1").rename(root / "val" / "n1_renamed")
    folders = layout.folders_from_root(root)
    with pytest.raises(UserError, match="'n1'"):
        layout.check_same_classes(folders)


def test_class_only_in_the_test_split_names_the_class(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-val-test", classes=2, per_class=1)
    (root / "test" / "extra").mkdir()
    with pytest.raises(UserError, match="'extra'"):
        layout.check_same_classes(layout.folders_from_root(root))


def test_class_names_differing_only_in_unicode_normalisation_are_named_as_such(tmp_path, make_image_folder):
    """café composed (NFC) in train/ and decomposed (NFD, from a zip made on a Mac) in val/ print alike."""
    root = make_image_folder(tmp_path / "data", layout="train-val", classes=2, per_class=1)
    (root / "train" / "n1").rename(root / "train" / unicodedata.normalize("NFC", "café"))
    (root / "val" / "n1").rename(root / "val" / unicodedata.normalize("NFD", "café"))
    with pytest.raises(UserError, match="print alike but are spelled with different Unicode code points "
                                        r"\(NFC and NFD normalisation\); rename one of them"):
        layout.check_same_classes(layout.folders_from_root(root))


def test_class_names_differing_only_in_letter_case_are_named_as_such(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="train-val", classes=2, per_class=1)
    (root / "val" / "n1").rename(root / "val" / "N1")
    with pytest.raises(UserError, match="'n1' in .*train and 'N1' in .*val differ only in letter case; rename one"):
        layout.check_same_classes(layout.folders_from_root(root))


def test_training_folder_without_classes_is_a_user_error(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    with pytest.raises(UserError, match="no class subfolders"):
        layout.check_same_classes(layout.folders_from_root(tmp_path))


def test_common_names_come_from_the_labels_file(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="kaggle", classes=3, per_class=1)
    names = layout.display_names(["n0", "n1", "n2"], root / "monkey_labels.txt")
    assert names == ["common name 0", "common name 1", "common name 2"]


def test_folder_names_are_used_where_the_labels_file_has_no_entry(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", layout="kaggle", classes=2, per_class=1)
    assert layout.display_names(["n0", "n7"], root / "monkey_labels.txt") == ["common name 0", "n7"]


def test_folder_names_are_used_without_a_labels_file():
    assert layout.display_names(["b_class", "a_class"], None) == ["b_class", "a_class"]


def test_real_kaggle_labels_file_format_is_read(tmp_path):
    # The first lines of the real file: padding and a tab around the fields
    labels = tmp_path / "monkey_labels.txt"
    labels.write_text(
        "Label,  Latin Name           , Common Name                   , Train Images , Validation Images\n"
        "n0   , alouatta_palliata\t , mantled_howler                , 131          , 26\n"
        "n1   , erythrocebus_patas\t , patas_monkey                  , 139          , 28\n"
    )
    assert layout.read_common_names(labels) == {"n0": "mantled howler", "n1": "patas monkey"}
